//! Counters and gauges, rendered as Prometheus text. Label values come from small fixed sets
//! (directions, reasons, results), so the label maps stay bounded.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use palisade_plumbing::metrics::{CounterFamily, Exposition, Kind};

/// Distinct caller identities named per port in `palisade_inbound_connections_total`; later
/// ones are counted as `other`.
pub const MAX_CLIENT_LABELS_PER_PORT: usize = 32;
/// Distinct ports named in `palisade_inbound_connections_total` (a caller can reach any port
/// the capture redirects); later ones are counted as `other`.
pub const MAX_PORT_LABELS: usize = 64;

/// Distinct Services named in metric labels; later ones are counted as `other`.
pub const MAX_SERVICE_LABELS: usize = palisade_ca_api::wire::MAX_WATCH_DESTINATIONS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    opened: CounterFamily,
    closed: CounterFamily,
    active: [AtomicI64; 2],
    tunnels_opened: CounterFamily,
    tunnels_active: [AtomicI64; 2],
    bytes: CounterFamily,
    handshake_failures: CounterFamily,
    decisions: CounterFamily,
    plaintext_inbound: CounterFamily,
    refused: CounterFamily,
    service_connections: CounterFamily,
    endpoint_failures: CounterFamily,
    balancer_picks: CounterFamily,
    /// The Service names used as label values so far: at most [`MAX_SERVICE_LABELS`].
    service_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    inbound_by_client: CounterFamily,
    /// The ports, and per port the callers, used as label values so far.
    client_labels:
        std::sync::Mutex<std::collections::HashMap<u16, std::collections::HashSet<String>>>,
    cert_not_after: AtomicI64,
    rotations: AtomicU64,
    rotation_failures: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn connection_opened(&self, d: Direction) {
        self.opened.add(&[("direction", d.as_str())], 1);
        self.active[d.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, d: Direction) {
        self.closed.add(&[("direction", d.as_str())], 1);
        self.active[d.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn active(&self, d: Direction) -> i64 {
        self.active[d.index()].load(Ordering::Relaxed)
    }

    /// A pooled tunnel was made (outbound: its TLS handshake; inbound: accepted).
    pub fn tunnel_opened(&self, d: Direction) {
        self.tunnels_opened.add(&[("direction", d.as_str())], 1);
        self.tunnels_active[d.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tunnel_closed(&self, d: Direction) {
        self.tunnels_active[d.index()].fetch_sub(1, Ordering::Relaxed);
    }

    /// Tunnels made so far in a direction (each one TLS handshake).
    pub fn tunnels_opened(&self, d: Direction) -> u64 {
        self.tunnels_opened.get(&[("direction", d.as_str())])
    }

    pub fn tunnels_active(&self, d: Direction) -> i64 {
        self.tunnels_active[d.index()].load(Ordering::Relaxed)
    }

    /// `flow` is `to_upstream` (what the accepted side sent) or `to_downstream`.
    pub fn bytes(&self, d: Direction, flow: &'static str, n: u64) {
        if n > 0 {
            self.bytes
                .add(&[("direction", d.as_str()), ("flow", flow)], n);
        }
    }

    pub fn handshake_failed(&self, d: Direction, reason: &str) {
        self.handshake_failures
            .add(&[("direction", d.as_str()), ("reason", reason)], 1);
    }

    pub fn decision(&self, result: &str, reason: &str) {
        self.decisions
            .add(&[("result", result), ("reason", reason)], 1);
    }

    /// One inbound connection from `client` (a SPIFFE ID or `unauthenticated`) to `port`, and
    /// the decision (`allow`, `deny`, `audit_deny`): what `palisade policy suggest` reads. The
    /// first [`MAX_CLIENT_LABELS_PER_PORT`] callers of each of the first [`MAX_PORT_LABELS`]
    /// ports are named; the rest are `other`, so a scan of every port by every identity stays
    /// bounded. Only an admitted connection claims a port: a denied scan of many ports is
    /// counted under `other` and cannot crowd out the ports really in use (a denied caller of
    /// a port in use is still named, while that port has room).
    pub fn inbound_connection(&self, client: &str, port: u16, decision: &str) {
        let admitted = decision != "deny";
        let (client, port) = {
            let mut labels = self.client_labels.lock().unwrap_or_else(|e| e.into_inner());
            if !labels.contains_key(&port) && (!admitted || labels.len() >= MAX_PORT_LABELS) {
                ("other".to_owned(), "other".to_owned())
            } else {
                let callers = labels.entry(port).or_default();
                let named = callers.contains(client) || callers.len() < MAX_CLIENT_LABELS_PER_PORT;
                if named {
                    callers.insert(client.to_owned());
                }
                let client = if named { client } else { "other" };
                (client.to_owned(), port.to_string())
            }
        };
        self.inbound_by_client.add(
            &[
                ("client_id", &client),
                ("port", &port),
                ("decision", decision),
            ],
            1,
        );
    }

    /// An inbound caller treated as plaintext; `detection` says why.
    pub fn plaintext_inbound(&self, detection: &str) {
        self.plaintext_inbound.add(&[("detection", detection)], 1);
    }

    /// A connection refused before any relaying (limit reached, destination unknown, ...).
    pub fn refused(&self, d: Direction, reason: &str) {
        self.refused
            .add(&[("direction", d.as_str()), ("reason", reason)], 1);
    }

    /// The label value for Service `name`: itself for the first [`MAX_SERVICE_LABELS`] Services
    /// seen, `other` past them, so the series stay bounded.
    fn service_label<'a>(&self, name: &'a str) -> &'a str {
        let mut seen = self
            .service_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.contains(name) {
            return name;
        }
        if seen.len() < MAX_SERVICE_LABELS {
            seen.insert(name.to_owned());
            return name;
        }
        "other"
    }

    /// One app connection to a Service address and how it was carried: `mtls`, `plaintext`
    /// (an endpoint without a proxy), `no_endpoints`, `unknown_port` or `failed`.
    pub fn service_connection(&self, service: &str, outcome: &str) {
        let service = self.service_label(service);
        self.service_connections
            .add(&[("dst_service", service), ("outcome", outcome)], 1);
    }

    /// A connect attempt to one endpoint of a Service that failed (and was retried elsewhere
    /// when another endpoint was left).
    pub fn endpoint_failure(&self, service: &str, reason: &str) {
        let service = self.service_label(service);
        self.endpoint_failures
            .add(&[("dst_service", service), ("reason", reason)], 1);
    }

    /// An endpoint chosen by the balancer (`attempt` is `first` or `retry`).
    pub fn balancer_pick(&self, service: &str, attempt: &str) {
        let service = self.service_label(service);
        self.balancer_picks
            .add(&[("dst_service", service), ("attempt", attempt)], 1);
    }

    /// Test helper: Service connections by outcome.
    pub fn service_connection_count(&self, service: &str, outcome: &str) -> u64 {
        self.service_connections
            .get(&[("dst_service", service), ("outcome", outcome)])
    }

    pub fn certificate_installed(&self, not_after: i64) {
        self.cert_not_after.store(not_after, Ordering::Relaxed);
    }

    pub fn rotation_succeeded(&self) {
        self.rotations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rotation_failed(&self) {
        self.rotation_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rotations(&self) -> (u64, u64) {
        (
            self.rotations.load(Ordering::Relaxed),
            self.rotation_failures.load(Ordering::Relaxed),
        )
    }

    /// Test helper: a decision counter's value (`result`, `reason`).
    pub fn decision_count(&self, result: &str, reason: &str) -> u64 {
        self.decisions
            .get(&[("result", result), ("reason", reason)])
    }

    /// Test helper: handshake failures for a direction and reason.
    pub fn handshake_failure_count(&self, d: Direction, reason: &str) -> u64 {
        self.handshake_failures
            .get(&[("direction", d.as_str()), ("reason", reason)])
    }

    /// Test helper: refusals for a direction and reason.
    pub fn refused_count(&self, d: Direction, reason: &str) -> u64 {
        self.refused
            .get(&[("direction", d.as_str()), ("reason", reason)])
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Exposition::new();
        self.opened.encode(
            &mut out,
            "palisade_connections_opened_total",
            "TCP connections accepted, by direction.",
        );
        self.closed.encode(
            &mut out,
            "palisade_connections_closed_total",
            "TCP connections finished, by direction.",
        );
        let active = "palisade_connections_active";
        out.family(active, Kind::Gauge, "Connections open now, by direction.");
        for d in [Direction::Inbound, Direction::Outbound] {
            out.sample(active, &[("direction", d.as_str())], self.active(d));
        }
        self.tunnels_opened.encode(
            &mut out,
            "palisade_tunnels_opened_total",
            "Pooled mTLS tunnels made (outbound) or accepted (inbound), by direction.",
        );
        let tunnels = "palisade_tunnels_active";
        out.family(
            tunnels,
            Kind::Gauge,
            "Pooled mTLS tunnels open now, by direction.",
        );
        for d in [Direction::Inbound, Direction::Outbound] {
            out.sample(
                tunnels,
                &[("direction", d.as_str())],
                self.tunnels_active(d),
            );
        }
        self.bytes.encode(
            &mut out,
            "palisade_bytes_total",
            "Bytes relayed, by direction and flow (to_upstream: from the accepted side; to_downstream: back to it).",
        );
        self.handshake_failures.encode(
            &mut out,
            "palisade_tls_handshake_failures_total",
            "Failed mesh TLS handshakes, by direction and reason.",
        );
        self.decisions.encode(
            &mut out,
            "palisade_policy_decisions_total",
            "Inbound policy decisions, by result (allow, deny, audit_deny) and reason.",
        );
        self.inbound_by_client.encode(
            &mut out,
            "palisade_inbound_connections_total",
            "Inbound connections by caller identity (or unauthenticated), port and decision; callers past the first 32 of a port, and ports past the first 64, are counted as other.",
        );
        self.plaintext_inbound.encode(
            &mut out,
            "palisade_inbound_plaintext_total",
            "Inbound callers treated as plaintext, by how they were detected.",
        );
        self.refused.encode(
            &mut out,
            "palisade_connections_refused_total",
            "Connections refused before relaying, by direction and reason.",
        );
        self.service_connections.encode(
            &mut out,
            "palisade_service_connections_total",
            "Outbound connections to a Service address, by Service and how they were carried (mtls, plaintext, no_endpoints, unknown_port, failed).",
        );
        self.endpoint_failures.encode(
            &mut out,
            "palisade_service_endpoint_failures_total",
            "Failed connect attempts to one endpoint of a Service, by Service and reason.",
        );
        self.balancer_picks.encode(
            &mut out,
            "palisade_balancer_picks_total",
            "Endpoints chosen by the outbound balancer, by Service and attempt (first, retry).",
        );
        out.single(
            "palisade_certificate_not_after_seconds",
            Kind::Gauge,
            "Not-after of the installed certificate, Unix time.",
            self.cert_not_after.load(Ordering::Relaxed),
        );
        let (ok, failed) = self.rotations();
        out.single(
            "palisade_certificate_rotations_total",
            Kind::Counter,
            "Certificates obtained.",
            ok,
        );
        out.single(
            "palisade_certificate_rotation_failures_total",
            Kind::Counter,
            "Failed certificate requests.",
            failed,
        );
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_connections_name_callers_and_ports_up_to_their_bounds() {
        let m = Metrics::new();
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        m.inbound_connection(web, 8080, "allow");
        m.inbound_connection(web, 8080, "allow");
        m.inbound_connection("unauthenticated", 8080, "deny");
        // Port 9000 is in use; 32 denied callers fill its remaining 31 names.
        m.inbound_connection(web, 9000, "allow");
        for i in 0..MAX_CLIENT_LABELS_PER_PORT {
            m.inbound_connection(&format!("spiffe://td/ns/scan/sa/s{i}"), 9000, "deny");
        }
        // A denied scan of many ports claims none of them.
        for port in 1..=(MAX_PORT_LABELS as u16) {
            m.inbound_connection(web, 30000 + port, "deny");
        }
        for port in 1..=(MAX_PORT_LABELS as u16) {
            m.inbound_connection(web, 20000 + port, "allow");
        }
        let text = m.render();
        for line in [
            "palisade_inbound_connections_total{client_id=\"spiffe://cluster.local/ns/shop/sa/web\",port=\"8080\",decision=\"allow\"} 2",
            "palisade_inbound_connections_total{client_id=\"unauthenticated\",port=\"8080\",decision=\"deny\"} 1",
            // Port 9000 named 31 of them and then had no room.
            "palisade_inbound_connections_total{client_id=\"other\",port=\"9000\",decision=\"deny\"} 1",
            "palisade_inbound_connections_total{client_id=\"other\",port=\"other\",decision=\"deny\"} 64",
            // 8080 and 9000 took two of the 64 ports: the last two admitted ones are other.
            "palisade_inbound_connections_total{client_id=\"other\",port=\"other\",decision=\"allow\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        let series = text
            .lines()
            .filter(|l| l.starts_with("palisade_inbound_connections_total{"))
            .count();
        assert!(
            series <= MAX_PORT_LABELS * MAX_CLIENT_LABELS_PER_PORT + 2,
            "{series}"
        );
    }

    #[test]
    fn renders_prometheus_text_with_labels() {
        let m = Metrics::new();
        m.connection_opened(Direction::Inbound);
        m.connection_opened(Direction::Inbound);
        m.connection_closed(Direction::Inbound);
        m.decision("deny", "no_rule_matched");
        m.handshake_failed(Direction::Inbound, "bad\"quote");
        m.certificate_installed(1_700_000_000);
        let text = m.render();
        assert!(text.contains("palisade_connections_opened_total{direction=\"inbound\"} 2"));
        assert!(text.contains("palisade_connections_active{direction=\"inbound\"} 1"));
        assert!(text.contains(
            "palisade_policy_decisions_total{result=\"deny\",reason=\"no_rule_matched\"} 1"
        ));
        assert!(text.contains("reason=\"bad\\\"quote\""));
        assert!(text.contains("palisade_certificate_not_after_seconds 1700000000"));
        assert_eq!(m.decision_count("deny", "no_rule_matched"), 1);
    }

    #[test]
    fn service_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_SERVICE_LABELS + 10 {
            m.service_connection(&format!("shop/s{i}"), "mtls");
        }
        assert_eq!(m.service_connection_count("shop/s0", "mtls"), 1);
        assert_eq!(m.service_connection_count("other", "mtls"), 10);
        m.service_connection("shop/s0", "plaintext");
        assert!(m.render().contains(
            "palisade_service_connections_total{dst_service=\"shop/s0\",outcome=\"plaintext\"} 1"
        ));
    }
}
