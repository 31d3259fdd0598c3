use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::keys::{Lifetimes, MemoryStore, load_or_create_generated};

fn authority(now: OffsetDateTime) -> Authority {
    let mut store = MemoryStore::new();
    let material =
        load_or_create_generated(&mut store, "cluster.local", &Lifetimes::default(), now).unwrap();
    Authority::new(material, Vec::new()).unwrap()
}

fn fingerprint_of_intermediate(a: &Authority) -> String {
    sha256_fingerprint(&a.chain_tail_der()[0])
}

/// The API server's view: a TLS client that trusts `roots` (the caBundle) and calls the
/// webhook by its Service's `.svc` name.
async fn api_server_accepts(roots: &str, chain_pem: &str, key_pem: &str, name: &str) -> bool {
    palisade_ca_api::tls::install_default_provider();
    let provider = palisade_ca_api::tls::crypto_provider();
    let certs: Vec<CertificateDer<'static>> =
        rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key: PrivateKeyDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let mut store = rustls::RootCertStore::empty();
    for root in rustls_pki_types::pem::PemObject::pem_slice_iter(roots.as_bytes()) {
        store.add(root.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let server = tokio::spawn(async move {
        if let Ok(mut s) = acceptor.accept(b).await {
            let _ = s.write_all(b"ok").await;
            let _ = s.shutdown().await;
        }
    });
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let ok = match connector.connect(name, a).await {
        Ok(mut s) => {
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.is_ok() && buf == b"ok"
        }
        Err(_) => false,
    };
    let _ = server.await;
    ok
}

#[tokio::test]
async fn the_issued_certificate_is_one_the_api_server_accepts_for_the_service() {
    let now = OffsetDateTime::now_utc();
    let a = authority(now);
    let (chain, key, not_after) = issue(&a, "cluster.local", "palisade-system", now).unwrap();
    assert!(not_after > now + time::Duration::hours(23));
    let roots = a.trust_bundle_pem().concat();
    for name in [
        "palisade-injector.palisade-system.svc",
        "palisade-injector.palisade-system.svc.cluster.local",
    ] {
        assert!(
            api_server_accepts(&roots, &chain, &key, name).await,
            "{name}"
        );
    }
    assert!(
        !api_server_accepts(&roots, &chain, &key, "palisade-injector.other.svc").await,
        "another namespace's Service name"
    );
    let other = authority(now);
    assert!(
        !api_server_accepts(
            &other.trust_bundle_pem().concat(),
            &chain,
            &key,
            "palisade-injector.palisade-system.svc"
        )
        .await,
        "a caBundle of another root"
    );
    assert!(
        key.contains("BEGIN PRIVATE KEY"),
        "PKCS#8, as the injector reads"
    );
}

#[test]
fn a_fresh_certificate_of_the_issuing_intermediate_stays_and_anything_else_is_renewed() {
    let now = OffsetDateTime::now_utc();
    let a = authority(now);
    let issuing = fingerprint_of_intermediate(&a);
    let (chain, _, _) = issue(&a, "cluster.local", "palisade-system", now).unwrap();
    assert_eq!(
        renewal_reason(Some(&chain), &issuing, "palisade-system", now),
        None
    );
    let reason = |pem: Option<&str>, issuing: &str, ns: &str, at: OffsetDateTime| {
        renewal_reason(pem, issuing, ns, at).unwrap_or_else(|| panic!("kept at {at}"))
    };
    assert_eq!(
        reason(None, &issuing, "palisade-system", now),
        "no certificate yet"
    );
    assert!(
        reason(
            Some(&chain),
            &issuing,
            "palisade-system",
            now + time::Duration::hours(12)
        )
        .contains("half of its life")
    );
    assert_eq!(
        renewal_reason(
            Some(&chain),
            &issuing,
            "palisade-system",
            now + time::Duration::hours(11)
        ),
        None
    );
    let other = fingerprint_of_intermediate(&authority(now));
    assert!(reason(Some(&chain), &other, "palisade-system", now).contains("no longer issues"));
    assert!(reason(Some(&chain), &issuing, "mesh", now).contains("palisade-injector.mesh.svc"));
    let leaf_only = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    assert!(reason(Some(leaf_only), &issuing, "palisade-system", now).contains("intermediate"));
    assert!(!reason(Some("garbage"), &issuing, "palisade-system", now).is_empty());
}

#[test]
fn the_ca_bundle_keeps_retired_roots_once_each_after_the_trust_bundle() {
    let bundle = vec!["NEW\n".to_owned(), "OLD\n".to_owned()];
    assert_eq!(ca_bundle(&bundle, &[]), "NEW\nOLD\n");
    assert_eq!(ca_bundle(&bundle[..1], &["OLD\n".to_owned()]), "NEW\nOLD\n");
    assert_eq!(ca_bundle(&bundle, &["OLD\n".to_owned()]), "NEW\nOLD\n");
}

#[test]
fn bundles_are_compared_as_sets_of_certificates() {
    let now = OffsetDateTime::now_utc();
    let (a, b) = (authority(now), authority(now));
    let (ra, rb) = (a.trust_bundle_pem().concat(), b.trust_bundle_pem().concat());
    let ab = format!("{ra}{rb}");
    let ba = format!("{rb}{ra}");
    assert!(same_certificates(ab.as_bytes(), ba.as_bytes()));
    assert!(!same_certificates(ra.as_bytes(), ab.as_bytes()));
    assert!(
        !same_certificates(b"", b""),
        "an empty caBundle is never current"
    );
    assert!(!same_certificates(b"T1RIRVI=", ra.as_bytes()));
}
