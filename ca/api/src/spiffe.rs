//! SPIFFE identities of mesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a string is not a Palisade SPIFFE ID or one of its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error(
        "{0:?} is not a SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error(
        "trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_' (at most 255 characters), e.g. cluster.local"
    )]
    TrustDomain(String),
    #[error(
        "namespace {0:?} is invalid: a Kubernetes namespace is a DNS label (lowercase letters, digits and '-', starting and ending alphanumeric, at most 63 characters)"
    )]
    Namespace(String),
    #[error(
        "service account {0:?} is invalid: a Kubernetes service account name is a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    ServiceAccount(String),
}

/// A workload identity in the mesh.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an ID from its parts, validating each as Kubernetes and SPIFFE define them.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// `namespace/service-account`, the form policies and logs use.
    pub fn workload_name(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || SpiffeError::Shape(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(shape)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(shape());
        };
        SpiffeId::new(td, ns, sa)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    ok.then_some(())
        .ok_or_else(|| SpiffeError::TrustDomain(td.to_owned()))
}

/// A DNS label as Kubernetes defines it (RFC 1123): namespaces.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A DNS subdomain as Kubernetes defines it (RFC 1123): service accounts, pods.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub fn validate_namespace(ns: &str) -> Result<(), SpiffeError> {
    is_dns_label(ns)
        .then_some(())
        .ok_or_else(|| SpiffeError::Namespace(ns.to_owned()))
}

pub fn validate_service_account(sa: &str) -> Result<(), SpiffeError> {
    is_dns_subdomain(sa)
        .then_some(())
        .ok_or_else(|| SpiffeError::ServiceAccount(sa.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_valid_id() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.workload_name(), "shop/web");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "spiffe://cluster.local",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/UPPER/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
            "spiffe://cluster.local/ns/a.b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b..c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn service_accounts_may_be_dotted_namespaces_may_not() {
        assert!(SpiffeId::new("td", "ns", "a.b-c").is_ok());
        assert!(matches!(
            SpiffeId::new("td", "a.b", "sa"),
            Err(SpiffeError::Namespace(_))
        ));
        assert!(matches!(
            SpiffeId::new("td", &"n".repeat(64), "sa"),
            Err(SpiffeError::Namespace(_))
        ));
    }

    #[test]
    fn errors_say_what_is_expected() {
        let msg = "nope".parse::<SpiffeId>().unwrap_err().to_string();
        assert!(msg.contains("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"));
    }
}
