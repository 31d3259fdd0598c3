use serde_json::{Value, json};

use super::*;
use crate::decision::{SkipReason, skip_pod};
use crate::settings::RawSettings;

fn settings() -> InjectorSettings {
    RawSettings::default().validate().unwrap()
}

fn classic() -> InjectorSettings {
    RawSettings {
        native_sidecar: false,
        ..RawSettings::default()
    }
    .validate()
    .unwrap()
}

/// Applies the patch with the `json-patch` crate, an RFC 6902 implementation of its own.
fn apply(pod: &Value, ops: &[PatchOp]) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::to_value(ops).unwrap()).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

fn inject_with(pod: Value, settings: &InjectorSettings) -> (Value, Injection<'_>) {
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let injection = build_patch(&typed, settings).unwrap();
    (apply(&pod, &injection.ops), injection)
}

fn inject(pod: Value) -> (Value, Vec<Value>, Vec<String>) {
    let settings = settings();
    let (pod, injection) = inject_with(pod, &settings);
    let ops = injection
        .ops
        .iter()
        .map(|op| serde_json::to_value(op).unwrap())
        .collect();
    (pod, ops, injection.warnings)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn minimal() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
}

#[test]
fn pointer_tokens_escape_tilde_then_slash() {
    assert_eq!(pointer_token("app"), "app");
    assert_eq!(
        pointer_token("palisade.dev/injected"),
        "palisade.dev~1injected"
    );
    assert_eq!(pointer_token("a~b"), "a~0b");
    // `~1` written literally must not turn into `/` on the way back.
    assert_eq!(pointer_token("~1/"), "~01~1");
}

#[test]
fn minimal_pod_gets_everything_in_order() {
    let (pod, ops, _) = inject(minimal());
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["palisade-init", "palisade-proxy"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "palisade-token",
            "palisade-trust-anchors",
            "palisade-init-report"
        ]
    );
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"palisade.dev/injected": "true"})
    );
    assert!(
        pod["metadata"].get("annotations").is_none(),
        "no probes, no record"
    );
    let paths: Vec<String> = ops
        .iter()
        .map(|op| {
            serde_json::to_value(op).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        paths,
        ["/spec/initContainers", "/spec/volumes", "/metadata/labels"]
    );
}

#[test]
fn init_reports_to_the_proxy_through_a_memory_volume_only_init_can_write() {
    let (pod, _, _) = inject(minimal());
    let volume = &pod["spec"]["volumes"][2];
    assert_eq!(
        volume,
        &json!({"name": "palisade-init-report", "emptyDir": {"medium": "Memory", "sizeLimit": "64Ki"}})
    );
    let init = &pod["spec"]["initContainers"][0];
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(
        init["volumeMounts"],
        json!([{"name": "palisade-init-report", "mountPath": "/var/run/palisade/init"}])
    );
    assert!(
        proxy["volumeMounts"].as_array().unwrap().contains(
            &json!({"name": "palisade-init-report", "mountPath": "/var/run/palisade/init", "readOnly": true})
        )
    );
}

#[test]
fn proxy_security_context_is_locked_down() {
    let (pod, _, _) = inject(minimal());
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(
        proxy["securityContext"],
        json!({"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true, "privileged": false,
               "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["command"], json!(["palisade-proxy", "run"]));
}

#[test]
fn proxy_goes_before_the_apps_own_init_containers() {
    let mut p = minimal();
    p["spec"]["initContainers"] = json!([
        {"name": "migrate", "image": "busybox"},
        {"name": "log-shipper", "image": "fluent", "restartPolicy": "Always"},
    ]);
    let (pod, _, _) = inject(p);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["palisade-init", "palisade-proxy", "migrate", "log-shipper"]
    );
}

#[test]
fn empty_lists_and_maps_are_filled_not_appended_to() {
    let mut p = minimal();
    p["spec"]["initContainers"] = json!([]);
    p["spec"]["volumes"] = json!([]);
    p["metadata"]["labels"] = json!({});
    let (pod, _, _) = inject(p);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["palisade-init", "palisade-proxy"]
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "palisade-token",
            "palisade-trust-anchors",
            "palisade-init-report"
        ]
    );
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"palisade.dev/injected": "true"})
    );
}

#[test]
fn existing_volumes_stay_first() {
    let mut p = minimal();
    let volumes: Vec<Value> = (0..12)
        .map(|i| json!({"name": format!("data-{i}"), "emptyDir": {}}))
        .collect();
    p["spec"]["volumes"] = Value::Array(volumes);
    let (pod, _, _) = inject(p);
    let got = names(&pod["spec"]["volumes"]);
    assert_eq!(got.len(), 15);
    assert_eq!(got[0], "data-0");
    assert_eq!(got[11], "data-11");
    assert_eq!(
        &got[12..],
        [
            "palisade-token",
            "palisade-trust-anchors",
            "palisade-init-report"
        ]
    );
}

#[test]
fn odd_label_and_annotation_keys_survive_and_are_escaped() {
    let mut p = minimal();
    p["metadata"]["labels"] = json!({"app.kubernetes.io/name": "web", "a~b": "c"});
    p["metadata"]["annotations"] = json!({"example.com/x~y": "z"});
    p["spec"]["containers"][0]["readinessProbe"] = json!({"tcpSocket": {"port": 80}});
    let (pod, ops, _) = inject(p);
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"app.kubernetes.io/name": "web", "a~b": "c", "palisade.dev/injected": "true"})
    );
    assert_eq!(pod["metadata"]["annotations"]["example.com/x~y"], "z");
    let text = serde_json::to_string(&ops).unwrap();
    assert!(
        text.contains("\"/metadata/labels/palisade.dev~1injected\""),
        "{text}"
    );
    assert!(
        text.contains("\"/metadata/annotations/palisade.dev~1app-probes\""),
        "{text}"
    );
}

#[test]
fn probes_of_every_kind_are_rewritten_and_recorded() {
    let mut p = minimal();
    p["spec"]["containers"] = json!([
        {"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}],
         "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
         "readinessProbe": {"tcpSocket": {"port": 8080}},
         "startupProbe": {"grpc": {"port": 9090}}},
        {"name": "worker", "image": "w", "livenessProbe": {"exec": {"command": ["true"]}}},
    ]);
    let (pod, _, _) = inject(p);
    let web = &pod["spec"]["containers"][0];
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"},
               "periodSeconds": 5})
    );
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"}})
    );
    assert_eq!(
        web["startupProbe"],
        json!({"httpGet": {"path": "/app-health/web/startupz", "port": 15021, "scheme": "HTTP"}})
    );
    assert_eq!(
        pod["spec"]["containers"][1]["livenessProbe"],
        json!({"exec": {"command": ["true"]}})
    );
    let record: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["palisade.dev/app-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        record,
        json!({
            "web/livez": {"httpGet": {"path": "/healthz", "port": 8080}},
            "web/readyz": {"tcpSocket": {"port": 8080}},
            "web/startupz": {"grpc": {"port": 9090}},
        })
    );
}

#[test]
fn probes_of_native_sidecars_are_rewritten_at_their_shifted_place() {
    let mut p = minimal();
    p["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "busybox"},
        {"name": "envoy", "image": "e", "restartPolicy": "Always",
         "readinessProbe": {"tcpSocket": {"port": 9901}}},
    ]);
    let (pod, _, _) = inject(p);
    let envoy = &pod["spec"]["initContainers"][3];
    assert_eq!(envoy["name"], "envoy");
    assert_eq!(
        envoy["readinessProbe"]["httpGet"]["path"],
        "/app-health/envoy/readyz"
    );
    assert!(envoy["readinessProbe"].get("tcpSocket").is_none());
}

#[test]
fn classic_mode_puts_the_proxy_first_and_keeps_probe_targets_right() {
    let mut p = minimal();
    p["spec"]["containers"] = json!([
        {"name": "a", "image": "a"},
        {"name": "b", "image": "b", "livenessProbe": {"tcpSocket": {"port": 81}}},
    ]);
    let (pod, _) = inject_with(p, &classic());
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["palisade-proxy", "a", "b"]
    );
    assert_eq!(names(&pod["spec"]["initContainers"]), ["palisade-init"]);
    assert_eq!(
        pod["spec"]["containers"][2]["livenessProbe"]["httpGet"]["path"],
        "/app-health/b/livez"
    );
    assert!(pod["spec"]["containers"][0].get("restartPolicy").is_none());
    assert!(pod["spec"]["containers"][0]["lifecycle"]["postStart"].is_object());
}

#[test]
fn annotations_set_resources_ports_and_log_level() {
    let mut p = minimal();
    p["metadata"]["annotations"] = json!({
        "palisade.dev/proxy-cpu-request": "250m",
        "palisade.dev/proxy-memory-limit": "1Gi",
        "palisade.dev/skip-inbound-ports": "22",
        "palisade.dev/skip-outbound-ports": "5432",
        "palisade.dev/skip-outbound-cidrs": "169.254.169.254/32",
        "palisade.dev/log-level": "debug",
    });
    let (pod, _, _) = inject(p);
    let init = &pod["spec"]["initContainers"][0];
    let proxy = &pod["spec"]["initContainers"][1];
    for c in [init, proxy] {
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}})
        );
    }
    let command = init["command"].to_string();
    assert!(
        command.contains(r#""--skip-inbound-ports","22,15021""#),
        "{command}"
    );
    assert!(
        command.contains(r#""--skip-outbound-ports","5432""#),
        "{command}"
    );
    assert!(
        command.contains(r#""--skip-outbound-cidrs","169.254.169.254/32""#),
        "{command}"
    );
    assert!(
        proxy["env"]
            .to_string()
            .contains(r#"{"name":"PALISADE_LOG","value":"debug"}"#)
    );
}

#[test]
fn invalid_annotation_is_refused_naming_it() {
    let mut p = minimal();
    p["metadata"]["annotations"] = json!({"palisade.dev/skip-outbound-ports": "postgres"});
    let typed: Pod = serde_json::from_value(p).unwrap();
    let err = build_patch(&typed, &settings()).unwrap_err();
    assert_eq!(err.annotation(), Some("palisade.dev/skip-outbound-ports"));
    assert!(err.to_string().contains("e.g. \"8080,9090\""), "{err}");
}

#[test]
fn reserved_names_and_ports_are_refused() {
    for volume in ["palisade-token", "palisade-init-report"] {
        let mut p = minimal();
        p["spec"]["volumes"] = json!([{"name": volume, "emptyDir": {}}]);
        let typed: Pod = serde_json::from_value(p).unwrap();
        assert!(matches!(
            build_patch(&typed, &settings()),
            Err(InjectError::ReservedName { kind: "volume", .. })
        ));
    }

    let mut p = minimal();
    p["spec"]["initContainers"] = json!([{"name": "palisade-init", "image": "x"}]);
    let typed: Pod = serde_json::from_value(p).unwrap();
    assert!(matches!(
        build_patch(&typed, &settings()),
        Err(InjectError::ReservedName {
            kind: "container",
            ..
        })
    ));

    let mut p = minimal();
    p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15006}]);
    let typed: Pod = serde_json::from_value(p).unwrap();
    let err = build_patch(&typed, &settings()).unwrap_err();
    assert!(err.to_string().contains("port 15006"), "{err}");
}

#[test]
fn unknown_palisade_annotations_warn_but_inject() {
    let mut p = minimal();
    p["metadata"]["annotations"] = json!({"palisade.dev/proxy-cpu-limt": "1"});
    let (_, _, warnings) = inject(p);
    assert_eq!(warnings.len(), 1);
}

#[test]
fn the_injected_pod_is_not_injected_again() {
    let mut p = minimal();
    p["spec"]["containers"][0]["livenessProbe"] = json!({"tcpSocket": {"port": 80}});
    for settings in [settings(), classic()] {
        let (pod, _) = inject_with(p.clone(), &settings);
        let typed: Pod = serde_json::from_value(pod).unwrap();
        assert_eq!(skip_pod(&typed).unwrap(), Some(SkipReason::AlreadyInjected));
    }
}

#[test]
fn an_app_running_as_the_proxy_uid_is_refused_with_the_field_named() {
    let s = settings();
    let deny = |pod: Value| {
        let typed: Pod = serde_json::from_value(pod).unwrap();
        build_patch(&typed, &s).unwrap_err().to_string()
    };
    let mut pod = minimal();
    pod["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337});
    let err = deny(pod.clone());
    assert!(
        err.contains("spec.containers[0].securityContext.runAsUser is 1337")
            && err.contains("run it as another uid"),
        "{err}"
    );
    let mut pod_level = minimal();
    pod_level["spec"]["securityContext"] = json!({"runAsUser": 1337});
    assert!(deny(pod_level.clone()).contains("spec.securityContext.runAsUser is 1337"));
    // A container's own uid wins over the pod's.
    pod_level["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1000});
    inject(pod_level);
    let mut init = minimal();
    init["spec"]["initContainers"] = json!([{"name": "setup", "image": "busybox",
        "securityContext": {"runAsUser": 1337}}]);
    assert!(deny(init).contains("spec.initContainers[0].securityContext.runAsUser"));
}

#[test]
fn an_app_probes_annotation_the_pod_brought_is_overwritten() {
    let mut pod = minimal();
    pod["metadata"]["annotations"] = json!({
        "palisade.dev/app-probes": "{\"app/liveness\": {\"httpGet\": {\"port\": 15000, \"path\": \"/internal\"}}}"
    });
    let (patched, _, _) = inject(pod);
    assert_eq!(
        patched["metadata"]["annotations"]["palisade.dev/app-probes"], "{}",
        "a pod without probes to rewrite records none, whatever it brought"
    );
}

#[test]
fn a_skipped_range_of_a_family_the_nodes_do_not_capture_is_refused_naming_the_annotation() {
    let mut pod = minimal();
    pod["metadata"]["annotations"] =
        json!({"palisade.dev/skip-outbound-cidrs": "10.0.0.0/8,fd00:ec2::254"});
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    // Both families captured (the default): both ranges reach init.
    let (patched, _) = inject_with(pod, &settings());
    let init = &patched["spec"]["initContainers"][0]["command"];
    assert!(
        init.to_string().contains("10.0.0.0/8,fd00:ec2::254/128"),
        "{init}"
    );
    let v4_only = RawSettings {
        ip_families: "IPv4".into(),
        ..RawSettings::default()
    }
    .validate()
    .unwrap();
    let err = build_patch(&typed, &v4_only).unwrap_err().to_string();
    for part in [
        "palisade.dev/skip-outbound-cidrs",
        "fd00:ec2::254/128 is IPv6",
        "--ip-families",
    ] {
        assert!(err.contains(part), "{part} in {err}");
    }
    for bad in ["", "IPv5", "ipv4"] {
        let e = RawSettings {
            ip_families: bad.into(),
            ..RawSettings::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--ip-families="), "{e}");
    }
}
