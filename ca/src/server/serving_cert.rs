//! The CA's own serving certificate: a leaf for `spiffe://<td>/ns/<ns>/sa/palisade-ca` with the
//! Service's DNS names, signed by its own intermediate, renewed at half-life and swapped into the
//! resolver that the TLS configuration was built with once.

use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::tls::crypto_provider;
use palisade_plumbing::credentials::{ReloadingResolver, certified_key};
use rcgen::KeyPair;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::StartError;
use crate::authority::Authority;
use crate::config::ServeConfig;
use crate::state::Ca;
use crate::tls_server::OptionalClientAuth;

/// The CA's own serving certificate lives this long and is renewed at half-life.
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Who the CA is to its callers: its SPIFFE ID and DNS names.
pub(super) struct ServingIdentity {
    pub id: SpiffeId,
    pub dns_names: Vec<String>,
}

impl ServingIdentity {
    pub fn of(config: &ServeConfig) -> Result<Self, StartError> {
        let id = SpiffeId::new(
            &config.trust_domain,
            &config.namespace,
            palisade_ca_api::contract::CA_SERVICE_ACCOUNT,
        )
        .map_err(|e| StartError::ServerCert(e.to_string()))?;
        let service = palisade_ca_api::contract::ca_dns_name(&config.namespace);
        let dns_names = vec![
            service.clone(),
            format!("{service}.{}", config.trust_domain),
        ];
        Ok(ServingIdentity { id, dns_names })
    }
}

/// The TLS 1.3 acceptor of the API: client certificates optional at the TLS level (the watch
/// handler verifies them, so a bad one gets a JSON 401), the serving certificate from `resolver`.
pub(super) fn acceptor(
    roots: &RootCertStore,
    resolver: Arc<ReloadingResolver>,
) -> Result<TlsAcceptor, StartError> {
    let mut server_config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::ServerCert(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientAuth::new(roots)))
        .with_cert_resolver(resolver);
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: a resumed session would carry the client certificate of the session it
    // resumes, and the watch must see the leaf a proxy holds now (renewals, rotations).
    server_config.send_tls13_tickets = 0;
    server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(TlsAcceptor::from(Arc::new(server_config)))
}

/// A fresh key and a leaf for `serving`, with the intermediates behind it.
pub(super) fn server_cert(
    authority: &Authority,
    serving: &ServingIdentity,
) -> Result<CertifiedKey, StartError> {
    let err = |e: String| StartError::ServerCert(e);
    let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let ttl = time::Duration::try_from(SERVER_CERT_TTL).expect("fits");
    let issued = authority
        .issue_server(
            &serving.id,
            &serving.dns_names,
            &key,
            ttl,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| err(e.to_string()))?;
    let mut chain = vec![issued.der];
    chain.extend(authority.chain_tail_der().iter().cloned());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    certified_key(chain, key).map_err(|e| err(e.to_string()))
}

/// Renews the serving certificate at half-life, and at once when a rotation changes the
/// intermediate that signs, until shutdown; a failure keeps the current one and is retried at
/// the next half-life.
pub(super) async fn renew_server_cert(
    ca: Arc<Ca>,
    resolver: Arc<ReloadingResolver>,
    serving: ServingIdentity,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut trust = ca.rotation.subscribe();
    let mut signer = trust.borrow_and_update().issuing_intermediate.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SERVER_CERT_TTL / 2) => {}
            changed = trust.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = trust.borrow_and_update().issuing_intermediate.clone();
                if now == signer {
                    continue;
                }
                signer = now;
            }
            _ = shutdown.changed() => return,
        }
        match server_cert(&ca.rotation.authority(), &serving) {
            Ok(ck) => resolver.swap(ck),
            Err(error) => {
                tracing::error!(%error, "could not renew the CA's serving certificate; will retry")
            }
        }
    }
}
