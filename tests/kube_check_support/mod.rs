//! A scripted Kubernetes API server for `palisade check`, behind `tower_test::mock::pair` (as
//! `ca/tests/kube_support`): every request is answered by its path from recorded, real-shaped
//! JSON in `tests/fixtures/kube-check/`, a path with nothing recorded gets the API server's 404
//! Status, and every request is logged.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use palisade::check::{CheckArgs, Output, check_cluster};
use palisade_testkit::pki::webhook_serving;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

type MockBody = UnsyncBoxBody<Bytes, Infallible>;

pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const SERVICE_ACCOUNTS: &str = "/api/v1/serviceaccounts";
pub const POLICIES: &str = "/apis/palisade.dev/v1alpha1/meshpolicies";
pub const WEBHOOK: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/palisade-injector";
pub const SECRET: &str = "/api/v1/namespaces/palisade-system/secrets/palisade-injector-tls";
pub const CRD: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/meshpolicies.palisade.dev";
pub const CA_POD: &str = "palisade-ca-6b8f9c7d5-x7k2p";
pub const ROTATION: &str =
    "/api/v1/namespaces/palisade-system/pods/palisade-ca-6b8f9c7d5-x7k2p:15014/proxy/rotation";
pub const METRICS: &str =
    "/api/v1/namespaces/palisade-system/pods/palisade-ca-6b8f9c7d5-x7k2p:15014/proxy/metrics";

/// The injector's serving certificate's names, as the chart's `genSignedCert` gives them.
pub const INJECTOR_NAMES: [&str; 4] = [
    "palisade-injector",
    "palisade-injector.palisade-system",
    "palisade-injector.palisade-system.svc",
    "palisade-injector.palisade-system.svc.cluster.local",
];

/// One answer of the API server.
#[derive(Debug, Clone)]
pub enum Answer {
    Json(u16, Value),
    Text(u16, String),
    /// The connection fails (the API server is unreachable).
    Down,
    /// No answer ever comes (the pod proxy waits on a hung pod).
    Silent,
}

fn text_of(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/kube-check/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fixture with `{{NAME}}` placeholders filled in.
pub fn fixture_with(name: &str, values: &[(&str, String)]) -> String {
    let mut text = text_of(name);
    for (k, v) in values {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    text
}

pub fn fixture(name: &str) -> Value {
    serde_json::from_str(&text_of(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

/// The 404 the API server answers for an object or kind it does not have.
pub fn not_found(path: &str) -> Answer {
    let name = path.rsplit('/').next().unwrap_or_default();
    Answer::Json(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("the server could not find the requested resource ({name})"),
               "reason": "NotFound", "details": {"name": name}, "code": 404}),
    )
}

pub fn forbidden(resource: &str) -> Answer {
    Answer::Json(
        403,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{resource} is forbidden: User \"system:serviceaccount:ci:auditor\" cannot list resource \"{resource}\" in API group \"\" at the cluster scope"),
               "reason": "Forbidden", "details": {"kind": resource}, "code": 403}),
    )
}

/// The objects of a cluster, by request path; a test breaks one and runs the command.
pub struct Cluster {
    pub answers: BTreeMap<&'static str, Answer>,
}

/// What one run printed and returned, and the requests it made.
pub struct Run {
    pub code: ExitCode,
    pub stdout: String,
    pub stderr: String,
    pub requests: Vec<(Method, String)>,
}

impl Run {
    /// The JSON output's lines.
    pub fn results(&self) -> Vec<Value> {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    /// The names of the red checks, in order, without repeats.
    pub fn red(&self) -> Vec<String> {
        let mut red: Vec<String> = Vec::new();
        for r in self.results() {
            let check = r["check"].as_str().unwrap().to_owned();
            if r["ok"] == false && !red.contains(&check) {
                red.push(check);
            }
        }
        red
    }

    /// The red line of `check` whose message contains `text`, as `(message, fix)`.
    pub fn red_line(&self, check: &str, text: &str) -> (String, String) {
        self.results()
            .into_iter()
            .find(|r| {
                r["check"] == check
                    && r["ok"] == false
                    && r["message"].as_str().unwrap().contains(text)
            })
            .map(|r| {
                (
                    r["message"].as_str().unwrap().to_owned(),
                    r["fix"].as_str().unwrap().to_owned(),
                )
            })
            .unwrap_or_else(|| panic!("no red {check} line with {text:?} in {}", self.stdout))
    }
}

impl Cluster {
    /// A healthy cluster: the chart installed in palisade-system, namespace shop opted in with
    /// two meshed pods, one MeshPolicy, CA keys far from expiry.
    pub fn healthy() -> Cluster {
        Cluster::with_injector_days(3650)
    }

    /// [`Cluster::healthy`] with the injector's serving certificate valid for `days`.
    pub fn with_injector_days(days: i64) -> Cluster {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let pki = webhook_serving(&INJECTOR_NAMES, days);
        let certs = [
            ("CA_BUNDLE", b64(&pki.ca_pem)),
            ("TLS_CRT", b64(&pki.cert_pem)),
        ];
        let json = |name: &str, values: &[(&str, String)]| {
            let text = fixture_with(name, values);
            Answer::Json(
                200,
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        };
        let (root, intermediate) = (now + 3000 * 86_400, now + 300 * 86_400);
        let times = [
            ("ROOT_EXPIRES_AT", rfc3339(root)),
            ("INTERMEDIATE_EXPIRES_AT", rfc3339(intermediate)),
            ("MESH_EXPIRES_AT", rfc3339(now + 1742)),
            ("ROOT_EXPIRY", root.to_string()),
            ("INTERMEDIATE_EXPIRY", intermediate.to_string()),
            (
                "INTERMEDIATE_EXPIRY_SECONDS",
                (intermediate - now).to_string(),
            ),
        ];
        let answers = BTreeMap::from([
            (NAMESPACES, json("namespace-list.json", &[])),
            (PODS, json("pod-list.json", &[])),
            (SERVICE_ACCOUNTS, json("serviceaccount-list.json", &[])),
            (POLICIES, json("meshpolicy-list.json", &[])),
            (WEBHOOK, json("mutatingwebhookconfiguration.json", &certs)),
            (SECRET, json("secret-injector-tls.json", &certs)),
            (CRD, json("crd-meshpolicies.json", &[])),
            (ROTATION, json("ca-rotation.json", &times)),
            (
                METRICS,
                Answer::Text(200, fixture_with("ca-metrics.txt", &times)),
            ),
        ]);
        Cluster { answers }
    }

    /// The JSON answered at `path`, to change.
    pub fn json(&mut self, path: &str) -> &mut Value {
        match self.answers.get_mut(path) {
            Some(Answer::Json(_, v)) => v,
            other => panic!("{path} answers no JSON: {other:?}"),
        }
    }

    /// The item of a list answered at `path` named `name`.
    pub fn item(&mut self, path: &str, name: &str) -> &mut Value {
        self.json(path)["items"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|i| i["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {path}"))
    }

    pub fn answer(&mut self, path: &'static str, answer: Answer) {
        self.answers.insert(path, answer);
    }

    /// Runs `palisade check` against this cluster.
    pub async fn check(&self, output: Output) -> Run {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let client = kube::Client::new(service, "default");
        let answers = self.answers.clone();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                seen.lock()
                    .unwrap()
                    .push((request.method().clone(), path.clone()));
                let answer = answers
                    .get(path.as_str())
                    .cloned()
                    .unwrap_or_else(|| not_found(&path));
                let (status, content_type, body) = match answer {
                    Answer::Json(status, value) => (status, "application/json", value.to_string()),
                    Answer::Text(status, text) => (status, "text/plain; version=0.0.4", text),
                    Answer::Silent => {
                        held.push(send);
                        continue;
                    }
                    Answer::Down => {
                        send.send_error(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "connection refused",
                        ));
                        continue;
                    }
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(
                            Full::new(Bytes::from(body))
                                .map_err(|e| match e {})
                                .boxed_unsync(),
                        )
                        .unwrap(),
                );
            }
        });
        let args = CheckArgs {
            output,
            namespace: "palisade-system".into(),
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let code = check_cluster(client, &args, false, &mut stdout, &mut stderr).await;
        server.abort();
        let requests = log.lock().unwrap().clone();
        Run {
            code,
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
            requests,
        }
    }
}
