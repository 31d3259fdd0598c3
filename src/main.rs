//! `palisade`: certificate inspection and policy checks (and, later, the whole-mesh demo).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;
mod policy_check;

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Palisade: inspect mesh certificates, check policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explain a certificate (or a chain) in PEM: identity, validity, profile.
    Inspect {
        /// PEM file with one or more certificates, leaf first.
        cert: std::path::PathBuf,
    },
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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Inspect { cert } => inspect::run(&cert).map(|()| ExitCode::SUCCESS),
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check::run(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("palisade: {e:#}");
        ExitCode::from(2)
    })
}
