//! `palisade-proxy run` and `palisade-proxy wait-ready`: production wiring from [`Config`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use palisade_ca_api::cert::parse_pem_certs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::{Bound, Parts, Settings};
use crate::ca_client::{CaEndpoint, CaSource};
use crate::clock::Clock;
use crate::config::Config;
use crate::datapath::Limits;
use crate::identity::{
    ANCHORS_POLL_INTERVAL, AnchorsFile, CertStore, EarlyRenewal, Identity, IdentityConfig,
};
use crate::inbound::InboundTarget;
use crate::mesh::{Credentials, MeshConfig, MeshView};
use crate::metrics::Metrics;
use crate::outbound::OutboundTarget;
use crate::tls::TrustBundle;

/// Runs the proxy until SIGTERM/SIGINT or `POST /shutdown`, then drains and returns.
/// The proxy's runtime: `workers` threads (`PALISADE_WORKER_THREADS`). One worker runs on the
/// current thread: a woken task then waits its turn behind the others rather than running
/// at once, so that a tunnel's connection task writes the frames of every stream that sent
/// meanwhile in one go (fewer records and syscalls) instead of one frame per wake-up.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let bound = start(&config).await?;
    let trigger = bound.shutdown_handle();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        let _ = trigger.send(true);
    });
    bound.wait().await;
    Ok(())
}

/// Builds every part from `config`, binds the listeners and starts the tasks; the proxy runs
/// until [`Bound::shutdown`] (or `POST /shutdown`), and [`Bound::wait`] waits for its drain.
/// Several proxies can run in one process this way (the `palisade demo`).
pub async fn start(config: &Config) -> anyhow::Result<Bound> {
    let (bundle, anchors_loaded) = trust_bundle(config)?;
    let bundle = Arc::new(bundle);
    let clock = Clock::system();
    let store = Arc::new(CertStore::new(clock.clone()));
    let early = Arc::new(EarlyRenewal::new(store.clone()));
    let metrics = Arc::new(Metrics::new());
    let source = Arc::new(
        CaSource::new(
            CaEndpoint {
                addr: config.ca_addr.clone(),
                server_name: config.ca_name.clone(),
                timeout: config.ca_timeout,
            },
            store.clone(),
            bundle.clone(),
        )
        .context("cannot set up the CA client")?,
    );
    let identity = Arc::new(Identity {
        config: IdentityConfig {
            spiffe_id: config.spiffe_id.clone(),
            token_file: config.token_file.clone(),
            ttl_seconds: config.cert_ttl.map(|d| d.as_secs()),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            trust_anchors: Some(AnchorsFile {
                path: config.trust_anchors.clone(),
                poll: ANCHORS_POLL_INTERVAL,
                loaded: anchors_loaded,
            }),
        },
        store: store.clone(),
        bundle: bundle.clone(),
        source: source.clone(),
        metrics: metrics.clone(),
        clock,
        early: early.clone(),
    });
    let mesh = Arc::new(
        MeshView::new(MeshConfig {
            pod_ip: Some(config.pod_ip),
            max_destinations: config.max_destinations,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(5),
            ..MeshConfig::default()
        })
        .with_credentials(Credentials {
            store: store.clone(),
            bundle: bundle.clone(),
            early,
        }),
    );
    let bound = crate::app::start(
        settings(config),
        Parts {
            store,
            bundle,
            mesh,
            metrics,
            identity: Some(identity),
            mesh_watcher: Some(source),
        },
    )
    .await?;
    tracing::info!(
        spiffe_id = %config.spiffe_id,
        pod = config.pod_name.as_deref().unwrap_or(""),
        inbound = %bound.inbound,
        outbound = %bound.outbound,
        admin = %bound.admin,
        ca = %config.ca_addr,
        "palisade-proxy started"
    );
    Ok(bound)
}

/// The mesh's roots from `PALISADE_TRUST_ANCHORS` (the palisade-trust-anchors ConfigMap), and
/// the file's content, from which the anchors poller looks for changes.
fn trust_bundle(config: &Config) -> anyhow::Result<(TrustBundle, Vec<u8>)> {
    let path = config.trust_anchors.display();
    let anchors_pem = std::fs::read_to_string(&config.trust_anchors)
        .with_context(|| format!("cannot read PALISADE_TRUST_ANCHORS={path}"))?;
    let anchors = parse_pem_certs(&anchors_pem)
        .with_context(|| format!("PALISADE_TRUST_ANCHORS={path} holds no usable certificate"))?;
    let bundle = TrustBundle::new(anchors)
        .with_context(|| format!("PALISADE_TRUST_ANCHORS={path} is not a usable trust bundle"))?;
    Ok((bundle, anchors_pem.into_bytes()))
}

/// Listeners, targets, limits and timeouts, as the configuration gives them.
fn settings(config: &Config) -> Settings {
    Settings {
        inbound_listen: config.inbound_listen,
        outbound_listen: config.outbound_listen,
        admin_listen: config.admin_listen,
        inbound_target: config.inbound_forward_port.map_or_else(
            || InboundTarget::OriginalDst {
                loopback_ports: config.inbound_loopback_ports.clone().into(),
            },
            InboundTarget::FixedPort,
        ),
        outbound_target: config
            .outbound_destination
            .map_or(OutboundTarget::OriginalDst, OutboundTarget::Fixed),
        limits: Limits {
            connect_timeout: config.connect_timeout,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            detect_window: config.inbound_detect_timeout,
            destination_wait: config.destination_wait,
            max_connections: config.max_connections,
            max_connections_per_source: config.max_connections_per_source,
            tunnels: config.tunnels,
            ..Limits::default()
        },
        drain_timeout: config.drain_timeout,
        probes: config.app_probes.clone(),
        probe_timeout: config.probe_timeout,
        admin_remote_metrics: config.admin_remote_metrics,
        init_report: read_init_report(&config.init_report),
    }
}

/// What `init` did, as it wrote it (written before the proxy starts); empty when there is no
/// report (no report volume, or a pod injected before there was one). At most 4 KiB.
fn read_init_report(path: &std::path::Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
            for line in text
                .lines()
                .filter(|l| l.contains("CLOSED") || l.contains("DISABLED"))
            {
                tracing::warn!(init = line, "traffic capture is incomplete");
            }
            text
        }
        Err(_) => String::new(),
    }
}

/// Polls `GET /ready` on the admin address until it answers 200 or `timeout` passes.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match ready_once(admin).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the proxy at {admin} was not ready within {timeout:?}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn ready_once(admin: SocketAddr) -> Result<(), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out);
        if text.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(text.lines().last().unwrap_or("").to_owned())
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| "no answer within 2s".to_owned())?
}
