//! What the proxies decided, as they logged it: a tracing layer that keeps the structured
//! policy events (target `palisade::policy`: denials at warn, allowed connections at debug).
//! The report is built from these, not from what the demo expected to happen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The tracing target of the proxy's policy events.
pub const POLICY_TARGET: &str = "palisade::policy";

/// Events kept at most; a demo makes a few hundred.
const MAX_EVENTS: usize = 10_000;

/// One policy decision as a proxy logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEvent {
    /// `allow`, `deny` or `audit_deny`.
    pub result: String,
    /// The caller's SPIFFE ID, or `unauthenticated`.
    pub caller: String,
    pub caller_address: String,
    /// `namespace/name` of the workload whose proxy decided.
    pub target: String,
    pub port: u16,
    pub policy: String,
    pub reason: String,
}

impl PolicyEvent {
    /// Reads an event's fields; `None` when one is missing. Pure.
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Option<PolicyEvent> {
        let get = |k: &str| fields.get(k).cloned();
        Some(PolicyEvent {
            result: get("result")?,
            caller: get("caller")?,
            caller_address: get("caller_address").unwrap_or_default(),
            target: get("target_workload")?,
            port: get("port")?.parse().ok()?,
            policy: get("policy")?,
            reason: get("reason")?,
        })
    }
}

/// The events seen so far, shared between the layer and the demo.
#[derive(Debug, Clone, Default)]
pub struct PolicyEvents(Arc<Mutex<Vec<PolicyEvent>>>);

impl PolicyEvents {
    fn events(&self) -> std::sync::MutexGuard<'_, Vec<PolicyEvent>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many have been seen: the mark to pass to [`wait_for`](Self::wait_for).
    pub fn mark(&self) -> usize {
        self.events().len()
    }

    fn push(&self, event: PolicyEvent) {
        let mut events = self.events();
        if events.len() < MAX_EVENTS {
            events.push(event);
        }
    }

    /// The first event after `mark` that `wanted` accepts, waiting at most `timeout`.
    pub async fn wait_for(
        &self,
        mark: usize,
        timeout: Duration,
        wanted: impl Fn(&PolicyEvent) -> bool,
    ) -> Option<PolicyEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.events().iter().skip(mark).find(|e| wanted(e)).cloned();
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits at most `timeout` until `count` events after `mark` are accepted by `wanted`.
    pub async fn wait_for_count(
        &self,
        mark: usize,
        timeout: Duration,
        count: usize,
        wanted: impl Fn(&PolicyEvent) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.since(mark, &wanted).len() < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The events after `mark` that `wanted` accepts.
    pub fn since(&self, mark: usize, wanted: impl Fn(&PolicyEvent) -> bool) -> Vec<PolicyEvent> {
        self.events()
            .iter()
            .skip(mark)
            .filter(|e| wanted(e))
            .cloned()
            .collect()
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for PolicyEvents {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != POLICY_TARGET {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(e) = PolicyEvent::from_fields(&fields.0) {
            self.push(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn the_layer_keeps_policy_events_with_their_fields_and_nothing_else() {
        let events = PolicyEvents::default();
        let subscriber = tracing_subscriber::registry().with(events.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "palisade::policy",
                result = "deny",
                caller = %"spiffe://cluster.local/ns/shop/sa/intruder",
                caller_address = %"127.0.0.1:40000",
                target_workload = "shop/api",
                port = 8080u16,
                policy = %"shop/api-from-web",
                reason = "no_rule_matched",
                "connection denied"
            );
            tracing::warn!(result = "deny", "another target: not a policy event");
            tracing::warn!(target: "palisade::policy", result = "deny", "fields missing: ignored");
        });
        assert_eq!(events.mark(), 1);
        let e = events.events()[0].clone();
        assert_eq!(
            e,
            PolicyEvent {
                result: "deny".into(),
                caller: "spiffe://cluster.local/ns/shop/sa/intruder".into(),
                caller_address: "127.0.0.1:40000".into(),
                target: "shop/api".into(),
                port: 8080,
                policy: "shop/api-from-web".into(),
                reason: "no_rule_matched".into(),
            }
        );
    }

    #[tokio::test]
    async fn waiting_looks_only_past_the_mark() {
        let events = PolicyEvents::default();
        let event = |result: &str| PolicyEvent {
            result: result.into(),
            caller: "unauthenticated".into(),
            caller_address: String::new(),
            target: "shop/api".into(),
            port: 1,
            policy: "p".into(),
            reason: "r".into(),
        };
        events.push(event("deny"));
        let mark = events.mark();
        let none = events
            .wait_for(mark, Duration::from_millis(50), |e| e.result == "deny")
            .await;
        assert_eq!(none, None);
        events.push(event("allow"));
        events.push(event("deny"));
        let found = events
            .wait_for(mark, Duration::from_millis(50), |e| e.result == "deny")
            .await;
        assert_eq!(found, Some(event("deny")));
    }
}
