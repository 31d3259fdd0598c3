//! The unmeshed-pod scan against a scripted API server: which pods it lists, the one Event per
//! unmeshed pod, the counts on `/metrics`, what it forgets, and what it keeps when a list fails.

mod kube_support;

use std::collections::BTreeSet;
use std::sync::Arc;

use http::{Method, StatusCode};
use kube_support::{Reply, Router, Seen, fixture, mock_client};
use palisade_ca::kube::unmeshed::{SCAN_EVERY, report_unmeshed};
use palisade_ca::metrics::Metrics;
use tokio::sync::watch;

const PODS: &str = "/api/v1/namespaces/shop/pods";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const WEB_UID: &str = "5b0e7a3c-9d41-4f8e-a6c2-3e1d7b9f0a24";

struct Running {
    router: Router,
    metrics: Arc<Metrics>,
    opted_in: watch::Sender<BTreeSet<String>>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the scan over `namespaces`; the CA's own namespace is never scanned.
fn start(router: Router, namespaces: &[&str]) -> Running {
    let (client, handle) = mock_client("palisade-system");
    router.serve(handle);
    let metrics = Arc::new(Metrics::new(0));
    let (opted_in, opted_rx) = watch::channel(namespaces.iter().map(|n| n.to_string()).collect());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(report_unmeshed(
        client,
        metrics.clone(),
        BTreeSet::from(["palisade-system".to_owned(), "kube-system".to_owned()]),
        opted_rx,
        shutdown_rx,
    ));
    Running {
        router,
        metrics,
        opted_in,
        shutdown,
        task,
    }
}

fn is_list(path: &str) -> impl Fn(&Seen) -> bool + '_ {
    move |s| s.method == Method::GET && s.path == path
}

/// Any write of an Event: a create, or the Recorder's patch of an Event it posted before.
fn is_event(s: &Seen) -> bool {
    s.path.starts_with(EVENTS)
}

impl Running {
    /// Waits until `n` lists of `path` were sent: the scans before the last are complete.
    async fn lists_seen(&self, path: &str, n: usize) {
        self.router
            .wait_until(&format!("list {n} of {path}"), |log| {
                log.iter().filter(|s| is_list(path)(s)).count() >= n
            })
            .await;
    }

    /// Lets `n` scans start, a scan interval apart; the last one's list is held open (nothing
    /// scripted), so every scan before it has done all it would do.
    async fn scans(&self, path: &str, n: usize) {
        self.lists_seen(path, 1).await;
        for k in 2..=n {
            tokio::time::advance(SCAN_EVERY).await;
            self.lists_seen(path, k).await;
        }
    }

    fn events(&self) -> Vec<Seen> {
        self.router.log().into_iter().filter(is_event).collect()
    }

    fn metric_lines(&self) -> Vec<String> {
        self.metrics
            .render(0)
            .lines()
            .filter(|l| {
                l.starts_with("palisade_unmeshed_pods")
                    || l.starts_with("palisade_opted_out_pods")
                    || l.starts_with("palisade_ca_unmeshed_scan_errors_total")
            })
            .map(str::to_owned)
            .collect()
    }
}

const SHOP_COUNTS: [&str; 3] = [
    "palisade_unmeshed_pods{namespace=\"shop\"} 1",
    "palisade_opted_out_pods{namespace=\"shop\",reason=\"opted_out\"} 1",
    "palisade_opted_out_pods{namespace=\"shop\",reason=\"host_network\"} 1",
];

#[tokio::test(start_paused = true)]
async fn an_unmeshed_pod_gets_one_event_and_the_counts_are_published() {
    let router = Router::default();
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    let ca = start(router, &["shop", "palisade-system"]);
    ca.scans(PODS, 3).await;

    let lists: Vec<Seen> = ca.router.log().into_iter().filter(is_list(PODS)).collect();
    assert_eq!(
        lists[0].query.get("labelSelector").map(String::as_str),
        Some("!palisade.dev/injected"),
        "only pods without the injected label are listed"
    );
    assert!(
        !ca.router
            .log()
            .iter()
            .any(|s| s.path.contains("palisade-system")),
        "the control plane's own namespace is never scanned"
    );
    let events = ca.events();
    assert_eq!(
        events.len(),
        1,
        "one Event per pod, not one per scan: {events:#?}"
    );
    let event = events[0].body.clone().unwrap();
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!(event["reason"], "Unmeshed");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], "palisade-ca");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert_eq!(event["regarding"]["name"], "web-7d9f8c6b5-x2k4p");
    assert_eq!(event["regarding"]["namespace"], "shop");
    assert_eq!(event["regarding"]["uid"], WEB_UID);
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with(
            "pod runs without the Palisade proxy in namespace shop, which is opted in"
        ),
        "{note}"
    );
    assert!(
        note.ends_with("kubectl -n shop rollout restart deployment/web"),
        "{note}"
    );

    let lines = ca.metric_lines();
    for line in SHOP_COUNTS {
        assert!(lines.contains(&line.to_owned()), "{line} in {lines:#?}");
    }
    assert!(
        !lines.iter().any(|l| l.contains("palisade-system")),
        "{lines:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_disappears_is_forgotten() {
    let router = Router::default();
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.list(PODS, fixture("pod-list-uninjected-web-gone.json"));
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    let ca = start(router, &["shop"]);
    ca.scans(PODS, 3).await;
    assert!(
        ca.metric_lines()
            .contains(&"palisade_unmeshed_pods{namespace=\"shop\"} 0".to_owned()),
        "{:#?}",
        ca.metric_lines()
    );
    // The same pod (same uid) listed again after it was forgotten is reported again: within
    // minutes, kube's Recorder counts it on the first Event (a PATCH of its series).
    ca.router.list(PODS, fixture("pod-list-uninjected.json"));
    let again = ca
        .router
        .wait_for("the pod reported again", |s| {
            s.method == Method::PATCH && s.path.starts_with(EVENTS)
        })
        .await;
    let body = again.body.unwrap();
    assert_eq!(body["regarding"]["uid"], WEB_UID);
    assert_eq!(body["series"]["count"], 2);
    assert_eq!(ca.events().len(), 2, "one create, one patch");
}

#[tokio::test(start_paused = true)]
async fn a_namespace_that_leaves_the_opt_in_drops_its_series() {
    let router = Router::default();
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    let ca = start(router, &["shop"]);
    ca.router.wait_for("the Event", is_event).await;
    assert!(ca.metric_lines().contains(&SHOP_COUNTS[0].to_owned()));

    // A scan of the new set lists `billing`: by then the set has been applied.
    ca.opted_in
        .send_replace(BTreeSet::from(["billing".to_owned()]));
    ca.lists_seen("/api/v1/namespaces/billing/pods", 1).await;
    let lines = ca.metric_lines();
    assert!(!lines.iter().any(|l| l.contains("shop")), "{lines:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_list_keeps_the_last_counts_and_is_counted() {
    let router = Router::default();
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.script(
        Method::GET,
        PODS,
        false,
        Reply::Json(
            StatusCode::FORBIDDEN,
            fixture("pod-list-forbidden-403.json"),
        ),
    );
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    let ca = start(router, &["shop"]);
    ca.scans(PODS, 3).await;
    let lines = ca.metric_lines();
    for line in SHOP_COUNTS {
        assert!(lines.contains(&line.to_owned()), "{line} in {lines:#?}");
    }
    assert!(
        lines.contains(&"palisade_ca_unmeshed_scan_errors_total{step=\"list_pods\"} 1".to_owned()),
        "{lines:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_event_is_tried_again_at_the_next_scan() {
    let router = Router::default();
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.list(PODS, fixture("pod-list-uninjected.json"));
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Json(StatusCode::FORBIDDEN, fixture("event-forbidden-403.json")),
    );
    router.script(
        Method::POST,
        EVENTS,
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    let ca = start(router, &["shop"]);
    ca.scans(PODS, 3).await;
    assert_eq!(ca.events().len(), 2);
    assert!(
        ca.metric_lines().contains(
            &"palisade_ca_unmeshed_scan_errors_total{step=\"create_event\"} 1".to_owned()
        )
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_scan_waiting_on_the_api_server() {
    // Nothing scripted: the list is held open, as by an API server that does not answer.
    let ca = start(Router::default(), &["shop"]);
    ca.lists_seen(PODS, 1).await;
    ca.shutdown.send_replace(true);
    tokio::time::timeout(kube_support::GUARD, ca.task)
        .await
        .expect("the scan stops at shutdown")
        .unwrap();
}
