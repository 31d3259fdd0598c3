//! Which CA replica drives the rotation: the holder of Lease `palisade-ca-rotation` in the CA's
//! namespace. kube 5 has no leader-election helper, so this is the plain protocol: read the
//! Lease, decide ([`decide`], pure), and create or replace it with the resourceVersion read, so
//! that of two replicas acting on the same version one gets 409 and stays a follower.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

pub const LEASE_NAME: &str = "palisade-ca-rotation";
/// How long a holder that stops renewing keeps the lease.
pub const LEASE_SECONDS: i32 = 15;
/// How often the holder renews (and a follower looks again).
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What to do with the Lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseMove {
    /// There is none: create it, holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Its holder let it expire (or it has none): take it over.
    TakeOver,
    /// Another replica holds it and renews it.
    Wait { holder: String },
}

/// Decides from the Lease read at `now`. A Lease without a renew time counts from its acquire
/// time; one with neither has expired.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> LeaseMove {
    let Some(lease) = lease else {
        return LeaseMove::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == me {
        return LeaseMove::Renew;
    }
    if holder.is_empty() {
        return LeaseMove::TakeOver;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS).max(1));
    let last = spec
        .renew_time
        .or(spec.acquire_time)
        .map(|t| t.0.as_second());
    match last {
        Some(at) if now.as_second() < at.saturating_add(duration) => LeaseMove::Wait { holder },
        _ => LeaseMove::TakeOver,
    }
}

/// Who drives, as this replica last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    Leader,
    /// The holder's name, when known.
    Follower(Option<String>),
}

/// Takes and keeps the Lease for `identity` (the pod's name).
pub struct LeaseKeeper {
    api: Api<Lease>,
    identity: String,
}

impl LeaseKeeper {
    pub fn new(client: kube::Client, namespace: &str, identity: String) -> Self {
        LeaseKeeper {
            api: Api::namespaced(client, namespace),
            identity,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One look at the Lease and, when it is ours to hold, one write. Any failure (the API
    /// server unreachable, a 409 because another replica wrote first) leaves this replica a
    /// follower until the next look: a driver that cannot renew stops driving at once, well
    /// before its Lease expires for the others.
    pub async fn tick(&self, now: Timestamp) -> Leadership {
        match self.try_tick(now).await {
            Ok(leadership) => leadership,
            Err(error) => {
                tracing::warn!(%error, lease = LEASE_NAME,
                    "cannot read or write the rotation Lease; this replica does not drive the rotation until it can (the CA's Role must allow leases get/create/update)");
                Leadership::Follower(None)
            }
        }
    }

    async fn try_tick(&self, now: Timestamp) -> Result<Leadership, kube::Error> {
        let lease = self.api.get_opt(LEASE_NAME).await?;
        let held = |spec: &mut LeaseSpec, transition: bool| {
            spec.holder_identity = Some(self.identity.clone());
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            spec.renew_time = Some(MicroTime(now));
            if transition {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        };
        let decision = decide(lease.as_ref(), &self.identity, now);
        let written = match (decision, lease) {
            (LeaseMove::Wait { holder }, _) => return Ok(Leadership::Follower(Some(holder))),
            (LeaseMove::Create, _) | (_, None) => {
                let mut spec = LeaseSpec::default();
                held(&mut spec, true);
                spec.lease_transitions = Some(0);
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                held(spec, decision == LeaseMove::TakeOver);
                if decision == LeaseMove::TakeOver {
                    tracing::info!(identity = %self.identity, lease = LEASE_NAME, "took over the rotation Lease");
                }
                // The resourceVersion read stays in the metadata: a concurrent write wins, we lose.
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(Leadership::Leader),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Leadership::Follower(None)),
            Err(e) => Err(e),
        }
    }
}

/// This pod's name: `PALISADE_POD_NAME` (the chart sets it from the downward API), else the hostname,
/// which is the pod's name in a pod.
pub fn pod_identity(pod_name: Option<String>) -> String {
    pod_name
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("palisade-ca-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: Option<i64>) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(15),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).unwrap())),
                ..Default::default()
            }),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "ca-a", at(1000)), LeaseMove::Create);
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_expired() {
        let l = lease(Some("ca-a"), Some(900));
        assert_eq!(decide(Some(&l), "ca-a", at(1000)), LeaseMove::Renew);
    }

    #[test]
    fn another_holders_live_lease_is_waited_for() {
        let l = lease(Some("ca-b"), Some(990));
        assert_eq!(
            decide(Some(&l), "ca-a", at(1000)),
            LeaseMove::Wait {
                holder: "ca-b".into()
            }
        );
        // One second before it runs out, still theirs.
        assert_eq!(
            decide(Some(&l), "ca-a", at(1004)),
            LeaseMove::Wait {
                holder: "ca-b".into()
            }
        );
    }

    #[test]
    fn an_expired_or_empty_lease_is_taken_over() {
        let l = lease(Some("ca-b"), Some(985));
        assert_eq!(decide(Some(&l), "ca-a", at(1000)), LeaseMove::TakeOver);
        let never_renewed = lease(Some("ca-b"), None);
        assert_eq!(
            decide(Some(&never_renewed), "ca-a", at(1000)),
            LeaseMove::TakeOver
        );
        let released = lease(None, Some(999));
        assert_eq!(
            decide(Some(&released), "ca-a", at(1000)),
            LeaseMove::TakeOver
        );
    }
}
