//! The demo's mesh, all in this process: a `palisade-ca` on a mesh file with local tokens, the
//! api app, and one `palisade-proxy` per meshed workload, each on its own loopback address
//! with explicit destinations (no capture).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::config::ServeConfig;
use palisade_ca::server::Running;
use palisade_proxy::app::Bound;
use palisade_proxy::config::Config;

use super::traffic::App;

pub const NAMESPACE: &str = "shop";
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The policy that protects the api.
pub const POLICY: &str = "api-from-web";

/// A meshed workload (one pod): its service account is its identity, its loopback address is
/// its pod IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub pod: &'static str,
    pub service_account: &'static str,
    pub ip: Ipv4Addr,
}

impl Workload {
    /// The identity's short name: `shop/web`.
    pub fn name(&self) -> String {
        format!("{NAMESPACE}/{}", self.service_account)
    }

    /// The workload (pod) as proxies name it in their decisions: `shop/api-1`.
    pub fn workload(&self) -> String {
        format!("{NAMESPACE}/{}", self.pod)
    }

    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}",
            self.service_account
        )
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }
}

pub const WEB: Workload = Workload {
    pod: "web",
    service_account: "web",
    ip: Ipv4Addr::new(127, 0, 10, 2),
};
/// The two replicas of shop/api, behind the Service [`API_SERVICE`].
pub const API: Workload = Workload {
    pod: "api-1",
    service_account: "api",
    ip: Ipv4Addr::new(127, 0, 10, 3),
};
pub const API_2: Workload = Workload {
    pod: "api-2",
    service_account: "api",
    ip: Ipv4Addr::new(127, 0, 10, 5),
};
/// Meshed, with a valid certificate, but not a caller the api's policy lists.
pub const INTRUDER: Workload = Workload {
    pod: "intruder",
    service_account: "intruder",
    ip: Ipv4Addr::new(127, 0, 10, 4),
};
/// The Service `shop/api`: its clusterIP and port, what the callers' apps connect to.
pub const API_SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 96, 10)), 80);
/// The name of the api replicas' mesh port, the Service's `targetPort`.
const MESH_PORT_NAME: &str = "mesh";
/// A caller outside the mesh: no proxy, no certificate.
pub const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 9);

/// The mesh file: four meshed workloads, the Service `shop/api` over the two api replicas,
/// and `policies` (each `{metadata, spec}`, written as JSON, which YAML reads as it is).
/// `replica_ports` are the ports the replicas' proxies accept on (their named port `mesh`, the
/// Service's target port), once they are known; without them the Service has no endpoint yet.
/// Pure.
pub fn mesh_yaml(policies: &[serde_json::Value], replica_ports: &[u16]) -> String {
    let workloads: String = [WEB, API, API_2, INTRUDER]
        .iter()
        .map(|w| {
            let replica = [API, API_2].iter().position(|r| r == w);
            let ports = match replica.and_then(|i| replica_ports.get(i)) {
                Some(p) => format!(", ports: {{{MESH_PORT_NAME}: {p}}}"),
                None => String::new(),
            };
            format!(
                "  - {{name: {pod}, namespace: {NAMESPACE}, serviceAccount: {sa}, ips: [{ip}], labels: {{app: {sa}}}{ports}}}\n",
                pod = w.pod,
                sa = w.service_account,
                ip = w.ip
            )
        })
        .collect();
    let policies: String = policies
        .iter()
        .map(|p| {
            let p = serde_json::json!({"metadata": p["metadata"], "spec": p["spec"]});
            format!("  - {p}\n")
        })
        .collect();
    format!(
        "trustDomain: {TRUST_DOMAIN}\n\
         defaultPolicy: all-authenticated\n\
         workloads:\n{workloads}\
         services:\n\
         \x20 - {{name: api, namespace: {NAMESPACE}, clusterIPs: [{vip}], selector: {{app: api}},\n\
         \x20    ports: [{{name: http, port: {vport}, targetPort: {MESH_PORT_NAME}}}]}}\n\
         policies:{empty}\n{policies}",
        vip = API_SERVICE.ip(),
        vport = API_SERVICE.port(),
        empty = if policies.is_empty() { " []" } else { "" },
    )
}

/// The demo's policy: `allowed` (`ns/sa`) may call the api's port.
pub fn api_policy(api_port: u16, allowed: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": POLICY, "namespace": NAMESPACE},
        "spec": {
            "targetSelector": {"matchLabels": {"app": "api"}},
            "ports": [api_port],
            "allow": [{"serviceAccounts": allowed}],
        },
    })
}

/// Where a proxy sends and delivers, in place of what capture would say.
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit {
    /// Every outbound connection goes here (`PALISADE_OUTBOUND_DESTINATION`).
    pub outbound_destination: Option<SocketAddr>,
    /// Inbound connections are for this app port on 127.0.0.1 (`PALISADE_INBOUND_FORWARD_PORT`).
    pub inbound_forward_port: Option<u16>,
}

/// The `PALISADE_*` variables of one proxy, as the injector would set them, with every
/// listener on the workload's own address and port 0. Pure.
pub fn proxy_env(
    w: &Workload,
    ca_addr: SocketAddr,
    dir: &Path,
    explicit: Explicit,
) -> HashMap<String, String> {
    let listen = w.addr(0).to_string();
    let mut env: HashMap<String, String> = [
        ("PALISADE_CA_ADDR", ca_addr.to_string()),
        (
            "PALISADE_TRUST_ANCHORS",
            dir.join("ca.pem").display().to_string(),
        ),
        (
            "PALISADE_TOKEN_FILE",
            token_path(dir, w).display().to_string(),
        ),
        ("PALISADE_NAMESPACE", NAMESPACE.into()),
        ("PALISADE_SERVICE_ACCOUNT", w.service_account.into()),
        ("PALISADE_POD_NAME", w.pod.into()),
        ("PALISADE_POD_IP", w.ip.to_string()),
        ("PALISADE_INBOUND_LISTEN", listen.clone()),
        ("PALISADE_OUTBOUND_LISTEN", listen.clone()),
        ("PALISADE_ADMIN_LISTEN", listen),
        // The demo stops its proxies with nothing left to drain.
        ("PALISADE_DRAIN_TIMEOUT", "1s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(d) = explicit.outbound_destination {
        env.insert("PALISADE_OUTBOUND_DESTINATION".into(), d.to_string());
    }
    if let Some(p) = explicit.inbound_forward_port {
        env.insert("PALISADE_INBOUND_FORWARD_PORT".into(), p.to_string());
    }
    env
}

fn token_path(dir: &Path, w: &Workload) -> PathBuf {
    dir.join("tokens").join(w.pod)
}

/// A running proxy and the workload it serves.
pub struct Proxy {
    pub workload: Workload,
    pub bound: Bound,
}

/// Everything the demo started.
pub struct World {
    pub mesh_file: PathBuf,
    /// The api app, behind the api's proxy.
    pub app: App,
    pub ca: Running,
    pub cert_ttl: Duration,
    pub api: Proxy,
    pub api_2: Proxy,
    pub web: Proxy,
    pub intruder: Proxy,
    /// The ports the api replicas' proxies accept on: the Service's endpoints.
    pub replica_ports: Vec<u16>,
}

impl World {
    /// Starts the CA, the app and the proxies in `dir`; waits until every proxy is ready.
    pub async fn start(dir: &Path, cert_ttl: Duration) -> anyhow::Result<World> {
        let app = App::start("127.0.0.1:0".parse().expect("literal"), "api")
            .await
            .context("cannot start the api app on 127.0.0.1")?;
        let mesh_file = dir.join("mesh.yaml");
        let policy = api_policy(app.addr.port(), &[&WEB.name()]);
        write_atomically(&mesh_file, &mesh_yaml(std::slice::from_ref(&policy), &[]))?;

        let state_dir = dir.join("ca-state");
        let mut config = ServeConfig::embedded(state_dir.clone(), mesh_file.clone());
        config.cert_ttl = cert_ttl;
        config.allow_short_ttl_for_testing = true;
        // The demo's intermediate rotation: decided within a second, renewals spread over two.
        config.rotation.settle = time::Duration::seconds(1);
        config.rotation.reconnect_grace = time::Duration::seconds(1);
        config.rotation.renew_window = time::Duration::seconds(2);
        config.audit_file = Some(dir.join("audit.log"));
        let ca = palisade_ca::server::start(config)
            .await
            .context("cannot start the CA")?;
        std::fs::write(
            dir.join("ca.pem"),
            ca.ca.rotation.authority().trust_bundle_pem().concat(),
        )
        .context("cannot write the trust bundle")?;

        // What the kubelet's projected token volume holds in a pod.
        let issuer = LocalIssuer::load_or_create(&state_dir)
            .context("cannot load the CA's local token issuer")?;
        std::fs::create_dir_all(dir.join("tokens")).context("cannot make the token directory")?;
        for w in [WEB, API, API_2, INTRUDER] {
            let token = issuer
                .mint(
                    NAMESPACE,
                    w.service_account,
                    Some(w.pod),
                    palisade_ca_api::wire::TOKEN_AUDIENCE,
                    Duration::from_secs(600),
                )
                .map_err(|e| anyhow::anyhow!("cannot mint a token for {}: {e}", w.name()))?;
            std::fs::write(token_path(dir, &w), token)
                .with_context(|| format!("cannot write the token of {}", w.name()))?;
        }

        let to_app = Explicit {
            inbound_forward_port: Some(app.addr.port()),
            ..Explicit::default()
        };
        let api = start_proxy(API, ca.api_addr, dir, to_app).await?;
        let api_2 = start_proxy(API_2, ca.api_addr, dir, to_app).await?;
        // The callers' apps connect to the Service address; their proxies balance.
        let to_service = Explicit {
            outbound_destination: Some(API_SERVICE),
            ..Explicit::default()
        };
        let web = start_proxy(WEB, ca.api_addr, dir, to_service).await?;
        let intruder = start_proxy(INTRUDER, ca.api_addr, dir, to_service).await?;
        for p in [&api, &api_2, &web, &intruder] {
            palisade_proxy::run::wait_ready(p.bound.admin, Duration::from_secs(10))
                .await
                .map_err(|e| anyhow::anyhow!("the proxy of {}: {e}", p.workload.workload()))?;
        }
        // The replicas' ports are known now: they become the Service's endpoints.
        let replica_ports = vec![api.bound.inbound.port(), api_2.bound.inbound.port()];
        write_atomically(&mesh_file, &mesh_yaml(&[policy], &replica_ports))?;
        let world = World {
            mesh_file,
            app,
            ca,
            cert_ttl,
            api,
            api_2,
            web,
            intruder,
            replica_ports,
        };
        world.wait_for_endpoints(2).await?;
        Ok(world)
    }

    /// Waits until the CA serves `n` endpoints for the api Service.
    async fn wait_for_endpoints(&self, n: usize) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        loop {
            let state = self.ca.ca.publisher.current().state;
            let ready = state
                .service_at(API_SERVICE.ip())
                .map_or(0, |s| s.endpoints.len());
            if ready == n {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(5) {
                anyhow::bail!(
                    "the CA serves {ready} endpoints for the Service shop/api after 5s, not {n}: the mesh file's reload did not apply"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn proxies(&self) -> [&Proxy; 4] {
        [&self.web, &self.api, &self.api_2, &self.intruder]
    }

    /// The api replicas' proxies.
    pub fn replicas(&self) -> [&Proxy; 2] {
        [&self.api, &self.api_2]
    }

    /// Rewrites the mesh file so that `allowed` may call the api; the CA picks it up.
    pub fn allow_callers(&self, allowed: &[&str]) -> anyhow::Result<()> {
        self.set_policies(&[api_policy(self.app.addr.port(), allowed)])
    }

    /// Rewrites the mesh file with `policies` in place of the current ones.
    pub fn set_policies(&self, policies: &[serde_json::Value]) -> anyhow::Result<()> {
        write_atomically(&self.mesh_file, &mesh_yaml(policies, &self.replica_ports))
    }

    /// Stops the proxies (drained), the CA and the app. Returns the addresses that were
    /// listening, for the caller to check that they are closed.
    pub async fn shutdown(self) -> Vec<SocketAddr> {
        let mut addrs = vec![self.ca.api_addr, self.ca.admin_addr, self.app.addr];
        let proxies = [self.web, self.intruder, self.api, self.api_2];
        for p in &proxies {
            p.bound.shutdown();
            addrs.extend([p.bound.inbound, p.bound.outbound, p.bound.admin]);
        }
        for p in proxies {
            let name = p.workload.workload();
            if tokio::time::timeout(Duration::from_secs(5), p.bound.wait())
                .await
                .is_err()
            {
                tracing::warn!(workload = %name, "the proxy did not stop within 5s");
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), self.ca.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the CA did not stop within 5s");
        }
        self.app.stop().await;
        addrs
    }
}

async fn start_proxy(
    workload: Workload,
    ca_addr: SocketAddr,
    dir: &Path,
    explicit: Explicit,
) -> anyhow::Result<Proxy> {
    let name = workload.workload();
    let config = Config::from_env(&proxy_env(&workload, ca_addr, dir, explicit))
        .with_context(|| format!("the proxy configuration of {name}"))?;
    let bound = palisade_proxy::run::start(&config)
        .await
        .with_context(|| format!("cannot start the proxy of {name}"))?;
    Ok(Proxy { workload, bound })
}

/// Writes by rename, so the CA's reload never reads half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_file_is_one_the_ca_accepts_with_the_policy_on_the_app_port() {
        let text = mesh_yaml(
            &[api_policy(41234, &["shop/web", "shop/intruder"])],
            &[40001, 40002],
        );
        let state =
            palisade_ca::mesh::file::parse_mesh_file(Path::new("mesh.yaml"), &text, TRUST_DOMAIN)
                .unwrap();
        assert_eq!(state.workloads().len(), 4);
        let service = state.destination(API_SERVICE.ip(), None).service.unwrap();
        assert_eq!(service.name, "shop/api");
        let endpoints: Vec<String> = service
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.address, e.target_port(80).unwrap()))
            .collect();
        assert_eq!(endpoints, ["127.0.10.3:40001", "127.0.10.5:40002"]);
        let before_start = mesh_yaml(&[api_policy(41234, &["shop/web"])], &[]);
        let state = palisade_ca::mesh::file::parse_mesh_file(
            Path::new("mesh.yaml"),
            &before_start,
            TRUST_DOMAIN,
        )
        .unwrap();
        assert!(
            state
                .destination(API_SERVICE.ip(), None)
                .service
                .unwrap()
                .endpoints
                .is_empty()
        );
        let api = state.workload_at(IpAddr::V4(API.ip)).unwrap();
        let inbound = state.inbound_policy(api);
        assert_eq!(inbound.workload, "shop/api-1");
        assert_eq!(inbound.policies.len(), 1);
        assert_eq!(inbound.policies[0].name, "shop/api-from-web");
        assert_eq!(inbound.policies[0].ports, vec![41234]);
        let web = state.workload_at(IpAddr::V4(WEB.ip)).unwrap();
        assert_eq!(state.spiffe_id(web).unwrap().to_string(), WEB.spiffe_id());
        let without = mesh_yaml(&[], &[40001, 40002]);
        let state = palisade_ca::mesh::file::parse_mesh_file(
            Path::new("mesh.yaml"),
            &without,
            TRUST_DOMAIN,
        )
        .unwrap();
        let api = state.workload_at(IpAddr::V4(API.ip)).unwrap();
        assert!(state.inbound_policy(api).policies.is_empty());
    }

    #[test]
    fn each_proxy_config_is_valid_and_explicit() {
        let dir = Path::new("/tmp/demo");
        let ca: SocketAddr = "127.0.0.1:15012".parse().unwrap();
        let to_api: SocketAddr = "127.0.10.3:40000".parse().unwrap();
        let web = Config::from_env(&proxy_env(
            &WEB,
            ca,
            dir,
            Explicit {
                outbound_destination: Some(to_api),
                ..Explicit::default()
            },
        ))
        .unwrap();
        assert_eq!(web.spiffe_id.to_string(), WEB.spiffe_id());
        assert_eq!(web.outbound_destination, Some(to_api));
        assert_eq!(web.inbound_listen.ip(), IpAddr::V4(WEB.ip));
        assert_eq!(web.pod_ip, IpAddr::V4(WEB.ip));
        let api = Config::from_env(&proxy_env(
            &API,
            ca,
            dir,
            Explicit {
                inbound_forward_port: Some(8080),
                ..Explicit::default()
            },
        ))
        .unwrap();
        assert_eq!(api.inbound_forward_port, Some(8080));
        assert_eq!(api.token_file, dir.join("tokens/api-1"));
    }
}
