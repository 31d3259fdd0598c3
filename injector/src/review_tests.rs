use base64::Engine as _;
use serde_json::{Value, json};

use super::*;
use crate::settings::RawSettings;

fn settings() -> InjectorSettings {
    RawSettings::default().validate().unwrap()
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
}

fn review_of(object: Value, operation: &str, kind: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

fn pod_kind() -> Value {
    json!({"group": "", "version": "v1", "kind": "Pod"})
}

fn answer(review_json: &Value) -> (Value, ReviewOutcome) {
    let outcome = review(&serde_json::to_vec(review_json).unwrap(), &settings()).unwrap();
    let body: Value = serde_json::from_slice(&outcome.body).unwrap();
    (body, outcome)
}

fn error_of(body: &[u8]) -> ReviewError {
    review(body, &settings()).unwrap_err()
}

#[test]
fn pod_creation_is_answered_with_a_base64_json_patch() {
    let (body, outcome) = answer(&review_of(pod(), "CREATE", pod_kind()));
    assert_eq!(outcome.verdict, Verdict::Injected);
    assert_eq!(outcome.subject, "shop/web-…");
    assert!(outcome.patch_build.is_some());
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let response = &body["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert_eq!(response["auditAnnotations"]["decision"], "injected");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut mutated = pod();
    json_patch::patch(&mut mutated, &patch).unwrap();
    assert_eq!(
        mutated["spec"]["initContainers"][1]["name"],
        "palisade-proxy"
    );
}

#[test]
fn skips_are_allowed_without_a_patch() {
    let mut opted_out = pod();
    opted_out["metadata"]["labels"] = json!({"palisade.dev/inject": "disabled"});
    let cases = [
        (
            review_of(pod(), "UPDATE", pod_kind()),
            SkipReason::NotCreate,
        ),
        (
            review_of(pod(), "DELETE", pod_kind()),
            SkipReason::NotCreate,
        ),
        (
            review_of(
                json!({"apiVersion": "apps/v1", "kind": "Deployment"}),
                "CREATE",
                json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            ),
            SkipReason::NotPod,
        ),
        (
            review_of(opted_out, "CREATE", pod_kind()),
            SkipReason::OptedOut,
        ),
    ];
    for (input, reason) in cases {
        let (body, outcome) = answer(&input);
        assert_eq!(outcome.verdict, Verdict::Skipped(reason));
        let response = &body["response"];
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
        assert!(response.get("patchType").is_none());
        assert_eq!(
            response["auditAnnotations"]["decision"],
            format!("skipped: {}", reason.as_str())
        );
    }
}

#[test]
fn delete_without_object_is_skipped_not_rejected() {
    let mut input = review_of(Value::Null, "DELETE", pod_kind());
    input["request"]["oldObject"] = pod();
    let (_, outcome) = answer(&input);
    assert_eq!(outcome.verdict, Verdict::Skipped(SkipReason::NotCreate));
}

#[test]
fn invalid_annotation_is_denied_with_a_message_naming_it() {
    let mut p = pod();
    p["metadata"]["annotations"] = json!({"palisade.dev/proxy-memory-limit": "lots"});
    let (body, outcome) = answer(&review_of(p, "CREATE", pod_kind()));
    assert_eq!(
        outcome.verdict,
        Verdict::Denied(DenyReason::InvalidAnnotation)
    );
    let response = &body["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("palisade.dev/proxy-memory-limit=\"lots\" is invalid"),
        "{message}"
    );
    assert!(message.contains("\"128Mi\""), "{message}");
    assert!(response.get("patch").is_none());
}

#[test]
fn unknown_inject_value_is_denied() {
    let mut p = pod();
    p["metadata"]["labels"] = json!({"palisade.dev/inject": "false"});
    let (body, outcome) = answer(&review_of(p, "CREATE", pod_kind()));
    assert_eq!(
        outcome.verdict,
        Verdict::Denied(DenyReason::InvalidInjectValue)
    );
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("label palisade.dev/inject")
    );
}

#[test]
fn malformed_input_gets_a_clear_error() {
    let good = review_of(pod(), "CREATE", pod_kind());
    let with = |edit: fn(&mut Value)| {
        let mut v = good.clone();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"{not json".to_vec(),
            "not_json",
            "not a JSON AdmissionReview",
        ),
        (b"".to_vec(), "not_json", "not a JSON AdmissionReview"),
        (b"[]".to_vec(), "not_json", "not a JSON AdmissionReview"),
        (
            with(|v| v["apiVersion"] = json!("admission.k8s.io/v1beta1")),
            "wrong_api_version",
            "admissionReviewVersions",
        ),
        (
            with(|v| {
                v.as_object_mut().unwrap().remove("apiVersion");
            }),
            "wrong_api_version",
            "None",
        ),
        (
            with(|v| v["kind"] = json!("Pod")),
            "wrong_kind",
            "\"AdmissionReview\"",
        ),
        (
            with(|v| {
                v.as_object_mut().unwrap().remove("request");
            }),
            "missing_request",
            "no request",
        ),
        (
            with(|v| v["request"] = Value::Null),
            "missing_request",
            "no request",
        ),
        (
            with(|v| {
                v["request"].as_object_mut().unwrap().remove("uid");
            }),
            "missing_uid",
            "request.uid",
        ),
        (
            with(|v| v["request"]["uid"] = json!("")),
            "missing_uid",
            "request.uid",
        ),
        (
            with(|v| {
                v["request"].as_object_mut().unwrap().remove("operation");
            }),
            "malformed_request",
            "operation",
        ),
        (
            with(|v| v["request"]["operation"] = json!("MERGE")),
            "malformed_request",
            "MERGE",
        ),
        (
            with(|v| v["request"]["object"] = Value::Null),
            "missing_object",
            "request.object",
        ),
        (
            with(|v| v["request"]["object"]["spec"]["containers"] = json!("app")),
            "malformed_pod",
            "not a valid Pod",
        ),
        (
            with(|v| {
                v["request"].as_object_mut().unwrap().remove("userInfo");
            }),
            "malformed_request",
            "userInfo",
        ),
    ];
    for (body, code, needle) in cases {
        let err = error_of(&body);
        assert_eq!(err.code(), code, "{err}");
        assert!(err.to_string().contains(needle), "{code}: {err}");
    }
}

#[test]
fn no_prefix_or_byte_flip_of_a_review_panics() {
    let good = serde_json::to_vec(&review_of(pod(), "CREATE", pod_kind())).unwrap();
    for end in 0..good.len() {
        let _ = review(&good[..end], &settings());
    }
    for i in 0..good.len() {
        for replacement in [b'"', b'{', b'}', b'0', 0xff] {
            let mut bad = good.clone();
            bad[i] = replacement;
            let _ = review(&bad, &settings());
        }
    }
}

#[test]
fn response_strings_are_escaped_and_warnings_passed_on() {
    let mut input = review_of(pod(), "CREATE", pod_kind());
    input["request"]["uid"] = json!("odd \"uid\" \\ ünï\n");
    input["request"]["object"]["metadata"]["annotations"] = json!({"palisade.dev/typo": "x"});
    let (body, outcome) = answer(&input);
    assert_eq!(outcome.verdict, Verdict::Injected);
    assert_eq!(body["response"]["uid"], "odd \"uid\" \\ ünï\n");
    let warnings = body["response"]["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].as_str().unwrap().contains("palisade.dev/typo"));
    let keys: Vec<&String> = body["response"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "allowed",
            "auditAnnotations",
            "patch",
            "patchType",
            "uid",
            "warnings"
        ]
    );
}

#[test]
fn one_pass_and_step_by_step_parsing_agree() {
    let mut deletion = review_of(Value::Null, "DELETE", pod_kind());
    deletion["request"]["oldObject"] = pod();
    let inputs = [
        review_of(pod(), "CREATE", pod_kind()),
        review_of(pod(), "UPDATE", pod_kind()),
        deletion,
    ];
    for input in inputs {
        let body = serde_json::to_vec(&input).unwrap();
        let fast = parse_fast(&body).expect("a well-formed review parses in one pass");
        let checked = parse_checked(&body).unwrap();
        assert_eq!(fast.uid, checked.uid);
        assert_eq!(fast.kind, checked.kind);
        assert_eq!(fast.operation, checked.operation);
        assert_eq!(fast.namespace, checked.namespace);
        assert_eq!(fast.name, checked.name);
        if checked.pod.is_some() {
            assert_eq!(fast.pod, checked.pod);
        }
    }
    // A Deployment is not a Pod: the one-pass parse gives up and the checked one skips it.
    let deployment = review_of(
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "spec": {"template": {"spec": {"containers": []}}}}),
        "CREATE",
        json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
    );
    let body = serde_json::to_vec(&deployment).unwrap();
    assert!(parse_fast(&body).is_none());
    assert!(parse_checked(&body).unwrap().pod.is_none());
}
