//! RFC 6902 JSON patch operations and RFC 6901 pointer escaping: the vocabulary that the patch
//! builder and the probe rewriter both write in.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp<'a> {
    Add { path: String, value: PatchValue<'a> },
    Replace { path: String, value: PatchValue<'a> },
    Remove { path: String },
}

/// A value in the patch: built for this pod, or rendered once ahead of time (borrowed from the
/// settings, or owned when the pod's overrides needed a rendering of its own).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PatchValue<'a> {
    Json(Value),
    Raw(Box<RawValue>),
    Shared(&'a RawValue),
    List(Vec<PatchValue<'a>>),
}

impl From<Value> for PatchValue<'_> {
    fn from(value: Value) -> Self {
        Self::Json(value)
    }
}

/// Escapes one reference token of a JSON pointer (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn pointer_token(key: &str) -> Cow<'_, str> {
    if key.contains(['~', '/']) {
        Cow::Owned(key.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(key)
    }
}
