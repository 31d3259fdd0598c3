//! The injector's serving certificate, issued by the CA: a leaf for the webhook's Service
//! (`palisade-injector.<ns>.svc` and its shorter and longer forms) signed by the intermediate
//! that issues now, kept in Secret `palisade-injector-tls` (which the injector mounts and
//! reloads), renewed at half-life and at once when the issuing intermediate changes; and the
//! `caBundle` of the MutatingWebhookConfiguration `palisade-injector` kept equal to the mesh's
//! trust bundle, plus every root retired in the last [`RETIRED_ROOT_GRACE`] — the kubelet takes
//! a while to bring a renewed Secret into the injector's pod, and until it has, the injector
//! still serves the certificate of the retired root.
//!
//! Every write is made on top of the version read (`resourceVersion`), so two CA replicas never
//! undo each other: the loser of a race reads the winner's certificate at its next pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::sha256_fingerprint;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::authority::Authority;
use crate::metrics::Metrics;
use crate::rotation::Rotation;

pub const SECRET_NAME: &str = "palisade-injector-tls";
pub const WEBHOOK_NAME: &str = "palisade-injector";
pub const SERVICE_NAME: &str = "palisade-injector";
/// The injector's service account: the SPIFFE ID its certificate also carries.
pub const SERVICE_ACCOUNT: &str = "palisade-injector";
/// The certificate lives a day and is renewed at half-life.
pub const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the Secret and the webhook are checked when nothing has changed.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How long a root that left the trust bundle stays in the webhook's `caBundle`.
pub const RETIRED_ROOT_GRACE: Duration = Duration::from_secs(15 * 60);

/// The DNS names the API server may call the webhook by; it checks the `.svc` one.
pub fn dns_names(namespace: &str) -> Vec<String> {
    vec![
        SERVICE_NAME.to_owned(),
        format!("{SERVICE_NAME}.{namespace}"),
        format!("{SERVICE_NAME}.{namespace}.svc"),
        format!("{SERVICE_NAME}.{namespace}.svc.cluster.local"),
    ]
}

/// Why the stored certificate must be replaced, or `None` when it may stay. Pure.
pub fn renewal_reason(
    stored_chain_pem: Option<&str>,
    issuing_intermediate: &str,
    namespace: &str,
    now: OffsetDateTime,
) -> Option<String> {
    let Some(pem) = stored_chain_pem else {
        return Some("no certificate yet".into());
    };
    let ders: Vec<Vec<u8>> = match rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>(
    ) {
        Ok(certs) if certs.len() >= 2 => certs.into_iter().map(|c| c.to_vec()).collect(),
        Ok(_) => return Some("the stored chain lacks its intermediate".into()),
        Err(e) => return Some(format!("the stored certificate is not PEM ({e})")),
    };
    if sha256_fingerprint(&ders[1]) != issuing_intermediate {
        return Some("signed by an intermediate that no longer issues".into());
    }
    let Ok((_, leaf)) = X509Certificate::from_der(&ders[0]) else {
        return Some("the stored certificate does not parse".into());
    };
    let wanted = format!("{SERVICE_NAME}.{namespace}.svc");
    let named = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(d) if *d == wanted))
        });
    if !named {
        return Some(format!("it does not name {wanted}"));
    }
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    if now.unix_timestamp() >= not_before + (not_after - not_before) / 2 {
        return Some("past half of its life".into());
    }
    None
}

/// The webhook's `caBundle`: the trust bundle, then the roots retired within the grace, each
/// once. Pure.
pub fn ca_bundle(bundle_pem: &[String], retired: &[String]) -> String {
    let mut out: Vec<&str> = bundle_pem.iter().map(String::as_str).collect();
    for pem in retired {
        if !out.contains(&pem.as_str()) {
            out.push(pem);
        }
    }
    out.concat()
}

/// A fresh key and a certificate for the injector: `(tls.crt with its chain, tls.key)`.
pub fn issue(
    authority: &Authority,
    trust_domain: &str,
    namespace: &str,
    now: OffsetDateTime,
) -> Result<(String, String, OffsetDateTime), String> {
    let id = SpiffeId::new(trust_domain, namespace, SERVICE_ACCOUNT).map_err(|e| e.to_string())?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let ttl = time::Duration::try_from(CERT_TTL).expect("fits");
    let issued = authority
        .issue_server(&id, &dns_names(namespace), &key, ttl, now)
        .map_err(|e| e.to_string())?;
    let chain = std::iter::once(issued.pem)
        .chain(authority.chain_tail().iter().cloned())
        .collect::<String>();
    Ok((chain, key.serialize_pem(), issued.not_after))
}

/// What the task needs to know.
pub struct InjectorTls {
    pub client: kube::Client,
    pub namespace: String,
    pub trust_domain: String,
    pub rotation: Arc<Rotation>,
    pub metrics: Arc<Metrics>,
    /// [`CHECK_EVERY`] and [`RETIRED_ROOT_GRACE`], shorter in tests.
    pub check_every: Duration,
    pub retired_root_grace: Duration,
}

/// Keeps the Secret and the webhook's `caBundle` current until shutdown.
pub async fn maintain(tls: InjectorTls, mut shutdown: watch::Receiver<bool>) {
    let mut trust = tls.rotation.subscribe();
    let mut bundle: Vec<String> = tls.rotation.authority().trust_bundle_pem().to_vec();
    // Roots that left the bundle, and when (tokio's clock: tests pause it).
    let mut retired: Vec<(String, tokio::time::Instant)> = Vec::new();
    loop {
        let now = OffsetDateTime::now_utc();
        let authority = tls.rotation.authority();
        let current = authority.trust_bundle_pem().to_vec();
        let at = tokio::time::Instant::now();
        for old in bundle.iter().filter(|r| !current.contains(r)) {
            retired.push((old.clone(), at));
        }
        bundle = current;
        let grace = tls.retired_root_grace;
        retired.retain(|(_, since)| at.duration_since(*since) < grace);
        let issuing = trust.borrow_and_update().issuing_intermediate.clone();
        if let Err(error) = ensure_secret(&tls, &authority, &issuing, now).await {
            tracing::warn!(%error, secret = SECRET_NAME, "cannot keep the injector's serving certificate current; retrying");
        }
        let kept: Vec<String> = retired.iter().map(|(pem, _)| pem.clone()).collect();
        let ca_bundle = ca_bundle(&bundle, &kept);
        if let Err(error) = ensure_ca_bundle(&tls.client, &tls.namespace, &ca_bundle).await {
            tracing::warn!(%error, webhook = WEBHOOK_NAME, "cannot keep the webhook's caBundle current; retrying");
        }
        // Sooner when a retired root is due to leave the caBundle.
        let next = retired
            .iter()
            .map(|(_, since)| (*since + grace).saturating_duration_since(at))
            .fold(tls.check_every, Duration::min);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            changed = trust.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Issues a certificate into the Secret when the stored one must go.
async fn ensure_secret(
    tls: &InjectorTls,
    authority: &Authority,
    issuing: &str,
    now: OffsetDateTime,
) -> Result<(), String> {
    let api: Api<Secret> = Api::namespaced(tls.client.clone(), &tls.namespace);
    let existing = api.get_opt(SECRET_NAME).await.map_err(|e| {
        format!(
            "cannot read Secret {}/{SECRET_NAME}: {e} (the CA's Role must allow get on it)",
            tls.namespace
        )
    })?;
    let stored = existing
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get("tls.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let Some(reason) = renewal_reason(stored.as_deref(), issuing, &tls.namespace, now) else {
        if let Some(not_after) = stored.as_deref().and_then(leaf_not_after) {
            tls.metrics.set_injector_cert_expiry(not_after);
        }
        return Ok(());
    };
    let (chain, key, not_after) = issue(authority, &tls.trust_domain, &tls.namespace, now)?;
    let data = BTreeMap::from([
        ("tls.crt".to_owned(), ByteString(chain.into_bytes())),
        ("tls.key".to_owned(), ByteString(key.into_bytes())),
        (
            "ca.crt".to_owned(),
            ByteString(authority.trust_bundle_pem().concat().into_bytes()),
        ),
    ]);
    let written = match existing {
        Some(mut secret) => {
            secret.data = Some(data);
            secret.string_data = None;
            api.replace(SECRET_NAME, &PostParams::default(), &secret)
                .await
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(SECRET_NAME.into()),
                    namespace: Some(tls.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        super::anchors::MANAGED_BY_LABEL.into(),
                        super::anchors::MANAGED_BY.into(),
                    )])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(_) => {
            tls.metrics
                .set_injector_cert_expiry(not_after.unix_timestamp());
            tracing::info!(secret = SECRET_NAME, %reason, not_after = %not_after, "issued the injector's serving certificate");
            Ok(())
        }
        // Another replica wrote first: its certificate is read at the next pass.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "cannot write Secret {}/{SECRET_NAME}: {e} (the CA's Role must allow create and update on it)",
            tls.namespace
        )),
    }
}

/// Whether two PEM bundles hold the same certificates, in any order. Pure.
pub fn same_certificates(a: &[u8], b: &[u8]) -> bool {
    let blocks = |pem: &[u8]| {
        let mut v: Vec<Vec<u8>> = rustls_pki_types::pem::PemObject::pem_slice_iter(pem)
            .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| {
                c.map(|c| c.to_vec()).unwrap_or_default()
            })
            .collect();
        v.sort();
        v
    };
    let (a, b) = (blocks(a), blocks(b));
    !a.is_empty() && a == b
}

fn leaf_not_after(chain_pem: &str) -> Option<i64> {
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(chain_pem.as_bytes()).ok()?;
    let (_, leaf) = X509Certificate::from_der(&der).ok()?;
    Some(leaf.validity().not_after.timestamp())
}

/// Sets `caBundle` on every webhook of the configuration that calls our injector Service.
async fn ensure_ca_bundle(
    client: &kube::Client,
    namespace: &str,
    bundle_pem: &str,
) -> Result<(), String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(WEBHOOK_NAME).await.map_err(|e| {
        format!("cannot read MutatingWebhookConfiguration {WEBHOOK_NAME}: {e} (the CA's ClusterRole must allow get and update on it)")
    })?
    else {
        return Err(format!(
            "MutatingWebhookConfiguration {WEBHOOK_NAME} does not exist: install the chart's webhook, or run without --manage-injector-tls"
        ));
    };
    let wanted = ByteString(bundle_pem.as_bytes().to_vec());
    let mut changed = false;
    for hook in config.webhooks.iter_mut().flatten() {
        let ours = hook
            .client_config
            .service
            .as_ref()
            .is_some_and(|s| s.name == SERVICE_NAME && s.namespace == namespace);
        let current = hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice());
        if ours && !same_certificates(current.unwrap_or_default(), &wanted.0) {
            hook.client_config.ca_bundle = Some(wanted.clone());
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    match api
        .replace(WEBHOOK_NAME, &PostParams::default(), &config)
        .await
    {
        Ok(_) => {
            tracing::info!(
                webhook = WEBHOOK_NAME,
                roots = bundle_pem.matches("-----BEGIN CERTIFICATE-----").count(),
                bundle_sha256 = %&sha256_fingerprint(bundle_pem.as_bytes())[..16],
                "set the webhook's caBundle"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "cannot update MutatingWebhookConfiguration {WEBHOOK_NAME}: {e}"
        )),
    }
}

#[cfg(test)]
#[path = "injector_tls_tests.rs"]
mod tests;
