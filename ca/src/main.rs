//! `palisade-ca`: parse flags, install the crypto provider, start tracing, run.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use palisade_ca::auth::jwks::JwksSource;
use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::config::{AuthMode, MeshSource, ServeConfig};
use palisade_ca::keys::KeySource;
use palisade_ca::rotation::cli as rotation_cli;
use palisade_ca_api::contract::{self, parse_duration};

#[derive(Parser)]
#[command(
    name = "palisade-ca",
    version,
    about = "Palisade certificate authority and control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CA API (:15012) and the admin endpoints (:15014).
    Serve(Box<ServeArgs>),
    /// Print a service-account-shaped token signed by the local issuer (embedded mode).
    Token(TokenArgs),
    /// Print the trust bundle (PEM) of the CA in the state directory.
    Bundle {
        /// State directory of the CA.
        #[arg(long, env = "PALISADE_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Print the MeshPolicy CustomResourceDefinition (YAML), as charts/palisade/crds/ holds it.
    Crd,
    /// Rotate the root or the intermediate of the running CA, or follow a rotation.
    #[command(subcommand)]
    Rotate(RotateCommand),
}

#[derive(Subcommand)]
enum RotateCommand {
    /// Start a root rotation (trusting → issuing → retiring → idle); prints the new root.
    Root {
        #[command(flatten)]
        admin: AdminAddr,
        /// Offline recovery from an expired or compromised root, with the CA stopped: a new root
        /// and intermediate at once in --state-dir; proxies then need the new bundle.
        #[arg(long, requires = "state_dir")]
        emergency: bool,
        /// With --emergency: the CA's state directory.
        #[arg(long, env = "PALISADE_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// With --emergency: the trust domain of the new root.
        #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = contract::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Rotate to your own root instead of a generated one: its certificate (PEM), which the
        /// CA reads; the CA makes the intermediate under it.
        #[arg(long, requires = "from_key", conflicts_with = "emergency")]
        from_cert: Option<PathBuf>,
        /// The key of --from-cert (PKCS#8 PEM), read by the CA, never sent over the admin port.
        #[arg(long, requires = "from_cert")]
        from_key: Option<PathBuf>,
    },
    /// Start an intermediate rotation (issuing → retiring → idle).
    Intermediate {
        #[command(flatten)]
        admin: AdminAddr,
        /// An intermediate signed by your own root, whose key stays offline (PEM, read by the
        /// CA). Under a root the CA does not use yet, this starts a root rotation to that root.
        #[arg(long, requires_all = ["from_key", "chain"])]
        from_cert: Option<PathBuf>,
        /// The key of --from-cert (PKCS#8 PEM), read by the CA, never sent over the admin port.
        #[arg(long, requires_all = ["from_cert", "chain"])]
        from_key: Option<PathBuf>,
        /// The certificates above --from-cert (PEM): its issuer first, the root last. Exactly
        /// one for now: the self-signed root that issued the intermediate.
        #[arg(long, requires_all = ["from_cert", "from_key"])]
        chain: Option<PathBuf>,
    },
    /// Abandon a root rotation that is still trusting (the bundle goes back to the old root).
    Abort {
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Where the rotation stands. Exits 0 when idle, 1 otherwise (naming the lagging proxies).
    Status {
        #[command(flatten)]
        admin: AdminAddr,
        /// Print the admin port's JSON.
        #[arg(long)]
        json: bool,
        /// Wait up to this long for the rotation to reach idle.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<std::time::Duration>,
    },
}

#[derive(Args)]
struct AdminAddr {
    /// The CA's admin port.
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], contract::CONTROL_PLANE_ADMIN_PORT)))]
    admin_addr: SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceArg {
    File,
    Kube,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthArg {
    Local,
    Kube,
    Jwks,
}

#[derive(Args)]
struct ServeArgs {
    /// Where keys (mode 0600) and the local token issuer live.
    #[arg(long, env = "PALISADE_STATE_DIR")]
    state_dir: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = contract::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The CA's own namespace (its identity and DNS name palisade-ca.<ns>.svc).
    #[arg(long, env = "PALISADE_NAMESPACE", default_value = contract::DEFAULT_CA_NAMESPACE)]
    namespace: String,
    /// Where workloads and policies come from.
    #[arg(long, env = "PALISADE_SOURCE", value_enum, default_value = "file")]
    source: SourceArg,
    /// The mesh file (with --source file); reloaded when it changes.
    #[arg(long, env = "PALISADE_MESH_FILE", required_if_eq("source", "file"))]
    mesh_file: Option<PathBuf>,
    /// With --source kube: the policy of namespaces without the palisade.dev/default-policy
    /// annotation (deny, all-authenticated or all). The file source reads it from the mesh file.
    #[arg(long, env = "PALISADE_DEFAULT_POLICY", default_value = "all-authenticated", value_parser = ["deny", "all-authenticated", "all"])]
    default_policy: String,
    /// How service-account tokens are checked.
    #[arg(long, env = "PALISADE_AUTH", value_enum, default_value = "local")]
    auth: AuthArg,
    /// `iss` of service-account tokens (with --auth jwks).
    #[arg(
        long,
        env = "PALISADE_JWKS_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    jwks_issuer: String,
    /// JWKS document of the token issuer (with --auth jwks).
    #[arg(long, env = "PALISADE_JWKS_FILE", conflicts_with = "jwks_url")]
    jwks_file: Option<PathBuf>,
    /// URL of the token issuer's JWKS (with --auth jwks).
    #[arg(long, env = "PALISADE_JWKS_URL")]
    jwks_url: Option<String>,
    /// CA certificate that signs an https --jwks-url.
    #[arg(long, env = "PALISADE_JWKS_CA_FILE")]
    jwks_ca_file: Option<PathBuf>,
    /// API listen address.
    #[arg(long, env = "PALISADE_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], contract::CA_PORT)))]
    listen: SocketAddr,
    /// Admin listen address (/ready, /live, /metrics).
    #[arg(long, env = "PALISADE_ADMIN_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], contract::CONTROL_PLANE_ADMIN_PORT)))]
    admin_listen: SocketAddr,
    /// Default certificate lifetime (5m..24h).
    #[arg(long, env = "PALISADE_CERT_TTL", default_value = "1h", value_parser = parse_duration)]
    cert_ttl: std::time::Duration,
    /// Longest certificate lifetime a caller gets (--cert-ttl..24h); a longer ask is cut to it.
    #[arg(long, env = "PALISADE_MAX_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: std::time::Duration,
    /// TESTING ONLY: allow lifetimes below 5 minutes.
    #[arg(long, env = "PALISADE_ALLOW_SHORT_TTL_FOR_TESTING")]
    allow_short_ttl_for_testing: bool,
    /// Your own root certificate (with --root-key): the CA makes its intermediate from it.
    #[arg(
        long,
        env = "PALISADE_ROOT_CERT",
        requires = "root_key",
        conflicts_with = "intermediate_cert"
    )]
    root_cert: Option<PathBuf>,
    /// Private key of --root-cert (PKCS#8 PEM).
    #[arg(long, env = "PALISADE_ROOT_KEY", requires = "root_cert")]
    root_key: Option<PathBuf>,
    /// Your own intermediate (with --intermediate-key and --intermediate-chain); the root key stays offline.
    #[arg(long, env = "PALISADE_INTERMEDIATE_CERT", requires_all = ["intermediate_key", "intermediate_chain"])]
    intermediate_cert: Option<PathBuf>,
    /// Private key of --intermediate-cert (PKCS#8 PEM).
    #[arg(long, env = "PALISADE_INTERMEDIATE_KEY")]
    intermediate_key: Option<PathBuf>,
    /// Certificates above --intermediate-cert, its issuer first, the root last.
    #[arg(long, env = "PALISADE_INTERMEDIATE_CHAIN")]
    intermediate_chain: Option<PathBuf>,
    /// Extra roots (PEM) to publish in the trust bundle, e.g. the next root during a rotation.
    #[arg(long, env = "PALISADE_EXTRA_TRUST_ROOTS")]
    extra_trust_roots: Option<PathBuf>,
    /// With --source kube: issue the injector's serving certificate into Secret
    /// palisade-injector-tls and keep the webhook palisade-injector's caBundle current.
    #[arg(long, env = "PALISADE_MANAGE_INJECTOR_TLS")]
    manage_injector_tls: bool,
    /// This pod's name (the chart sets it from the downward API): the holder's name on the
    /// rotation Lease in Kubernetes mode. Defaults to the hostname.
    #[arg(long, env = "PALISADE_POD_NAME")]
    pod_name: Option<String>,
    /// Certificate requests per second allowed per identity (0: no limit).
    #[arg(long, env = "PALISADE_RATE_LIMIT", default_value_t = 10)]
    rate_limit: u32,
    /// Burst of certificate requests allowed per identity.
    #[arg(long, env = "PALISADE_RATE_LIMIT_BURST", default_value_t = 20)]
    rate_limit_burst: u32,
    /// Failed token checks per second allowed per source address, before the token is checked
    /// (0: no limit).
    #[arg(long, env = "PALISADE_SOURCE_RATE_LIMIT", default_value_t = 5)]
    source_rate_limit: u32,
    /// Burst of failed token checks allowed per source address.
    #[arg(long, env = "PALISADE_SOURCE_RATE_LIMIT_BURST", default_value_t = 20)]
    source_rate_limit_burst: u32,
    /// Connections open at once on the API port; more are closed at once.
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Connections open at once on the API port from one source address.
    #[arg(
        long,
        env = "PALISADE_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 64
    )]
    max_connections_per_source: usize,
    /// Time from accept to a finished TLS handshake.
    #[arg(long, env = "PALISADE_TLS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    tls_handshake_timeout: std::time::Duration,
    /// TLS handshakes in progress at once on the API port; more wait their turn. Default: 4 per
    /// core.
    #[arg(long, env = "PALISADE_MAX_CONCURRENT_HANDSHAKES")]
    max_concurrent_handshakes: Option<usize>,
    /// Time for a request's headers, and for a connection's first request.
    #[arg(long, env = "PALISADE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: std::time::Duration,
    /// A connection with no request in flight this long is closed.
    #[arg(long, env = "PALISADE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// Log filter (tracing syntax), e.g. info or palisade_ca=debug.
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    log: String,
    /// Log format: json or plain.
    #[arg(long, env = "PALISADE_LOG_FORMAT", default_value = "plain", value_parser = ["json", "plain"])]
    log_format: String,
    /// Rotate the generated root and intermediate on schedule (auto) or only by hand (manual).
    #[arg(long, env = "PALISADE_ROTATION", default_value = "auto", value_parser = ["auto", "manual"])]
    rotation: String,
    /// Lifetime of a generated root.
    #[arg(long, env = "PALISADE_ROOT_LIFETIME", default_value = "3650d", value_parser = parse_duration)]
    root_lifetime: std::time::Duration,
    /// Lifetime of a generated intermediate (rotated automatically at half of it).
    #[arg(long, env = "PALISADE_INTERMEDIATE_LIFETIME", default_value = "365d", value_parser = parse_duration)]
    intermediate_lifetime: std::time::Duration,
    /// Rotate the root automatically at this percentage of its life.
    #[arg(long, env = "PALISADE_ROTATE_ROOT_AT", default_value_t = 80)]
    rotate_root_at: u8,
    /// How long a root rotation waits for every proxy to confirm the two-root bundle before it
    /// names the lagging ones (it keeps waiting).
    #[arg(long, env = "PALISADE_ROTATION_TRUST_DEADLINE", default_value = "1h", value_parser = parse_duration)]
    rotation_trust_deadline: std::time::Duration,
    /// Proxies told to renew early spread their requests over this window.
    #[arg(long, env = "PALISADE_ROTATION_RENEW_WINDOW", default_value = "5m", value_parser = parse_duration)]
    rotation_renew_window: std::time::Duration,
}

#[derive(Args)]
struct TokenArgs {
    /// State directory of the CA (holds the local issuer key).
    #[arg(long, env = "PALISADE_STATE_DIR")]
    state_dir: PathBuf,
    /// Namespace of the service account.
    #[arg(long)]
    namespace: String,
    /// Service account name.
    #[arg(long)]
    service_account: String,
    /// Pod name to put in the token's claims.
    #[arg(long)]
    pod: Option<String>,
    /// Token audience.
    #[arg(long, default_value = palisade_ca_api::wire::TOKEN_AUDIENCE)]
    audience: String,
    /// Token lifetime.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    ttl: std::time::Duration,
}

fn init_tracing(filter: &str, format: &str) -> anyhow::Result<()> {
    let format = format
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--log-format: {e}"))?;
    palisade_plumbing::logging::init(filter, format)
        .map_err(|e| anyhow::anyhow!("PALISADE_LOG/--log: {e}"))
}

fn serve_config(a: ServeArgs) -> anyhow::Result<ServeConfig> {
    let source = match a.source {
        SourceArg::File => MeshSource::File(
            a.mesh_file
                .context("--mesh-file is required with --source file")?,
        ),
        SourceArg::Kube => MeshSource::Kube,
    };
    let auth = match a.auth {
        AuthArg::Local => AuthMode::Local,
        AuthArg::Kube => AuthMode::Kube,
        AuthArg::Jwks => AuthMode::Jwks {
            issuer: a.jwks_issuer,
            source: match (a.jwks_file, a.jwks_url) {
                (Some(f), None) => JwksSource::File(f),
                (None, Some(url)) => JwksSource::Url {
                    url,
                    ca_file: a.jwks_ca_file,
                },
                _ => anyhow::bail!("--auth jwks needs --jwks-file FILE or --jwks-url URL"),
            },
        },
    };
    let keys = match (
        a.root_cert,
        a.root_key,
        a.intermediate_cert,
        a.intermediate_key,
        a.intermediate_chain,
    ) {
        (Some(cert), Some(key), None, _, _) => KeySource::ExternalRoot { cert, key },
        (None, None, Some(cert), Some(key), Some(chain)) => {
            KeySource::ExternalIntermediate { cert, key, chain }
        }
        (None, None, None, None, None) => KeySource::Generated,
        _ => anyhow::bail!(
            "give --root-cert with --root-key, or --intermediate-cert with --intermediate-key and --intermediate-chain"
        ),
    };
    let mut config = ServeConfig::embedded(a.state_dir, std::path::PathBuf::new());
    config.trust_domain = a.trust_domain;
    config.namespace = a.namespace;
    config.source = source;
    config.auth = auth;
    config.listen = a.listen;
    config.admin_listen = a.admin_listen;
    config.cert_ttl = a.cert_ttl;
    config.max_cert_ttl = a.max_cert_ttl;
    config.allow_short_ttl_for_testing = a.allow_short_ttl_for_testing;
    config.keys = keys;
    config.extra_trust_roots = a.extra_trust_roots;
    config.manage_injector_tls = a.manage_injector_tls;
    config.pod_name = a.pod_name;
    config.rate_limit_per_identity = a.rate_limit;
    config.rate_limit_burst = a.rate_limit_burst;
    config.source_rate_limit = a.source_rate_limit;
    config.source_rate_limit_burst = a.source_rate_limit_burst;
    config.connections.max_connections = a.max_connections;
    config.connections.max_connections_per_source = a.max_connections_per_source;
    config.connections.handshake_timeout = a.tls_handshake_timeout;
    if let Some(n) = a.max_concurrent_handshakes {
        config.connections.max_concurrent_handshakes = n;
    }
    config.connections.header_read_timeout = a.header_read_timeout;
    config.connections.idle_timeout = a.idle_timeout;
    let duration = |flag: &str, d: std::time::Duration| {
        time::Duration::try_from(d).map_err(|_| anyhow::anyhow!("{flag}: too long"))
    };
    config.rotation = palisade_ca::rotation::Settings {
        automatic: a.rotation == "auto",
        root_rotate_at_percent: a.rotate_root_at,
        lifetimes: palisade_ca::keys::Lifetimes {
            root: duration("--root-lifetime", a.root_lifetime)?,
            intermediate: duration("--intermediate-lifetime", a.intermediate_lifetime)?,
        },
        trust_deadline: duration("--rotation-trust-deadline", a.rotation_trust_deadline)?,
        renew_window: duration("--rotation-renew-window", a.rotation_renew_window)?,
        ..Default::default()
    };
    config.default_policy = a
        .default_policy
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--default-policy: {e}"))?;
    Ok(config)
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    palisade_ca_api::tls::install_default_provider();
    match Cli::parse().command {
        Command::Serve(args) => {
            init_tracing(&args.log, &args.log_format)?;
            let config = serve_config(*args)?;
            if config.allow_short_ttl_for_testing {
                tracing::warn!(
                    "--allow-short-ttl-for-testing is set: certificates may live less than 5 minutes; never use this in production"
                );
            }
            let running = palisade_ca::server::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            running.shutdown().await;
            Ok(())
        }
        Command::Token(t) => {
            let issuer = LocalIssuer::load_or_create(&t.state_dir)?;
            let token = issuer
                .mint(
                    &t.namespace,
                    &t.service_account,
                    t.pod.as_deref(),
                    &t.audience,
                    t.ttl,
                )
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        Command::Crd => {
            print!("{}", palisade_ca::kube::crd::crd_yaml());
            Ok(())
        }
        Command::Bundle { state_dir } => {
            print!("{}", rotation_cli::bundle_pem(&state_dir)?);
            Ok(())
        }
        Command::Rotate(command) => rotate(command),
    }
}

fn rotate(command: RotateCommand) -> anyhow::Result<()> {
    use palisade_ca::rotation::Kind;
    match command {
        RotateCommand::Root {
            emergency: true,
            state_dir,
            trust_domain,
            ..
        } => {
            let dir = state_dir.context("--emergency needs --state-dir")?;
            let pem = rotation_cli::emergency_root(&dir, &trust_domain, &Default::default())?;
            let root = palisade_ca_api::cert::parse_pem_certs(&pem)?;
            println!(
                "new root {} in {}\nnext: start the CA, publish the new bundle (`palisade-ca bundle --state-dir {}` into the palisade-trust-anchors ConfigMaps), and proxies recover as docs/rotation.md (Emergency) describes",
                palisade_ca_api::cert::sha256_fingerprint(&root[0]),
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        RotateCommand::Root {
            admin,
            from_cert: Some(cert),
            from_key: Some(key),
            ..
        } => started(
            Kind::Root,
            rotation_cli::post_root_files(admin.admin_addr, &cert, &key)?,
        ),
        RotateCommand::Root { admin, .. } => {
            started(Kind::Root, rotation_cli::post(admin.admin_addr, "root")?)
        }
        RotateCommand::Intermediate {
            admin,
            from_cert: Some(cert),
            from_key: Some(key),
            chain: Some(chain),
        } => {
            let status =
                rotation_cli::post_intermediate_files(admin.admin_addr, &cert, &key, &chain)?;
            // A new root makes it a root rotation.
            let kind = match status.kind.as_deref() {
                Some("root") => Kind::Root,
                _ => Kind::Intermediate,
            };
            started(kind, status)
        }
        RotateCommand::Intermediate { admin, .. } => started(
            Kind::Intermediate,
            rotation_cli::post(admin.admin_addr, "intermediate")?,
        ),
        RotateCommand::Abort { admin } => {
            let status = rotation_cli::post(admin.admin_addr, "abort")?;
            println!(
                "root rotation abandoned: phase {}, trusted roots {}",
                status.phase,
                status.trusted_roots.join(", ")
            );
            Ok(())
        }
        RotateCommand::Status { admin, json, wait } => {
            let status = match wait {
                Some(wait) => rotation_cli::wait_idle(admin.admin_addr, wait)?,
                None => rotation_cli::status(admin.admin_addr)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", rotation_cli::describe(&status));
            }
            if status.phase != "idle" {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn started(
    kind: palisade_ca::rotation::Kind,
    status: palisade_ca::rotation::RotationStatus,
) -> anyhow::Result<()> {
    println!("rotation started: phase {}", status.phase);
    match kind {
        palisade_ca::rotation::Kind::Root => {
            let new_root = status
                .trusted_roots
                .iter()
                .find(|r| **r != status.issuing_root)
                .unwrap_or(&status.issuing_root);
            println!("new root (SHA-256): {new_root}");
        }
        palisade_ca::rotation::Kind::Intermediate => {
            println!(
                "new intermediate (SHA-256): {}",
                status.issuing_intermediate
            );
        }
    }
    println!("follow it with: palisade-ca rotate status --wait 1h");
    Ok(())
}
