//! A scripted Kubernetes API server behind `tower_test::mock::pair`, in the manner of kube-rs
//! controller-rs `src/fixtures.rs`: each request Palisade sends is checked (method, path, query
//! where it matters, body) and answered with recorded, real-shaped JSON from
//! `tests/fixtures/kube/`.
//!
//! Two ways to use it: [`Scenario`] walks strictly ordered requests (TokenReview, Secret);
//! [`Router`] answers concurrent watchers by route, keeps watch streams open for the test to
//! push events into, and logs every request for later assertions.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::client::Body;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tower_test::mock::{self, Handle, SendResponse};

pub type MockBody = UnsyncBoxBody<Bytes, Infallible>;
pub type ApiHandle = Handle<Request<Body>, Response<MockBody>>;
pub type Responder = SendResponse<Response<MockBody>>;

/// Failure guard for anything awaited in these tests; never a timing assertion.
pub const GUARD: Duration = Duration::from_secs(10);

pub fn mock_client(default_namespace: &str) -> (kube::Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<MockBody>>();
    (kube::Client::new(service, default_namespace), handle)
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fixture with `{{NAME}}` placeholders filled in.
pub fn fixture_with(name: &str, values: &[(&str, &str)]) -> Value {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for (k, v) in values {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

/// A watch response whose events the test sends one JSON line at a time.
pub fn stream_response() -> (mpsc::UnboundedSender<Value>, Response<MockBody>) {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx))
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap();
    (tx, response)
}

/// A request as the API server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Option<Value>,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

fn decode_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

pub async fn receive(handle: &mut ApiHandle) -> (Seen, SendResponse<Response<MockBody>>) {
    let (request, send) = tokio::time::timeout(GUARD, handle.next_request())
        .await
        .expect("the CA sent no request in time")
        .expect("the client went away");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&bytes).expect("request bodies are JSON"))
    };
    let seen = Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: decode_query(parts.uri.query()),
        body,
    };
    (seen, send)
}

/// Strictly ordered expectations: each next request must be the expected one.
pub struct Scenario {
    pub handle: ApiHandle,
}

impl Scenario {
    /// Waits for the next request, checks method and path, answers `reply`, returns what was seen.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        status: StatusCode,
        reply: Value,
    ) -> Seen {
        let (seen, send) = receive(&mut self.handle).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "unexpected request {seen:?}"
        );
        send.send_response(json_response(status, &reply));
        seen
    }

    /// Asserts that no further request arrives (the client is dropped or idle).
    pub async fn expect_no_more(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// One scripted answer of the [`Router`].
pub enum Reply {
    Json(StatusCode, Value),
    /// An open watch stream; events come from the paired sender.
    Stream(Response<MockBody>),
    /// Answered when the test sends the response.
    Deferred(oneshot::Receiver<Response<MockBody>>),
    /// The request's own body sent back, as a create answers.
    Echo(StatusCode),
}

/// Which scripted queue a request takes its answer from.
pub type RouteKey = (Method, String, bool);

/// Answers requests by (method, path, is-watch), logging each; a request with nothing scripted
/// is held open (as a quiet API server would), never answered with a guess.
#[derive(Clone, Default)]
pub struct Router {
    replies: Arc<Mutex<HashMap<RouteKey, VecDeque<Reply>>>>,
    log: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Mutex<Vec<(RouteKey, Responder)>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Router {
    pub fn script(&self, method: Method, path: &str, watch: bool, reply: Reply) {
        let key = (method, path.to_owned(), watch);
        let mut held = self.held.lock().unwrap();
        if let Some(i) = held.iter().position(|(k, _)| *k == key) {
            let (_, send) = held.remove(i);
            answer(send, reply);
            return;
        }
        drop(held);
        self.replies
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push_back(reply);
    }

    /// Scripts a list answer (GET without watch).
    pub fn list(&self, path: &str, body: Value) {
        self.script(Method::GET, path, false, Reply::Json(StatusCode::OK, body));
    }

    /// Scripts an open watch and returns the sender of its events.
    pub fn watch(&self, path: &str) -> mpsc::UnboundedSender<Value> {
        let (tx, response) = stream_response();
        self.script(Method::GET, path, true, Reply::Stream(response));
        tx
    }

    pub fn log(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a request matching `pred` has been seen; returns it.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        self.wait_until(what, |log| log.iter().any(&pred)).await;
        self.log().into_iter().find(|s| pred(s)).expect("seen")
    }

    /// Waits until the request log satisfies `pred`.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.log()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("{what}: not seen; requests: {:#?}", self.log());
            }
        }
    }

    /// Serves `handle` until it closes.
    pub fn serve(&self, mut handle: ApiHandle) -> tokio::task::JoinHandle<()> {
        let router = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let seen = Seen {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_owned(),
                    query: decode_query(parts.uri.query()),
                    body: serde_json::from_slice(&bytes).ok(),
                };
                let key = (seen.method.clone(), seen.path.clone(), seen.is_watch());
                let echo = seen.body.clone().unwrap_or_default();
                router.log.lock().unwrap().push(seen);
                let reply = router
                    .replies
                    .lock()
                    .unwrap()
                    .get_mut(&key)
                    .and_then(VecDeque::pop_front);
                match reply {
                    Some(Reply::Echo(status)) => send.send_response(json_response(status, &echo)),
                    Some(reply) => answer(send, reply),
                    None => router.held.lock().unwrap().push((key, send)),
                }
                router.arrived.notify_waiters();
            }
        })
    }
}

fn answer(send: SendResponse<Response<MockBody>>, reply: Reply) {
    match reply {
        Reply::Json(status, body) => send.send_response(json_response(status, &body)),
        Reply::Stream(response) => send.send_response(response),
        Reply::Echo(_) => panic!("Echo answers only requests that arrive after it is scripted"),
        Reply::Deferred(rx) => {
            tokio::spawn(async move {
                if let Ok(response) = rx.await {
                    send.send_response(response);
                }
            });
        }
    }
}
