//! The RFC 6902 JSON patch that injects a pod. Pure: a typed pod and the settings in, the list
//! of operations out. Operations that address existing array elements by index (probe
//! rewrites) come before the insertions that shift those indices.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::Value;

use crate::annotations::{self, PodOverrides, ValueError, parse_overrides};
use crate::json_patch::{PatchOp, PatchValue, pointer_token};
use crate::probes::{ProbeError, rewrite_probes};
use crate::settings::InjectorSettings;
use crate::sidecar::{
    INIT_CONTAINER, INIT_REPORT_VOLUME, PROXY_CONTAINER, Prebuilt, TOKEN_VOLUME, TRUST_VOLUME,
};
use palisade_ca_api::contract::{
    APP_PROBES_ANNOTATION, AppProbes, INBOUND_PORT, INJECTED_LABEL, OUTBOUND_PORT,
    PROXY_ADMIN_PORT as ADMIN_PORT, PROXY_UID,
};

/// Why a pod that should be injected cannot be: the pod is denied with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("{0}")]
    Annotation(#[from] ValueError),
    #[error("{0}")]
    Probe(#[from] ProbeError),
    #[error(
        "the pod already has a {kind} named {name:?}, a name palisade-injector reserves for its \
         own; rename it, or opt the pod out with the label palisade.dev/inject=disabled"
    )]
    ReservedName { kind: &'static str, name: String },
    #[error(
        "container {container:?} declares port {port}, which palisade-proxy uses \
         ({INBOUND_PORT}, {OUTBOUND_PORT} and {ADMIN_PORT} are reserved); move the app to \
         another port, or opt the pod out with the label palisade.dev/inject=disabled"
    )]
    ReservedPort { container: String, port: i32 },
    #[error(
        "{field} is {PROXY_UID}, the uid palisade-proxy runs as: capture leaves that uid's \
         traffic alone, so container {container:?} would bypass the mesh; run it as another uid, \
         or opt the pod out with the label palisade.dev/inject=disabled"
    )]
    ProxyUid { container: String, field: String },
    #[error("the pod has no spec; send a complete Pod object")]
    NoSpec,
}

impl InjectError {
    /// The annotation at fault, for metrics; `None` when it is not an annotation.
    pub fn annotation(&self) -> Option<&str> {
        match self {
            Self::Annotation(e) => Some(&e.setting),
            _ => None,
        }
    }
}

/// The patch for one pod, and warnings for the API client.
#[derive(Debug, Clone)]
pub struct Injection<'a> {
    pub ops: Vec<PatchOp<'a>>,
    pub warnings: Vec<String>,
}

fn check_reserved(pod_containers: &[&Container], volumes: &[&str]) -> Result<(), InjectError> {
    for c in pod_containers {
        if c.name == INIT_CONTAINER || c.name == PROXY_CONTAINER {
            return Err(InjectError::ReservedName {
                kind: "container",
                name: c.name.clone(),
            });
        }
        for port in c.ports.iter().flatten() {
            let reserved = [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT];
            if reserved
                .iter()
                .any(|r| i32::from(*r) == port.container_port)
            {
                return Err(InjectError::ReservedPort {
                    container: c.name.clone(),
                    port: port.container_port,
                });
            }
        }
    }
    if let Some(name) = volumes
        .iter()
        .find(|v| [TOKEN_VOLUME, TRUST_VOLUME, INIT_REPORT_VOLUME].contains(*v))
    {
        return Err(InjectError::ReservedName {
            kind: "volume",
            name: (*name).to_owned(),
        });
    }
    Ok(())
}

/// Refuses a pod whose app would run as the proxy's uid: its traffic would skip capture.
fn check_app_uid(spec: &PodSpec) -> Result<(), InjectError> {
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let lists = [
        ("containers", spec.containers.as_slice()),
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let own = c.security_context.as_ref().and_then(|s| s.run_as_user);
            let field = match (own, pod_uid) {
                (Some(uid), _) if uid == i64::from(PROXY_UID) => {
                    format!("spec.{list}[{i}].securityContext.runAsUser")
                }
                (None, Some(uid)) if uid == i64::from(PROXY_UID) => {
                    "spec.securityContext.runAsUser".to_owned()
                }
                _ => continue,
            };
            return Err(InjectError::ProxyUid {
                container: c.name.clone(),
                field,
            });
        }
    }
    Ok(())
}

/// Adds `key: value` to the map at `map_pointer`, creating the map when the pod has none.
fn add_to_map(
    ops: &mut Vec<PatchOp<'_>>,
    map_pointer: &str,
    exists: bool,
    key: &str,
    value: Value,
) {
    if exists {
        ops.push(PatchOp::Add {
            path: format!("{map_pointer}/{}", pointer_token(key)),
            value: value.into(),
        });
    } else {
        let mut map = serde_json::Map::new();
        map.insert(key.to_owned(), value);
        ops.push(PatchOp::Add {
            path: map_pointer.to_owned(),
            value: Value::Object(map).into(),
        });
    }
}

/// Inserts `items` at the front of the array at `pointer`, or creates it.
fn insert_front<'a>(
    ops: &mut Vec<PatchOp<'a>>,
    pointer: &str,
    existing: usize,
    items: Vec<PatchValue<'a>>,
) {
    if existing == 0 {
        ops.push(PatchOp::Add {
            path: pointer.to_owned(),
            value: PatchValue::List(items),
        });
    } else {
        for (i, item) in items.into_iter().enumerate() {
            ops.push(PatchOp::Add {
                path: format!("{pointer}/{i}"),
                value: item,
            });
        }
    }
}

/// The objects rendered at start-up, borrowed.
fn shared(rendered: &Prebuilt) -> [PatchValue<'_>; 5] {
    [
        PatchValue::Shared(&rendered.init),
        PatchValue::Shared(&rendered.proxy),
        PatchValue::Shared(&rendered.token_volume),
        PatchValue::Shared(&rendered.trust_volume),
        PatchValue::Shared(&rendered.report_volume),
    ]
}

/// Objects rendered for one pod's overrides.
fn owned(rendered: Prebuilt) -> [PatchValue<'static>; 5] {
    [
        PatchValue::Raw(rendered.init),
        PatchValue::Raw(rendered.proxy),
        PatchValue::Raw(rendered.token_volume),
        PatchValue::Raw(rendered.trust_volume),
        PatchValue::Raw(rendered.report_volume),
    ]
}

/// Rewrites the probes of the app containers and of sidecar init containers; returns what they
/// were, for the `palisade.dev/app-probes` record.
fn rewrite_all_probes<'a>(
    containers: &[Container],
    init_containers: &[Container],
    ops: &mut Vec<PatchOp<'a>>,
) -> Result<AppProbes, ProbeError> {
    let mut probes = AppProbes::new();
    for (i, c) in containers.iter().enumerate() {
        rewrite_probes(c, &format!("/spec/containers/{i}"), ops, &mut probes)?;
    }
    for (i, c) in init_containers.iter().enumerate() {
        // Only sidecars (restartPolicy: Always) may have probes among init containers.
        if c.restart_policy.as_deref() == Some("Always") {
            rewrite_probes(c, &format!("/spec/initContainers/{i}"), ops, &mut probes)?;
        }
    }
    Ok(probes)
}

/// Appends the token and trust-anchor volumes, creating the list when the pod has none.
fn add_volumes<'a>(ops: &mut Vec<PatchOp<'a>>, no_volumes: bool, added: [PatchValue<'a>; 3]) {
    if no_volumes {
        ops.push(PatchOp::Add {
            path: "/spec/volumes".into(),
            value: PatchValue::List(added.into()),
        });
    } else {
        for volume in added {
            ops.push(PatchOp::Add {
                path: "/spec/volumes/-".into(),
                value: volume,
            });
        }
    }
}

/// A skipped range of a family the nodes do not capture cannot be honoured (`init` closes that
/// family rather than skip part of it): refused, naming the annotation.
fn check_families(overrides: &PodOverrides, settings: &InjectorSettings) -> Result<(), ValueError> {
    let families = settings.ip_families;
    match overrides
        .skip_outbound_cidrs
        .iter()
        .find(|c| !families.captures(c.is_ipv4()))
    {
        None => Ok(()),
        Some(cidr) => {
            let (family, only) = if cidr.is_ipv4() {
                ("IPv4", "IPv6")
            } else {
                ("IPv6", "IPv4")
            };
            let text = overrides
                .skip_outbound_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            Err(ValueError::new(
                annotations::SKIP_OUTBOUND_CIDRS,
                &text,
                format!(
                    "{cidr} is {family}, and this cluster's nodes capture {only} only (palisade-injector --ip-families, chart value ipFamilies): {family} traffic is closed in a meshed pod, so a range of it cannot be skipped"
                ),
                "ranges of the families the nodes capture; or capture both (--ip-families IPv4,IPv6) where the nodes have ip6tables",
            ))
        }
    }
}

/// Builds the patch that injects `pod`. The caller has already decided that it should be
/// injected (see `decision`).
pub fn build_patch<'a>(
    pod: &Pod,
    settings: &'a InjectorSettings,
) -> Result<Injection<'a>, InjectError> {
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    let (overrides, warnings) = parse_overrides(pod.metadata.annotations.as_ref())?;
    check_families(&overrides, settings)?;
    let resources = settings.resources(
        overrides.cpu_request.as_ref(),
        overrides.memory_limit.as_ref(),
    )?;
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    let all: Vec<&Container> = spec.containers.iter().chain(init_containers).collect();
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    check_reserved(&all, &volumes)?;
    check_app_uid(spec)?;

    let mut ops = Vec::new();
    let probes = rewrite_all_probes(&spec.containers, init_containers, &mut ops)?;

    // Pods without overrides (most) get the objects rendered at start-up.
    let [init, proxy, token_volume, trust_volume, report_volume] =
        if overrides == PodOverrides::default() {
            shared(&settings.prebuilt)
        } else {
            owned(Prebuilt::new(&settings.sidecar, &overrides, resources))
        };
    if settings.sidecar.native_sidecar {
        insert_front(
            &mut ops,
            "/spec/initContainers",
            init_containers.len(),
            vec![init, proxy],
        );
    } else {
        insert_front(
            &mut ops,
            "/spec/initContainers",
            init_containers.len(),
            vec![init],
        );
        insert_front(
            &mut ops,
            "/spec/containers",
            spec.containers.len(),
            vec![proxy],
        );
    }
    add_volumes(
        &mut ops,
        volumes.is_empty(),
        [token_volume, trust_volume, report_volume],
    );

    let meta = &pod.metadata;
    add_to_map(
        &mut ops,
        "/metadata/labels",
        meta.labels.is_some(),
        INJECTED_LABEL,
        "true".into(),
    );
    // Always written when the pod brought its own: the proxy runs what it records, so a pod
    // must not choose it.
    let supplied = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(APP_PROBES_ANNOTATION));
    if !probes.is_empty() || supplied {
        let record = serde_json::to_string(&probes).unwrap_or_default();
        add_to_map(
            &mut ops,
            "/metadata/annotations",
            meta.annotations.is_some(),
            APP_PROBES_ANNOTATION,
            record.into(),
        );
    }
    Ok(Injection { ops, warnings })
}

#[cfg(test)]
#[path = "patch_tests.rs"]
mod tests;
