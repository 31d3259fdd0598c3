//! `palisade-injector serve`: see `palisade_injector::cli` for flags.
use anyhow::Context as _;
use clap::Parser as _;
use palisade_injector::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log/PALISADE_LOG={:?} is not a tracing filter", args.log))?;
    // Logs go to stderr; stdout stays free for anything a wrapper may want to parse.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    palisade_injector::tls::install_crypto_provider();
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
