//! The CA's Prometheus metrics, rendered as text on the admin port.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_plumbing::conn_gate::{ConnectionStats, LogThrottle};
use palisade_plumbing::metrics::{CounterFamily, Exposition, Histogram, Kind};

use crate::rotation::Phase;

/// Upper bounds of the issuance latency histogram, in seconds.
static LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The pods of one opted-in namespace that run without the proxy, by why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodCounts {
    /// Should have the proxy and do not.
    pub unmeshed: u64,
    /// Opted out with `palisade.dev/inject=disabled`.
    pub opted_out: u64,
    /// Share the node's network; the injector skips them by design.
    pub host_network: u64,
}

pub struct Metrics {
    issued: CounterFamily,
    refused: CounterFamily,
    latency: Histogram,
    mesh_reloads_ok: AtomicU64,
    mesh_reloads_failed: AtomicU64,
    mesh_last_reload_ok: AtomicI64,
    watch_streams: AtomicI64,
    kube_watch_errors: CounterFamily,
    intermediate_not_after: AtomicI64,
    /// What the API port's connection bounds did.
    pub api_connections: Arc<ConnectionStats>,
    /// API connections whose TLS handshake waits for its turn.
    pub api_handshakes_waiting: AtomicI64,
    /// What the admin port's connection bounds did.
    pub admin_connections: Arc<ConnectionStats>,
    source_limited: AtomicU64,
    source_limited_log: LogThrottle,
    root_not_after: AtomicI64,
    /// Index into `Phase::ALL`.
    rotation_phase: AtomicU64,
    rotation_transitions: CounterFamily,
    proxies_lagging: AtomicI64,
    /// Unix seconds; `i64::MIN` while no proxy has reported.
    mesh_expiry: AtomicI64,
    /// Unix seconds; 0 while the CA does not manage the injector's certificate.
    injector_cert_not_after: AtomicI64,
    /// By opted-in namespace; a namespace that leaves the opt-in leaves this map.
    pod_counts: Mutex<BTreeMap<String, PodCounts>>,
    unmeshed_scan_errors: CounterFamily,
}

impl Metrics {
    pub fn new(intermediate_not_after_unix: i64) -> Self {
        Metrics {
            issued: CounterFamily::default(),
            refused: CounterFamily::default(),
            latency: Histogram::new(&LATENCY_BUCKETS),
            mesh_reloads_ok: AtomicU64::new(0),
            mesh_reloads_failed: AtomicU64::new(0),
            mesh_last_reload_ok: AtomicI64::new(1),
            watch_streams: AtomicI64::new(0),
            kube_watch_errors: CounterFamily::default(),
            intermediate_not_after: AtomicI64::new(intermediate_not_after_unix),
            api_connections: Arc::new(ConnectionStats::new("api")),
            api_handshakes_waiting: AtomicI64::new(0),
            admin_connections: Arc::new(ConnectionStats::new("admin")),
            source_limited: AtomicU64::new(0),
            source_limited_log: LogThrottle::default(),
            root_not_after: AtomicI64::new(0),
            rotation_phase: AtomicU64::new(0),
            rotation_transitions: CounterFamily::default(),
            proxies_lagging: AtomicI64::new(0),
            mesh_expiry: AtomicI64::new(i64::MIN),
            injector_cert_not_after: AtomicI64::new(0),
            pod_counts: Mutex::default(),
            unmeshed_scan_errors: CounterFamily::default(),
        }
    }

    /// The rotation's phase and the expiry of what signs now (Unix seconds).
    pub fn set_keys(&self, phase: Phase, root_not_after: i64, intermediate_not_after: i64) {
        let index = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.rotation_phase.store(index as u64, Ordering::Relaxed);
        self.root_not_after.store(root_not_after, Ordering::Relaxed);
        self.intermediate_not_after
            .store(intermediate_not_after, Ordering::Relaxed);
    }

    /// What the proxies report: how many lag the bundle, and when the first certificate of
    /// the fleet runs out.
    pub fn set_fleet(&self, lagging: usize, mesh_expiry: Option<i64>) {
        self.proxies_lagging
            .store(lagging as i64, Ordering::Relaxed);
        self.mesh_expiry
            .store(mesh_expiry.unwrap_or(i64::MIN), Ordering::Relaxed);
    }

    pub fn rotation_transition(&self, kind: &'static str, to: &'static str) {
        self.rotation_transitions
            .add(&[("kind", kind), ("to", to)], 1);
    }

    pub fn issued(&self, authenticator: &'static str, took: Duration) {
        self.issued.add(&[("authenticator", authenticator)], 1);
        self.latency.observe(took);
    }

    pub fn refused(&self, code: &'static str) {
        self.refused.add(&[("code", code)], 1);
    }

    /// A request from `source` was refused before its token was checked: the address failed
    /// too many checks. Counted, and logged at most every 10 s.
    pub fn source_limited(&self, source: &str) {
        self.source_limited.fetch_add(1, Ordering::Relaxed);
        if let Some(skipped) = self
            .source_limited_log
            .allow("source_rate_limited", std::time::Instant::now())
        {
            tracing::warn!(
                peer.ip = source,
                skipped,
                "certificate request refused before its token was checked: too many failed token checks from this address"
            );
        }
    }

    pub fn mesh_reload(&self, ok: bool) {
        let counter = if ok {
            &self.mesh_reloads_ok
        } else {
            &self.mesh_reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.mesh_last_reload_ok.store(ok as i64, Ordering::Relaxed);
    }

    /// A Kubernetes watch of `kind` failed (it is retried with backoff).
    pub fn kube_watch_error(&self, kind: &'static str) {
        self.kube_watch_errors.add(&[("kind", kind)], 1);
    }

    fn pod_counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodCounts>> {
        self.pod_counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the last scan of an opted-in namespace found.
    pub fn set_pod_counts(&self, namespace: &str, counts: PodCounts) {
        self.pod_counts().insert(namespace.to_owned(), counts);
    }

    /// Drops the series of namespaces no longer opted in.
    pub fn keep_pod_counts_of(&self, namespaces: &BTreeSet<String>) {
        self.pod_counts().retain(|ns, _| namespaces.contains(ns));
    }

    /// The not-after of the injector's serving certificate in its Secret (Unix seconds).
    pub fn set_injector_cert_expiry(&self, not_after: i64) {
        self.injector_cert_not_after
            .store(not_after, Ordering::Relaxed);
    }

    /// A step of the unmeshed-pod scan failed (`list_pods`, `create_event`); retried next scan.
    pub fn unmeshed_scan_error(&self, step: &'static str) {
        self.unmeshed_scan_errors.add(&[("step", step)], 1);
    }

    pub fn watch_opened(&self) {
        self.watch_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_closed(&self) {
        self.watch_streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn render(&self, now_unix: i64) -> String {
        let mut out = Exposition::new();
        self.issued.encode(
            &mut out,
            "palisade_ca_certificates_issued_total",
            "Certificates issued, by authenticator.",
        );
        self.refused.encode(
            &mut out,
            "palisade_ca_requests_refused_total",
            "Requests refused, by error code.",
        );
        self.latency.encode(
            &mut out,
            "palisade_ca_issuance_duration_seconds",
            "Time to authenticate, check and sign one request.",
        );
        let expiry = self.intermediate_not_after.load(Ordering::Relaxed) - now_unix;
        out.single(
            "palisade_ca_intermediate_expiry_seconds",
            Kind::Gauge,
            "Seconds until the issuing intermediate expires.",
            expiry,
        );
        let intermediate = self.intermediate_not_after.load(Ordering::Relaxed);
        out.single(
            "palisade_ca_intermediate_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the issuing intermediate expires (Unix seconds).",
            intermediate,
        );
        out.single(
            "palisade_ca_root_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the root behind the issuing intermediate expires (Unix seconds).",
            self.root_not_after.load(Ordering::Relaxed),
        );
        let phase = "palisade_ca_rotation_phase";
        let current = self.rotation_phase.load(Ordering::Relaxed) as usize;
        let family = out.family(
            phase,
            Kind::Gauge,
            "1 for the phase the root and intermediate rotation is in, 0 for the others.",
        );
        for (i, p) in Phase::ALL.iter().enumerate() {
            family.sample(phase, &[("phase", p.as_str())], (i == current) as u64);
        }
        self.rotation_transitions.encode(
            &mut out,
            "palisade_ca_rotation_transitions_total",
            "Moves of a rotation into a phase, by kind (root or intermediate) and phase.",
        );
        out.single(
            "palisade_ca_rotation_proxies_lagging",
            Kind::Gauge,
            "Proxies holding a current certificate that do not yet trust every root of the bundle.",
            self.proxies_lagging.load(Ordering::Relaxed),
        );
        let mesh_expiry = self.mesh_expiry.load(Ordering::Relaxed);
        if mesh_expiry != i64::MIN {
            out.single(
                "palisade_mesh_expiry_seconds",
                Kind::Gauge,
                "How long the mesh keeps working if the CA stays down from now: until the first proxy's current certificate expires.",
                mesh_expiry - now_unix,
            );
        }
        let injector = self.injector_cert_not_after.load(Ordering::Relaxed);
        if injector != 0 {
            out.single(
                "palisade_ca_injector_cert_expiry_timestamp_seconds",
                Kind::Gauge,
                "When the injector's serving certificate, issued by this CA, expires (Unix seconds).",
                injector,
            );
        }
        let reloads = "palisade_ca_mesh_reloads_total";
        out.family(reloads, Kind::Counter, "Mesh source reloads, by result.")
            .sample(
                reloads,
                &[("result", "ok")],
                self.mesh_reloads_ok.load(Ordering::Relaxed),
            )
            .sample(
                reloads,
                &[("result", "rejected")],
                self.mesh_reloads_failed.load(Ordering::Relaxed),
            );
        out.single(
            "palisade_ca_mesh_last_reload_ok",
            Kind::Gauge,
            "1 when the last mesh reload was accepted, 0 when the last good state is being served.",
            self.mesh_last_reload_ok.load(Ordering::Relaxed),
        );
        out.single(
            "palisade_ca_watch_streams",
            Kind::Gauge,
            "Open mesh watch streams.",
            self.watch_streams.load(Ordering::Relaxed),
        );
        self.kube_watch_errors.encode(
            &mut out,
            "palisade_ca_kube_watch_errors_total",
            "Failed Kubernetes watches (retried with backoff; the last good state is kept), by kind.",
        );
        self.encode_pod_counts(&mut out);
        out.single(
            "palisade_ca_source_rate_limited_total",
            Kind::Counter,
            "Certificate requests refused before their token was checked: the source address failed too many token checks.",
            self.source_limited.load(Ordering::Relaxed),
        );
        self.api_connections.encode(&mut out, "palisade_ca_api");
        out.single(
            "palisade_ca_api_handshakes_waiting",
            Kind::Gauge,
            "API connections accepted whose TLS handshake waits for its turn (at most --max-concurrent-handshakes are in progress).",
            self.api_handshakes_waiting.load(Ordering::Relaxed),
        );
        self.admin_connections.encode(&mut out, "palisade_ca_admin");
        out.finish()
    }

    fn encode_pod_counts(&self, out: &mut Exposition) {
        let counts = self.pod_counts();
        let unmeshed = "palisade_unmeshed_pods";
        out.family(
            unmeshed,
            Kind::Gauge,
            "Pods running without the proxy in a namespace that opted in (each gets an Unmeshed Event), by namespace.",
        );
        for (namespace, c) in counts.iter() {
            out.sample(unmeshed, &[("namespace", namespace)], c.unmeshed);
        }
        let opted_out = "palisade_opted_out_pods";
        out.family(
            opted_out,
            Kind::Gauge,
            "Pods outside the mesh on purpose in a namespace that opted in, by namespace and reason (opted_out: palisade.dev/inject=disabled; host_network).",
        );
        for (namespace, c) in counts.iter() {
            out.sample(
                opted_out,
                &[("namespace", namespace), ("reason", "opted_out")],
                c.opted_out,
            );
            out.sample(
                opted_out,
                &[("namespace", namespace), ("reason", "host_network")],
                c.host_network,
            );
        }
        drop(counts);
        self.unmeshed_scan_errors.encode(
            out,
            "palisade_ca_unmeshed_scan_errors_total",
            "Failed steps of the unmeshed-pod scan (kept counts, retried at the next scan), by step (list_pods, create_event).",
        );
    }
}
