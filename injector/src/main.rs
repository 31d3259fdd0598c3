//! `palisade-injector serve`: see `palisade_injector::cli` for flags.
use anyhow::Context as _;
use clap::Parser as _;
use palisade_injector::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let format = args
        .log_format
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--log-format: {e}"))?;
    palisade_plumbing::logging::init(&args.log, format)
        .map_err(|e| anyhow::anyhow!("--log/PALISADE_LOG: {e}"))?;
    palisade_ca_api::tls::install_default_provider();
    let config = args.into_config()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut bound = palisade_injector::start(config).await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot listen for SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
            _ = bound.wait() => anyhow::bail!("a server task stopped unexpectedly"),
        }
        tracing::info!("shutting down");
        bound.shutdown().await;
        Ok(())
    })
}
