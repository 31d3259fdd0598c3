//! `palisade`: the whole-mesh demo, certificate inspection and policy checks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade::check;

mod demo;
mod inspect;
mod policy_check;
mod policy_explain;
mod policy_suggest;

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Palisade: run the mesh on this machine, inspect mesh certificates, check policies and the mesh in a cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh on this machine (no cluster, no root) and report what happened:
    /// a CA, workloads with their proxies, allowed and denied calls, a certificate rotation.
    Demo,
    /// Explain a certificate (or a chain) in PEM: identity, validity, profile.
    Inspect {
        /// PEM file with one or more certificates, leaf first.
        cert: std::path::PathBuf,
    },
    /// Check the mesh in the cluster of the current kubeconfig context: control plane, injector,
    /// CRD, pods without their proxy, policy faults. One line per check, a fix under each red
    /// one. Exit 0 when all pass, 1 when any fails, 2 when the cluster cannot be checked.
    Check(check::CheckArgs),
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// May a caller reach a workload on a port? Exit 0 when allowed, 1 when denied.
    Check(policy_check::CheckArgs),
    /// Why is a connection allowed or denied? The policy and rule (or the default) that decide,
    /// the reason proxies log, and for a denial the smallest change that admits the caller.
    /// Exit 0 when allowed, 1 when denied.
    Explain(policy_explain::ExplainArgs),
    /// MeshPolicy manifests that allow exactly the callers the proxies saw, per workload and
    /// port, from their /metrics (palisade_inbound_connections_total).
    Suggest(policy_suggest::SuggestArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Demo => return demo::run(),
        Command::Check(args) => return check::run(&args),
        Command::Inspect { cert } => inspect::run(&cert).map(|()| ExitCode::SUCCESS),
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check::run(&args),
        Command::Policy {
            command: PolicyCommand::Explain(args),
        } => policy_explain::run(&args),
        Command::Policy {
            command: PolicyCommand::Suggest(args),
        } => policy_suggest::run(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("palisade: {e:#}");
        ExitCode::from(2)
    })
}
