//! `GET /rotation`: where a rotation stands and who it waits for. `palisade-ca rotate status`
//! reads the same type.

use serde::{Deserialize, Serialize};

/// The answer of `GET /rotation`. Times are RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatus {
    pub phase: String,
    /// `root` or `intermediate` while a rotation runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// SHA-256 of every root in the bundle.
    pub trusted_roots: Vec<String>,
    /// SHA-256 of the root behind the issuing intermediate.
    pub issuing_root: String,
    pub issuing_intermediate: String,
    pub proxies: ProxyCounts,
    /// Proxies whose current leaf the issuing intermediate did not sign.
    pub leaves_on_previous_root: usize,
    pub started_at: Option<String>,
    /// `trusting`: when lagging proxies are reported; `issuing`: when it ends at the latest.
    pub deadline: Option<String>,
    pub root_expires_at: String,
    pub intermediate_expires_at: String,
    /// When the first proxy's certificate runs out if the CA stays down from now.
    pub mesh_expires_at: Option<String>,
    /// Whether this CA can rotate (not with an operator's CA or in Kubernetes mode yet).
    pub rotatable: bool,
    /// Whether the CA holds the key of the issuing root, and so can make intermediates under
    /// it itself: false for an operator's root kept offline (and for a CA that cannot rotate).
    #[serde(default = "held")]
    pub root_key_held: bool,
    pub automatic: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounts {
    /// Proxies holding a current certificate, as their watches report.
    pub total: usize,
    /// Of those, the ones that trust every root of the bundle.
    pub confirmed: usize,
    pub lagging: Vec<LaggingProxy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaggingProxy {
    pub pod: Option<String>,
    pub spiffe_id: String,
}

/// What a CA from before `root_key_held` answered with: every key it rotated was its own.
fn held() -> bool {
    true
}
