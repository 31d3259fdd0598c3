//! Rotation of the root and the intermediate, as the state machine of DESIGN.md: `idle` →
//! `trusting` (the bundle holds the old and the new root; every proxy confirms it) → `issuing`
//! (the new intermediate signs; proxies renew early) → `retiring` (the old root leaves the
//! bundle, its keys are destroyed) → `idle`. An intermediate rotation skips `trusting`.
//!
//! The state lives with the keys ([`keyset`]): the next root and intermediate as `next-*`
//! entries beside the current ones, and the phase in `rotation.json`, written last, so that a CA
//! restarted in any phase resumes it. Proxies report what they hold on their mesh watches
//! ([`registry`]); [`driver`] moves the phases.

pub mod cli;
mod driver;
pub mod keyset;
mod registry;
mod status;
mod task;

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::keys::Lifetimes;

pub use driver::shared::SharedStore;
pub use driver::{Rotation, RotationError, Transition, TrustView};
pub use registry::{ProxyRegistry, WatchReport};
pub use status::{LaggingProxy, ProxyCounts, RotationStatus};
pub use task::run;

/// The phases; their names are the contract (`GET /rotation`, metrics, audit lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Trusting,
    Issuing,
    Retiring,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Idle,
        Phase::Trusting,
        Phase::Issuing,
        Phase::Retiring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Trusting => "trusting",
            Phase::Issuing => "issuing",
            Phase::Retiring => "retiring",
        }
    }
}

/// What is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Root,
    Intermediate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Root => "root",
            Kind::Intermediate => "intermediate",
        }
    }
}

/// Who started a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Manual,
    Automatic,
}

/// What `rotation.json` holds while a rotation runs (absent when idle). Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub kind: Kind,
    pub phase: Phase,
    pub trigger: Trigger,
    pub started_at: i64,
    pub phase_started_at: i64,
}

/// How rotations are started and paced.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Start rotations on schedule: the intermediate at half its life, the root at
    /// `root_rotate_at_percent` of its life.
    pub automatic: bool,
    pub root_rotate_at_percent: u8,
    pub lifetimes: Lifetimes,
    /// How long `trusting` waits for every proxy before it reports who lags (it keeps waiting).
    pub trust_deadline: Duration,
    /// Proxies told to renew early spread their requests over this window.
    pub renew_window: Duration,
    /// The longest leaf the CA issues: `issuing` ends at the latest this long (plus the
    /// back-dating) after it began, when no leaf of the previous intermediate can be valid.
    pub max_leaf_lifetime: Duration,
    /// A phase waits at least this long after it began before it moves on.
    pub settle: Duration,
    /// Nothing moves until the CA has been up this long, so that proxies reconnecting after a
    /// restart (their watch backoff is at most 10 s) are heard before anything is decided.
    pub reconnect_grace: Duration,
    /// The CA's own DNS name, which its serving certificate under a new root must carry in a
    /// way proxies accept (an operator's root may constrain names).
    pub serving_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            automatic: true,
            root_rotate_at_percent: 80,
            lifetimes: Lifetimes::default(),
            trust_deadline: Duration::hours(1),
            renew_window: Duration::minutes(5),
            max_leaf_lifetime: Duration::hours(24),
            settle: Duration::seconds(10),
            reconnect_grace: Duration::seconds(30),
            serving_name: palisade_ca_api::contract::ca_dns_name(
                palisade_ca_api::contract::DEFAULT_CA_NAMESPACE,
            ),
        }
    }
}
