//! Services and their EndpointSlices: pure conversions of each kind, and the join that gives
//! every Service the endpoints a client may be sent to.
//!
//! Endpoints come only from EndpointSlices, never from evaluating a selector here: the
//! EndpointSlice controller has already picked the pods and resolved named target ports, and
//! Services without a selector get their slices by hand or from another controller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use palisade_ca_api::wire::PortMapping;

use crate::mesh::{Endpoint, Service};

/// The label that names the Service an EndpointSlice belongs to (in the slice's namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A port and its name; `""` for the one port of a single-port Service that leaves it unnamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
}

/// What the control plane reads from a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: String,
    pub namespace: String,
    /// Every family's address; never empty.
    pub cluster_ips: Vec<IpAddr>,
    /// The TCP ports a client may call; never empty.
    pub ports: Vec<NamedPort>,
    /// `spec.publishNotReadyAddresses`: not-ready endpoints are sent traffic too.
    pub publish_not_ready_addresses: bool,
}

/// What the control plane reads from an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    /// The Service this slice belongs to.
    pub service: String,
    pub endpoints: Vec<SliceEndpoint>,
    /// TCP ports: the name of the Service port each serves and its resolved target port.
    pub ports: Vec<NamedPort>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`, where absent means ready (as the API defines it).
    pub ready: bool,
}

/// A Service the mesh can answer for; `None` for ExternalName and headless Services (no
/// address to look up) and for Services with no TCP port (nothing the proxy carries).
pub fn service_info(service: &KubeService) -> Option<ServiceInfo> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses: Vec<&String> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    // "None" (headless) and "" (not allocated yet) are no address.
    let cluster_ips: Vec<IpAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
    let ports: Vec<NamedPort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(Some(p.port))?,
            })
        })
        .collect();
    if cluster_ips.is_empty() || ports.is_empty() {
        return None;
    }
    Some(ServiceInfo {
        name: service.name_any(),
        namespace: service.namespace()?,
        cluster_ips,
        ports,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
    })
}

/// An EndpointSlice of IP addresses that names its Service; `None` otherwise (FQDN slices, and
/// slices that belong to no Service).
pub fn slice_info(slice: &EndpointSlice) -> Option<SliceInfo> {
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return None,
    };
    let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| SliceEndpoint {
            addresses: e
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .filter(|a| a.is_ipv6() == ipv6)
                .collect(),
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
        })
        .collect();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(p.port)?,
            })
        })
        .collect();
    Some(SliceInfo {
        namespace: slice.namespace()?,
        service,
        endpoints,
        ports,
    })
}

/// Absent means TCP, in Services and in slices alike.
fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

fn port_number(port: Option<i32>) -> Option<u16> {
    u16::try_from(port?).ok().filter(|p| *p != 0)
}

/// Every Service with its endpoints: the union over the slices that name it (a Service's
/// endpoints are often split across slices, and a dual-stack Service has a slice per family).
/// An endpoint is kept when it is ready, or whatever its state when the Service publishes
/// not-ready addresses; an address seen in several slices is one endpoint with the port
/// mappings of all of them; an endpoint that serves no port of its Service is dropped.
/// Endpoints are sorted by address.
pub fn services_with_endpoints<'a>(
    services: impl IntoIterator<Item = &'a ServiceInfo>,
    slices: impl IntoIterator<Item = &'a SliceInfo>,
) -> Vec<Service> {
    let mut slices_of: HashMap<(&str, &str), Vec<&SliceInfo>> = HashMap::new();
    for slice in slices {
        slices_of
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    services
        .into_iter()
        .map(|service| {
            let mut endpoints: BTreeMap<IpAddr, BTreeSet<PortMapping>> = BTreeMap::new();
            let own = slices_of.get(&(service.namespace.as_str(), service.name.as_str()));
            for slice in own.into_iter().flatten() {
                let mappings = port_mappings(service, slice);
                for endpoint in &slice.endpoints {
                    if !endpoint.ready && !service.publish_not_ready_addresses {
                        continue;
                    }
                    for address in &endpoint.addresses {
                        endpoints
                            .entry(*address)
                            .or_default()
                            .extend(mappings.iter().copied());
                    }
                }
            }
            Service {
                name: service.name.clone(),
                namespace: service.namespace.clone(),
                cluster_ips: service.cluster_ips.clone(),
                ports: service.ports.iter().map(|p| p.port).collect(),
                endpoints: endpoints
                    .into_iter()
                    .filter(|(_, ports)| !ports.is_empty())
                    .map(|(address, ports)| Endpoint {
                        address,
                        ports: ports.into_iter().collect(),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Each slice port mapped from the Service port of the same name.
fn port_mappings(service: &ServiceInfo, slice: &SliceInfo) -> Vec<PortMapping> {
    slice
        .ports
        .iter()
        .filter_map(|target| {
            let port = service.ports.iter().find(|p| p.name == target.name)?;
            Some(PortMapping {
                port: port.port,
                target_port: target.port,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;
