//! `palisade demo`: the whole mesh on this machine, in this process, with no cluster and no
//! root. A CA on a mesh file, three meshed workloads with their proxies, an app, and a
//! plaintext caller; allowed and denied calls, a policy change, a live certificate rotation,
//! and a report built from what the proxies logged and counted. Everything runs on one tokio
//! runtime, so nothing outlives the command.

mod capture;
mod least_privilege;
mod progress;
mod report;
mod rotation;
mod traffic;
mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

use capture::{POLICY_TARGET, PolicyEvents};
use progress::Progress;
use report::{CallRow, Report, decisions_line, total};
use rotation::{intermediate_rotation, rotation};
use traffic::{Outcome, admin_get, get};
use world::{API, API_2, API_SERVICE, INTRUDER, OUTSIDER_IP, WEB, World};

/// Short enough that the proxies renew during the demo (at 8 to 12 s).
const CERT_TTL: Duration = Duration::from_secs(20);
/// How long a proxy may take to log its decision on a call.
const DECISION_WAIT: Duration = Duration::from_secs(2);
/// The control plane's promise: a change reaches the proxies within a second. Allow slack.
const POLICY_CHANGE_WAIT: Duration = Duration::from_secs(5);
/// Requests keep going this long once both certificates have been renewed.
const AFTER_ROTATION: Duration = Duration::from_secs(1);

const MODE: &str = "\
mode: explicit destinations over loopback, no capture. Transparent capture (iptables) needs root
      and network namespaces; here each proxy is told where its outbound connections go
      (PALISADE_OUTBOUND_DESTINATION) and which app port its inbound ones are for
      (PALISADE_INBOUND_FORWARD_PORT), and each workload has its own 127.0.10.x address as its
      pod IP. The callers' apps connect to the Service shop/api at 127.0.96.10:80 (its
      clusterIP); their proxies balance over its two replicas themselves. The same mesh with
      capture and kube-proxy's DNAT, in network-namespace pods: `cargo test --test mesh_netns
      --test services_netns --test services_failover_netns` as root (docs/whole-system-tests.md).";

pub fn run() -> ExitCode {
    let started = Instant::now();
    palisade_ca_api::tls::install_default_provider();
    let dir = match tempfile::Builder::new().prefix("palisade-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("palisade demo: cannot make a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = dir.path().join("demo.log");
    let events = PolicyEvents::default();
    if let Err(e) = init_tracing(&log, events.clone()) {
        eprintln!("palisade demo: {e:#}");
        return ExitCode::FAILURE;
    }
    println!(
        "Palisade demo: a CA, four meshed workloads (two behind a Service) and a plaintext caller on this machine, no cluster."
    );
    println!("{MODE}\n");
    let progress = Progress::new();
    let result = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let result = rt.block_on(async {
                tokio::select! {
                    result = scenario(dir.path(), &events, &progress) => Some(result),
                    _ = tokio::signal::ctrl_c() => None,
                }
            });
            // Whatever a failure or an interruption left behind stops with the runtime.
            rt.shutdown_timeout(Duration::from_secs(2));
            result
        }
        Err(e) => Some(Err(anyhow!("cannot start the async runtime: {e}"))),
    };
    progress.clear();
    match result {
        None => {
            eprintln!("palisade demo: interrupted; everything it started has stopped");
            ExitCode::from(130)
        }
        Some(Ok(report)) => {
            println!("{report}");
            println!(
                "Finished in {:.1}s. Everything behaved as expected.",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            let kept = dir.keep();
            eprintln!("palisade demo: FAILED: {e:#}");
            eprintln!(
                "  the CA's and the proxies' logs: {}",
                kept.join("demo.log").display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Logs go to a file (the terminal shows only the progress line and the report); the policy
/// events are also kept in memory for the report.
fn init_tracing(log: &Path, events: PolicyEvents) -> anyhow::Result<()> {
    let file = std::fs::File::create(log)
        .with_context(|| format!("cannot create the log file {}", log.display()))?;
    let to_file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(Arc::new(file))
        .with_filter(tracing_subscriber::EnvFilter::new(format!(
            "info,{POLICY_TARGET}=debug"
        )));
    let captured = events.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target(POLICY_TARGET, tracing::Level::DEBUG),
    );
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(to_file).with(captured),
    )
    .context("cannot install the log subscriber")
}

async fn scenario(
    dir: &Path,
    events: &PolicyEvents,
    progress: &Progress,
) -> anyhow::Result<Report> {
    progress
        .step("starting the CA, the api app and the proxies of shop/web, shop/api-1, shop/api-2, shop/intruder");
    let world = World::start(dir, CERT_TTL).await?;
    let exercised = exercise(&world, events, progress).await;
    progress.step("stopping the proxies (drain), the CA and the app");
    let addrs = world.shutdown().await;
    let mut report = exercised?;
    let open = still_listening(&addrs).await;
    if !open.is_empty() {
        bail!("still accepting connections after the shutdown: {open:?}");
    }
    report.totals.push(format!(
        "stopped: the CA, 4 proxies and the app; all {} listeners closed",
        addrs.len()
    ));
    Ok(report)
}

/// A call to shop/api and what it must lead to, as the api's proxy decides it.
struct Call {
    /// What the progress line says meanwhile.
    step: &'static str,
    caller: String,
    /// The caller's own address, and where it connects (its proxy, or the api's directly).
    from: Ipv4Addr,
    to: SocketAddr,
    /// The identity the api's proxy must see: a SPIFFE ID, or `unauthenticated`.
    identity: String,
    result: &'static str,
    reason: &'static str,
    /// The policy that must decide: `namespace/name`, or `default:<policy>`.
    policy: String,
}

impl Call {
    async fn make(&self) -> Outcome {
        get(Some(self.from), self.to, "/orders").await
    }
}

async fn exercise(
    world: &World,
    events: &PolicyEvents,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let mut report = Report {
        mesh: mesh_rows(world),
        cert_ttl_seconds: world.cert_ttl.as_secs(),
        ..Report::default()
    };
    let api_port = world.app.addr.port();
    let calls = [
        Call {
            step: "shop/web calls shop/api: mTLS between their proxies, then policy",
            caller: WEB.name(),
            from: WEB.ip,
            to: world.web.bound.outbound,
            identity: WEB.spiffe_id(),
            result: "allow",
            reason: "rule_matched",
            policy: demo_policy(),
        },
        Call {
            step: "shop/intruder calls shop/api: a valid mesh identity the policy does not list",
            caller: INTRUDER.name(),
            from: INTRUDER.ip,
            to: world.intruder.bound.outbound,
            identity: INTRUDER.spiffe_id(),
            result: "deny",
            reason: "no_rule_matched",
            policy: demo_policy(),
        },
        Call {
            step: "a plaintext caller with no proxy calls shop/api's proxy",
            caller: format!("outsider {OUTSIDER_IP}"),
            from: OUTSIDER_IP,
            to: world.api.bound.inbound,
            identity: "unauthenticated".into(),
            result: "deny",
            reason: "plaintext_not_allowed",
            policy: demo_policy(),
        },
    ];
    for call in &calls {
        progress.step(call.step);
        let mark = events.mark();
        let outcome = call.make().await;
        report
            .calls
            .push(check(events, mark, api_port, call, &outcome).await?);
    }
    report.service = spread(world, events, progress, api_port).await?;

    let (row, took) = policy_change(world, events, progress, api_port).await?;
    report.calls.push(row);
    report.policy_change = Some(format!(
        "the last call came after editing the mesh file's policy to list shop/intruder: applied to the api's proxy in {:.1}s",
        took.as_secs_f64()
    ));

    let (lines, rows) =
        least_privilege::observe_suggest_enforce(world, events, progress, api_port).await?;
    report.least_privilege = lines;
    report.least_privilege_calls = rows;

    let (rotations, traffic) = rotation(world, progress).await?;
    report.rotations = rotations;
    report.traffic = traffic;
    report.ca_rotation = Some(intermediate_rotation(world, progress).await?);

    progress.step("reading the proxies' and the CA's /metrics");
    report.totals = totals(world).await?;
    Ok(report)
}

/// Checks a call's outcome against the decision the api's proxy logged after `mark`.
async fn check(
    events: &PolicyEvents,
    mark: usize,
    api_port: u16,
    expected: &Call,
    outcome: &Outcome,
) -> anyhow::Result<CallRow> {
    let replicas = [API.workload(), API_2.workload()];
    let event = events
        .wait_for(mark, DECISION_WAIT, |e| {
            replicas.contains(&e.target) && e.caller == expected.identity
        })
        .await
        .ok_or_else(|| {
            anyhow!(
                "{} → shop/api: the api's proxy logged no decision about {} within {DECISION_WAIT:?} (the caller saw: {outcome})",
                expected.caller,
                expected.identity
            )
        })?;
    if event.result != expected.result
        || event.reason != expected.reason
        || event.policy != expected.policy
    {
        bail!(
            "{} → shop/api: expected {} ({}) by {}, but the api's proxy decided {} ({}) by {}",
            expected.caller,
            expected.result,
            expected.reason,
            expected.policy,
            event.result,
            event.reason,
            event.policy
        );
    }
    if event.port != api_port {
        bail!(
            "{} → shop/api: the decision was for port {}, not the app's port {api_port}",
            expected.caller,
            event.port
        );
    }
    // An audit-mode would-deny lets the connection through.
    let answered = outcome.is_ok();
    if answered != (expected.result != "deny") {
        bail!(
            "{} → shop/api: the api's proxy decided {}, but the caller saw {outcome}",
            expected.caller,
            event.result
        );
    }
    Ok(CallRow::new(&expected.caller, &event, outcome))
}

/// How many calls show the Service's balancing.
const SPREAD_CALLS: usize = 20;

/// shop/web calls the Service shop/api on new connections; each replica's proxy must have
/// decided some of them, all allowed by the policy. Returns the report's Service lines.
async fn spread(
    world: &World,
    events: &PolicyEvents,
    progress: &Progress,
    api_port: u16,
) -> anyhow::Result<Vec<String>> {
    progress.step(
        "shop/web calls the Service shop/api 20 times: its proxy balances over api-1 and api-2",
    );
    let mark = events.mark();
    for i in 0..SPREAD_CALLS {
        let outcome = get(Some(WEB.ip), world.web.bound.outbound, "/orders").await;
        if !outcome.is_ok() {
            bail!("call {i} of shop/web to the Service shop/api failed: {outcome}");
        }
    }
    let replicas = [API.workload(), API_2.workload()];
    // Decisions are logged as the calls are made; wait for them all to be seen.
    events
        .wait_for_count(mark, DECISION_WAIT, SPREAD_CALLS, |e| {
            replicas.contains(&e.target) && e.caller == WEB.spiffe_id()
        })
        .await;
    let mut lines = Vec::new();
    for replica in &replicas {
        let decided = |e: &capture::PolicyEvent| {
            e.target == *replica && e.caller == WEB.spiffe_id() && e.port == api_port
        };
        let seen = events.since(mark, decided);
        if seen.is_empty() {
            bail!(
                "none of {SPREAD_CALLS} calls to the Service shop/api reached {replica}: the caller's proxy did not balance"
            );
        }
        let allowed = seen.iter().filter(|e| e.result == "allow").count();
        if allowed != seen.len() {
            bail!("{replica} denied shop/web on some calls through the Service");
        }
        lines.push(format!(
            "{replica}: {} of {SPREAD_CALLS} calls, each ALLOW by {} ({})",
            seen.len(),
            seen[0].policy,
            seen[0].reason
        ));
    }
    let picks = admin_get(world.web.bound.admin, "/metrics")
        .await
        .map_err(|e| anyhow!(e))?;
    lines.push(format!(
        "shop/web's proxy carried {} connections to the Service over mTLS, {} in plaintext",
        total(
            &picks,
            "palisade_service_connections_total",
            &[("dst_service", "shop/api"), ("outcome", "mtls")]
        ),
        total(
            &picks,
            "palisade_service_connections_total",
            &[("dst_service", "shop/api"), ("outcome", "plaintext")]
        ),
    ));
    Ok(lines)
}

/// Lets shop/intruder in by editing the mesh file, and measures how soon a call gets through.
async fn policy_change(
    world: &World,
    events: &PolicyEvents,
    progress: &Progress,
    api_port: u16,
) -> anyhow::Result<(CallRow, Duration)> {
    let expected = Call {
        step: "policy change: the mesh file now lets shop/intruder call shop/api",
        caller: INTRUDER.name(),
        from: INTRUDER.ip,
        to: world.intruder.bound.outbound,
        identity: INTRUDER.spiffe_id(),
        result: "allow",
        reason: "rule_matched",
        policy: demo_policy(),
    };
    progress.step(expected.step);
    world.allow_callers(&[&WEB.name(), &INTRUDER.name()])?;
    until_decided(events, api_port, &expected).await
}

/// `namespace/name` of the policy the demo starts with.
fn demo_policy() -> String {
    format!("{}/{}", world::NAMESPACE, world::POLICY)
}

/// Calls after a change until an api replica's proxy decides as `expected` says (the change
/// takes a moment to reach each proxy), then checks that call. Returns its row and how long
/// the change took to apply.
async fn until_decided(
    events: &PolicyEvents,
    api_port: u16,
    expected: &Call,
) -> anyhow::Result<(CallRow, Duration)> {
    let changed = Instant::now();
    let replicas = [API.workload(), API_2.workload()];
    loop {
        let mark = events.mark();
        let outcome = expected.make().await;
        let decided = events
            .wait_for(mark, DECISION_WAIT, |e| {
                replicas.contains(&e.target) && e.caller == expected.identity
            })
            .await;
        if let Some(e) = &decided
            && e.result == expected.result
            && e.policy == expected.policy
        {
            let row = check(events, mark, api_port, expected, &outcome).await?;
            return Ok((row, changed.elapsed()));
        }
        if changed.elapsed() > POLICY_CHANGE_WAIT {
            let last = decided.map_or("no decision logged".to_owned(), |e| {
                format!("{} ({}) by {}", e.result, e.reason, e.policy)
            });
            bail!(
                "{}: the change did not reach shop/api's proxies within {POLICY_CHANGE_WAIT:?}: the last call was decided {last}, not {} by {}; the caller saw {outcome}",
                expected.caller,
                expected.result,
                expected.policy
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn totals(world: &World) -> anyhow::Result<Vec<String>> {
    let metrics = |addr| async move { admin_get(addr, "/metrics").await.map_err(|e| anyhow!(e)) };
    let mut decided = Vec::new();
    for p in world.replicas() {
        let m = metrics(p.bound.admin).await?;
        decided.push(format!(
            "{}'s proxy decided: {}",
            p.workload.workload(),
            decisions_line(&m)
        ));
    }
    let ca = metrics(world.ca.admin_addr).await?;
    let mut renewals = Vec::new();
    let mut failed_renewals = 0;
    for p in world.proxies() {
        let m = metrics(p.bound.admin).await?;
        // The first certificate is counted too: renewals are the ones after it.
        let obtained = total(&m, "palisade_certificate_rotations_total", &[]);
        renewals.push(format!("{} {}", p.workload.pod, obtained.saturating_sub(1)));
        failed_renewals += total(&m, "palisade_certificate_rotation_failures_total", &[]);
    }
    decided.push(format!(
            "the CA issued {} certificates; renewals by proxy: {}; failed certificate requests: {failed_renewals}",
            total(&ca, "palisade_ca_certificates_issued_total", &[]),
            renewals.join(", ")
    ));
    Ok(decided)
}

fn mesh_rows(world: &World) -> Vec<[String; 4]> {
    let sends = |_: &world::Proxy| format!("proxy → Service {API_SERVICE}");
    let replica = |w: world::Workload, p: &world::Proxy| {
        [
            w.workload(),
            w.ip.to_string(),
            w.spiffe_id(),
            format!("proxy {} → app {}", p.bound.inbound, world.app.addr),
        ]
    };
    vec![
        [
            WEB.workload(),
            WEB.ip.to_string(),
            WEB.spiffe_id(),
            sends(&world.web),
        ],
        replica(API, &world.api),
        replica(API_2, &world.api_2),
        [
            INTRUDER.workload(),
            INTRUDER.ip.to_string(),
            INTRUDER.spiffe_id(),
            sends(&world.intruder),
        ],
        [
            "Service shop/api".into(),
            API_SERVICE.to_string(),
            "none: an address, not a pod".into(),
            "endpoints: api-1 and api-2 (their proxies)".into(),
        ],
        [
            "outsider".into(),
            OUTSIDER_IP.to_string(),
            "none".into(),
            format!("no proxy: plaintext → {}", world.api.bound.inbound),
        ],
        [
            "palisade-ca".into(),
            world.ca.api_addr.ip().to_string(),
            "palisade-ca.palisade-system.svc".into(),
            format!("API {}: mesh file, local tokens", world.ca.api_addr),
        ],
    ]
}

/// The addresses that still accept a connection.
async fn still_listening(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut open = Vec::new();
    for &a in addrs {
        let connect = tokio::net::TcpStream::connect(a);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
            open.push(a);
        }
    }
    open
}
