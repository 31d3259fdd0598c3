//! The record of an app's original probes: the injector writes it to the pod annotation
//! `palisade.dev/app-probes` when it rewrites the kubelet's probes to the proxy's
//! `/app-health/<container>/<livez|readyz|startupz>`, and the proxy reads it back from
//! `PALISADE_APP_PROBES` (the downward API maps the annotation to it). One type for both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One recorded probe: the kubelet's handler with its port resolved to a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppProbe {
    HttpGet(HttpGet),
    TcpSocket(TcpSocket),
    Grpc(Grpc),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    pub port: u16,
    /// The kubelet's `host`; loopback when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `HTTP` (default) or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grpc {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// Probes by `<container>/<kind>`.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// The Kubernetes probe fields and the proxy's name for each, as in
/// `/app-health/<container>/<name>`.
pub const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// The path the kubelet probes after the rewrite, and the record's key is `<container>/<kind>`.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// Parses the recorded probes (the annotation's JSON).
pub fn parse_probes(json: &str) -> Result<AppProbes, String> {
    let probes: AppProbes = serde_json::from_str(json).map_err(|e| {
        format!(
            "{e}: expected {{\"<container>/<probe>\": {{\"httpGet\": {{\"port\": N, \"path\": \"/..\"}}}} | {{\"tcpSocket\": {{\"port\": N}}}} | {{\"grpc\": {{\"port\": N}}}}}}"
        )
    })?;
    for key in probes.keys() {
        if key.split('/').count() != 2 || key.starts_with('/') || key.ends_with('/') {
            return Err(format!("{key:?} is not \"<container>/<probe>\""));
        }
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injector_record() {
        let p = parse_probes(
            r#"{"web/livez": {"httpGet": {"path": "/healthz", "port": 8080, "httpHeaders": [{"name": "X-A", "value": "b"}]}},
                "web/readyz": {"tcpSocket": {"port": 8080}},
                "web/startupz": {"grpc": {"port": 9090}}}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert!(matches!(
            p["web/readyz"],
            AppProbe::TcpSocket(TcpSocket { port: 8080, .. })
        ));
        assert!(matches!(&p["web/livez"], AppProbe::HttpGet(h) if h.http_headers.len() == 1));
    }

    #[test]
    fn a_written_record_reads_back() {
        let mut probes = AppProbes::new();
        probes.insert(
            "web/livez".into(),
            AppProbe::HttpGet(HttpGet {
                port: 8080,
                host: None,
                path: Some("/healthz".into()),
                scheme: Some("HTTPS".into()),
                http_headers: vec![],
            }),
        );
        probes.insert(
            "web/readyz".into(),
            AppProbe::Grpc(Grpc {
                port: 9090,
                service: None,
            }),
        );
        let text = serde_json::to_string(&probes).unwrap();
        assert_eq!(parse_probes(&text), Ok(probes));
    }

    #[test]
    fn refuses_malformed_records() {
        for bad in [
            "[]",
            r#"{"web/livez": {"exec": {}}}"#,
            r#"{"web": {"tcpSocket": {"port": 1}}}"#,
            r#"{"web/livez": {"tcpSocket": {"port": 70000}}}"#,
        ] {
            assert!(parse_probes(bad).is_err(), "{bad}");
        }
    }
}
