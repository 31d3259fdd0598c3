//! palisade-proxy: parse the command line, install the crypto provider, start tracing, run.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use palisade_ca_api::contract::{
    INBOUND_PORT, OUTBOUND_PORT, PROXY_ADMIN_PORT, PROXY_UID, parse_duration,
};
use palisade_proxy::config::{Config, ProcessEnv};
use palisade_proxy::init::{self, Family, InitOptions};

#[derive(Parser)]
#[command(
    name = "palisade-proxy",
    version,
    about = "Palisade mesh sidecar (docs/proxy.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, configured by the PALISADE_* environment variables (docs/proxy.md).
    Run,
    /// Install the traffic-capture rules (idempotent).
    Init(InitArgs),
    /// Wait until the proxy's /ready answers 200 (for a postStart hook).
    WaitReady {
        /// Admin address of the proxy.
        #[arg(
            long,
            visible_alias = "admin-addr",
            env = "PALISADE_WAIT_ADMIN",
            default_value_t = std::net::SocketAddr::from(([127, 0, 0, 1], PROXY_ADMIN_PORT))
        )]
        admin: std::net::SocketAddr,
        /// How long to wait (ms, s, m, h).
        #[arg(long, env = "PALISADE_WAIT_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// The proxy's uid: its own traffic is never captured.
    #[arg(long, env = "PALISADE_PROXY_UID", default_value_t = PROXY_UID)]
    proxy_uid: u32,
    /// Where inbound TCP is redirected.
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = INBOUND_PORT)]
    inbound_port: u16,
    /// Where outbound TCP is redirected.
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = OUTBOUND_PORT)]
    outbound_port: u16,
    /// The admin port, never captured (kubelet probes reach it directly).
    #[arg(long, env = "PALISADE_ADMIN_PORT", default_value_t = PROXY_ADMIN_PORT)]
    admin_port: u16,
    /// Inbound ports left alone, comma-separated.
    #[arg(long, env = "PALISADE_SKIP_INBOUND_PORTS", default_value = "")]
    skip_inbound_ports: String,
    /// Outbound ports left alone, comma-separated.
    #[arg(long, env = "PALISADE_SKIP_OUTBOUND_PORTS", default_value = "")]
    skip_outbound_ports: String,
    /// Outbound CIDRs left alone (either family), comma-separated.
    #[arg(long, env = "PALISADE_SKIP_OUTBOUND_CIDRS", default_value = "")]
    skip_outbound_cidrs: String,
    /// Inbound UDP ports the app may be reached on, comma-separated; every other inbound UDP
    /// (but replies to the pod's own requests) is dropped.
    #[arg(long, env = "PALISADE_ALLOW_INBOUND_UDP_PORTS", default_value = "")]
    allow_inbound_udp_ports: String,
    /// Where to write what was done (one line per family), for the proxy's `/ready`; skipped
    /// when its directory does not exist.
    #[arg(long, env = "PALISADE_INIT_REPORT", default_value = palisade_ca_api::contract::INIT_REPORT_FILE)]
    report: std::path::PathBuf,
    /// Print the commands instead of running them.
    #[arg(long, env = "PALISADE_DRY_RUN")]
    dry_run: bool,
}

fn run_init(a: InitArgs) -> Result<(), init::InitError> {
    let options = InitOptions {
        proxy_uid: a.proxy_uid,
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        admin_port: a.admin_port,
        skip_inbound_ports: init::parse_ports("--skip-inbound-ports", &a.skip_inbound_ports)?,
        skip_outbound_ports: init::parse_ports("--skip-outbound-ports", &a.skip_outbound_ports)?,
        skip_outbound_cidrs: init::parse_cidrs("--skip-outbound-cidrs", &a.skip_outbound_cidrs)?,
        allow_inbound_udp_ports: init::parse_ports(
            "--allow-inbound-udp-ports",
            &a.allow_inbound_udp_ports,
        )?,
    };
    let backend = init::detect_backend(Family::V4);
    let backend6 = init::detect_backend(Family::V6).binary_for(Family::V6);
    if a.dry_run {
        println!("# IPv4, backend: {}", backend.binary());
        for line in init::script(backend.binary(), &options, Family::V4) {
            println!("{line}");
        }
        println!("# IPv6 (when the pod has an IPv6 address), backend: {backend6}");
        for line in init::script(backend6, &options, Family::V6) {
            println!("{line}");
        }
        println!(
            "# IPv6 when it cannot be captured: closed instead (else turned off, else init fails)"
        );
        for line in init::ipv6::closed_script(backend6, &options) {
            println!("{line}");
        }
        return Ok(());
    }
    init::apply(backend.binary(), &options, Family::V4)?;
    let v4 = format!("IPv4: captured with {}", backend.binary());
    eprintln!("palisade-proxy init: {v4}");
    let v6 = init::ipv6::secure(backend6, &options)?;
    eprintln!("palisade-proxy init: {v6}");
    if a.report.parent().is_some_and(std::path::Path::is_dir) {
        // Read by the proxy (another uid): world-readable, and it holds no secret.
        if let Err(e) = std::fs::write(&a.report, format!("{v4}\n{v6}\n")) {
            eprintln!(
                "palisade-proxy init: cannot write {}: {e} (the proxy's /ready will not show the capture state)",
                a.report.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    palisade_ca_api::tls::install_default_provider();
    match cli.command {
        Command::Init(a) => match run_init(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("palisade-proxy init: {e}");
                ExitCode::FAILURE
            }
        },
        Command::WaitReady { admin, timeout } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            match rt.block_on(palisade_proxy::run::wait_ready(admin, timeout)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("palisade-proxy wait-ready: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            let config = match Config::from_env(&ProcessEnv) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("palisade-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            // The filter was checked with the rest of the configuration.
            let _ = palisade_plumbing::logging::init(&config.log, config.log_format);
            let rt = palisade_proxy::run::runtime(config.worker_threads).expect("a tokio runtime");
            match rt.block_on(palisade_proxy::run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "palisade-proxy stopped");
                    eprintln!("palisade-proxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
