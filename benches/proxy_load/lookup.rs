//! What a Service's size costs: per outbound connection in the proxy (lookup, port, balancer
//! pick, lease), and per watch update in the CA (the answer for one watch, with its subset).
//! In process, no network: the figures are the control and data path's own work.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use palisade_ca::mesh::{Endpoint, MeshState, Service};
use palisade_ca_api::policy::DefaultPolicy;
use palisade_ca_api::wire::{PortMapping, WatchMessageKind, WatchQuery};
use palisade_proxy::balance::Balancer;
use palisade_proxy::mesh::{MeshConfig, MeshView};

use super::{SERVICE_VIP, service_destination};

/// Endpoint addresses 10.64.0.0 + i, target port 8080.
fn addresses(n: usize) -> Vec<SocketAddr> {
    (0..n as u32)
        .map(|i| SocketAddr::new(IpAddr::from((0x0a40_0000 + i).to_be_bytes()), 8080))
        .collect()
}

/// Microseconds per outbound connection's routing work for a Service of `n` endpoints.
fn per_connection(n: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let vip: SocketAddr = SERVICE_VIP.parse().unwrap();
    let mesh = MeshView::new(MeshConfig::default());
    mesh.set_destination(service_destination(vip, &addresses(n)));
    let balancer = Balancer::new();
    // Some connections stay open, as under load, so the pick compares real counts.
    let held: Vec<_> = addresses(n)
        .iter()
        .step_by(7)
        .map(|a| balancer.lease(*a))
        .collect();
    let rounds = 200_000;
    let started = Instant::now();
    rt.block_on(async {
        for _ in 0..rounds {
            let answer = mesh.lookup(vip.ip(), Duration::from_secs(1)).await.unwrap();
            let routes = answer.service.as_ref().unwrap();
            let targets = routes.ports.get(&vip.port()).unwrap();
            let target = balancer.pick(targets, &[]).unwrap();
            drop(std::hint::black_box(balancer.lease(target.addr)));
        }
    });
    drop(held);
    started.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

/// Microseconds for the CA to build one watch's answer for a Service of `n` endpoints.
fn per_watch_update(n: usize) -> f64 {
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let service = Service {
        name: "server".into(),
        namespace: "bench".into(),
        cluster_ips: vec![vip],
        ports: vec![80],
        endpoints: addresses(n)
            .iter()
            .map(|a| Endpoint {
                address: a.ip(),
                ports: vec![PortMapping {
                    port: 80,
                    target_port: a.port(),
                }],
            })
            .collect(),
    };
    let state = MeshState::new(
        "cluster.local".into(),
        DefaultPolicy::AllAuthenticated,
        Default::default(),
        Vec::new(),
        Vec::new(),
        vec![service],
    );
    let rounds = 500;
    let started = Instant::now();
    for i in 0..rounds {
        let query = WatchQuery {
            pod_ip: Some(IpAddr::from([10, 77, (i >> 8) as u8, i as u8])),
            destinations: vec![vip],
            ..Default::default()
        };
        std::hint::black_box(state.view(&query, WatchMessageKind::Update, 1));
    }
    started.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

pub fn print() {
    println!(
        "\n{:<44} {:>16} {:>22}",
        "Service size (in process)", "us per connection", "CA us per watch update"
    );
    for n in [2, 256, 5_000] {
        println!(
            "{:<44} {:>16.2} {:>22.0}",
            format!("{n} endpoints"),
            per_connection(n),
            per_watch_update(n)
        );
    }
    println!(
        "(a watch gets at most {} endpoints of a Service, a per-proxy subset; the proxy's row for 5000 is the cost if it held them all)",
        palisade_ca_api::wire::MAX_SERVICE_ENDPOINTS
    );
}
