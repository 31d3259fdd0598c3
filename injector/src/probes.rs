//! Probe rewriting. Once traffic is captured, the kubelet's HTTP, TCP and gRPC probes would
//! hit the proxy's inbound listener instead of the app; so each becomes an HTTP probe of the
//! proxy's `/app-health/<container>/<livez|readyz|startupz>`, and the original target is
//! recorded in the `palisade.dev/app-probes` annotation for the proxy to check on the
//! kubelet's behalf. `exec` probes run inside the container and stay as they are.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use crate::json_patch::{PatchOp, pointer_token};
use palisade_ca_api::contract::{
    AppProbe, AppProbes, Grpc, Header, HttpGet, PROBE_KINDS, PROXY_ADMIN_PORT, TcpSocket,
    app_health_path,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "container {container:?} {probe} uses port {port:?}, but no port of that container has \
         that name; name one of the container's ports {port:?} or give the probe a port number"
    )]
    UnknownNamedPort {
        container: String,
        probe: &'static str,
        port: String,
    },
    #[error(
        "container {container:?} {probe} uses port {port}, which is not a port number 1-65535; \
         give the probe a valid port"
    )]
    BadPort {
        container: String,
        probe: &'static str,
        port: i64,
    },
}

fn probe_of<'c>(container: &'c Container, field: &str) -> Option<&'c Probe> {
    match field {
        "livenessProbe" => container.liveness_probe.as_ref(),
        "readinessProbe" => container.readiness_probe.as_ref(),
        _ => container.startup_probe.as_ref(),
    }
}

/// Numbers a port of a probe: an integer as it is, a name through the container's ports.
fn resolve_port(
    container: &Container,
    probe: &'static str,
    port: &IntOrString,
) -> Result<u16, ProbeError> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            let by_name = container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()));
            match (by_name, name.parse::<i32>()) {
                (Some(p), _) => p.container_port,
                // The API accepts a number written as a string; the kubelet reads it as one.
                (None, Ok(n)) => n,
                (None, Err(_)) => {
                    return Err(ProbeError::UnknownNamedPort {
                        container: container.name.clone(),
                        probe,
                        port: name.clone(),
                    });
                }
            }
        }
    };
    u16::try_from(number)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ProbeError::BadPort {
            container: container.name.clone(),
            probe,
            port: number.into(),
        })
}

/// Appends the operations that rewrite the probes of the container at `pointer` (for example
/// `/spec/containers/0`) and records each original under `<container>/<kind>`.
pub fn rewrite_probes(
    container: &Container,
    pointer: &str,
    ops: &mut Vec<PatchOp<'_>>,
    records: &mut AppProbes,
) -> Result<(), ProbeError> {
    for (field, kind) in PROBE_KINDS {
        let Some(probe) = probe_of(container, field) else {
            continue;
        };
        let probe_pointer = format!("{pointer}/{}", pointer_token(field));
        let (handler, original) = if let Some(http) = &probe.http_get {
            let headers = http.http_headers.iter().flatten();
            let original = HttpGet {
                port: resolve_port(container, field, &http.port)?,
                host: http.host.clone(),
                path: http.path.clone(),
                scheme: http.scheme.clone(),
                http_headers: headers
                    .map(|h| Header {
                        name: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
            };
            ("httpGet", AppProbe::HttpGet(original))
        } else if let Some(tcp) = &probe.tcp_socket {
            let original = TcpSocket {
                port: resolve_port(container, field, &tcp.port)?,
                host: tcp.host.clone(),
            };
            ("tcpSocket", AppProbe::TcpSocket(original))
        } else if let Some(grpc) = &probe.grpc {
            let original = Grpc {
                port: resolve_port(container, field, &IntOrString::Int(grpc.port))?,
                service: grpc.service.clone(),
            };
            ("grpc", AppProbe::Grpc(original))
        } else {
            continue;
        };
        let rewritten = json!({
            "path": app_health_path(&container.name, kind),
            "port": PROXY_ADMIN_PORT,
            "scheme": "HTTP",
        });
        if handler == "httpGet" {
            ops.push(PatchOp::Replace {
                path: format!("{probe_pointer}/httpGet"),
                value: rewritten.into(),
            });
        } else {
            ops.push(PatchOp::Remove {
                path: format!("{probe_pointer}/{handler}"),
            });
            ops.push(PatchOp::Add {
                path: format!("{probe_pointer}/httpGet"),
                value: rewritten.into(),
            });
        }
        records.insert(format!("{}/{kind}", container.name), original);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;

    fn container(value: Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    fn rewrite(
        c: &Container,
    ) -> Result<(Vec<PatchOp<'static>>, BTreeMap<String, Value>), ProbeError> {
        let mut ops = Vec::new();
        let mut records = AppProbes::new();
        rewrite_probes(c, "/spec/containers/1", &mut ops, &mut records)?;
        let records = records
            .into_iter()
            .map(|(key, probe)| (key, serde_json::to_value(probe).unwrap()))
            .collect();
        Ok((ops, records))
    }

    #[test]
    fn http_probe_with_named_port_is_replaced_and_recorded_with_the_number() {
        let c = container(json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                "httpHeaders": [{"name": "X-A", "value": "b"}]}, "periodSeconds": 7},
        }));
        let (ops, records) = rewrite(&c).unwrap();
        assert_eq!(
            serde_json::to_value(&ops).unwrap(),
            json!([{"op": "replace", "path": "/spec/containers/1/livenessProbe/httpGet",
                    "value": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"}}])
        );
        assert_eq!(
            records["web/livez"],
            json!({"httpGet": {"path": "/healthz", "port": 8080,
                   "httpHeaders": [{"name": "X-A", "value": "b"}]}})
        );
    }

    #[test]
    fn tcp_and_grpc_probes_become_http() {
        let c = container(json!({
            "name": "db",
            "readinessProbe": {"tcpSocket": {"port": 5432}},
            "startupProbe": {"grpc": {"port": 9090, "service": "health"}},
            "livenessProbe": {"exec": {"command": ["true"]}},
        }));
        let (ops, records) = rewrite(&c).unwrap();
        let ops = serde_json::to_value(&ops).unwrap();
        assert_eq!(
            ops,
            json!([
                {"op": "remove", "path": "/spec/containers/1/readinessProbe/tcpSocket"},
                {"op": "add", "path": "/spec/containers/1/readinessProbe/httpGet",
                 "value": {"path": "/app-health/db/readyz", "port": 15021, "scheme": "HTTP"}},
                {"op": "remove", "path": "/spec/containers/1/startupProbe/grpc"},
                {"op": "add", "path": "/spec/containers/1/startupProbe/httpGet",
                 "value": {"path": "/app-health/db/startupz", "port": 15021, "scheme": "HTTP"}},
            ])
        );
        assert_eq!(records["db/readyz"], json!({"tcpSocket": {"port": 5432}}));
        assert_eq!(
            records["db/startupz"],
            json!({"grpc": {"port": 9090, "service": "health"}})
        );
        assert!(
            !records.contains_key("db/livez"),
            "exec probes stay as they are"
        );
    }

    #[test]
    fn unknown_named_port_is_an_error_naming_container_probe_and_port() {
        let c = container(json!({
            "name": "web",
            "readinessProbe": {"tcpSocket": {"port": "metrics"}},
        }));
        let err = rewrite(&c).unwrap_err().to_string();
        assert!(
            err.contains("\"web\" readinessProbe uses port \"metrics\""),
            "{err}"
        );
    }

    #[test]
    fn numeric_string_port_is_accepted() {
        let c = container(json!({"name": "web", "livenessProbe": {"tcpSocket": {"port": "8080"}}}));
        let (_, records) = rewrite(&c).unwrap();
        assert_eq!(records["web/livez"], json!({"tcpSocket": {"port": 8080}}));
    }

    #[test]
    fn out_of_range_port_is_an_error() {
        let c = container(json!({"name": "web", "livenessProbe": {"grpc": {"port": 70000}}}));
        assert!(matches!(
            rewrite(&c),
            Err(ProbeError::BadPort { port: 70000, .. })
        ));
    }
}
