//! The CA's generated root and intermediate kept in Secret `palisade-ca-keys` in the CA's own
//! namespace, so every replica and every restart signs under the same root.
//!
//! Read at start; created when absent with a plain create, so that of two replicas starting at
//! once one wins and the other gets 409 Conflict and re-reads the winner's Secret. An existing
//! Secret is never replaced, except to renew its intermediate (logged, and only with its
//! resourceVersion). The certificates are checked by the very code that checks a state
//! directory ([`load_or_create_generated`]), over an in-memory store: in Kubernetes mode no key
//! is ever written to the filesystem, and `--state-dir` need not be writable.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use time::OffsetDateTime;

use crate::keys::{
    INTERMEDIATE_CERT_FILE, INTERMEDIATE_KEY_FILE, KeyError, KeyMaterial, Lifetimes, MemoryStore,
    ROOT_CERT_FILE, ROOT_KEY_FILE, load_or_create_generated,
};

pub const SECRET_NAME: &str = "palisade-ca-keys";
/// The Secret's keys: the same names as the files of a state directory.
pub const SECRET_KEYS: [&str; 4] = [
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    INTERMEDIATE_CERT_FILE,
    INTERMEDIATE_KEY_FILE,
];

#[derive(Debug, thiserror::Error)]
pub enum SecretKeyError {
    #[error(
        "cannot {verb} Secret {namespace}/{SECRET_NAME}: {source} (the CA's Role must allow secrets get/create/update in its namespace)"
    )]
    Api {
        verb: &'static str,
        namespace: String,
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{SECRET_NAME} is malformed: key {key}: {problem}. Restore the Secret from a backup; deleting it makes a new root that no running proxy trusts"
    )]
    Malformed {
        namespace: String,
        key: String,
        problem: String,
    },
    #[error("Secret {namespace}/{SECRET_NAME}: {message}")]
    Keys { namespace: String, message: String },
    #[error(
        "Secret {namespace}/{SECRET_NAME} changed under us {attempts} times in a row; is another CA rewriting it?"
    )]
    Contended { namespace: String, attempts: u32 },
}

impl SecretKeyError {
    fn keys(namespace: &str, error: KeyError) -> Self {
        SecretKeyError::Keys {
            namespace: namespace.into(),
            message: error.to_string(),
        }
    }
}

/// Loads the key material from the Secret, creating the Secret when it does not exist.
pub async fn load_or_create_in_secret(
    client: &kube::Client,
    namespace: &str,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<KeyMaterial, SecretKeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_err = |verb, source| SecretKeyError::Api {
        verb,
        namespace: namespace.into(),
        source,
    };
    const ATTEMPTS: u32 = 3;
    for _ in 0..ATTEMPTS {
        let existing = api
            .get_opt(SECRET_NAME)
            .await
            .map_err(|e| api_err("get", e))?;
        let Some(secret) = existing else {
            let (material, files) = load_files(namespace, Files::new(), trust_domain, now)?;
            match api
                .create(&PostParams::default(), &new_secret(namespace, files))
                .await
            {
                Ok(_) => {
                    tracing::info!(%namespace, secret = SECRET_NAME, "created a new root CA and stored it in the Secret");
                    return Ok(material);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(%namespace, secret = SECRET_NAME, "another replica created the Secret first; using its root");
                    continue;
                }
                Err(e) => return Err(api_err("create", e)),
            }
        };
        let stored = stored_files(namespace, &secret)?;
        let (material, files) = load_files(namespace, stored.clone(), trust_domain, now)?;
        if files == stored {
            return Ok(material);
        }
        // load_or_create issued a new intermediate (the stored one is near expiry): keep it,
        // but only on top of the version we read.
        let mut renewed = secret;
        renewed.data = Some(to_data(files));
        match api
            .replace(SECRET_NAME, &PostParams::default(), &renewed)
            .await
        {
            Ok(_) => {
                tracing::warn!(%namespace, secret = SECRET_NAME, "renewed the intermediate in the Secret (same root)");
                return Ok(material);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(api_err("update", e)),
        }
    }
    Err(SecretKeyError::Contended {
        namespace: namespace.into(),
        attempts: ATTEMPTS,
    })
}

type Files = MemoryStore;

pub(super) fn stored_files(namespace: &str, secret: &Secret) -> Result<Files, SecretKeyError> {
    let data = secret.data.clone().unwrap_or_default();
    let malformed = |key: &str, problem: &str| SecretKeyError::Malformed {
        namespace: namespace.into(),
        key: key.into(),
        problem: problem.into(),
    };
    let mut files = Files::new();
    // An operator's root kept offline: no root key, and the note that says so instead.
    let offline = crate::rotation::keyset::CURRENT.root_key_offline;
    if let Some(note) = data.get(offline) {
        let text =
            String::from_utf8(note.0.clone()).map_err(|_| malformed(offline, "not UTF-8 text"))?;
        files.insert(offline.to_owned(), text);
    }
    for key in SECRET_KEYS {
        if key == ROOT_KEY_FILE && !data.contains_key(key) && files.contains_key(offline) {
            continue;
        }
        let value = data.get(key).ok_or_else(|| {
            malformed(
                key,
                &format!("missing (the Secret must hold {})", SECRET_KEYS.join(", ")),
            )
        })?;
        let text = String::from_utf8(value.0.clone())
            .map_err(|_| malformed(key, "not UTF-8 text (PEM expected)"))?;
        if !text.contains("-----BEGIN ") {
            return Err(malformed(key, "not PEM"));
        }
        files.insert(key.to_owned(), text);
    }
    Ok(files)
}

/// Checks (or, from an empty map, makes) the root and intermediate, in memory.
fn load_files(
    namespace: &str,
    mut files: Files,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<(KeyMaterial, Files), SecretKeyError> {
    let material = load_or_create_generated(&mut files, trust_domain, &Lifetimes::default(), now)
        .map_err(|e| SecretKeyError::keys(namespace, e))?;
    Ok((material, files))
}

pub(super) fn to_data(files: Files) -> BTreeMap<String, ByteString> {
    files
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

pub(super) fn new_secret(namespace: &str, files: Files) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                super::anchors::MANAGED_BY_LABEL.into(),
                super::anchors::MANAGED_BY.into(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(to_data(files)),
        ..Default::default()
    }
}
