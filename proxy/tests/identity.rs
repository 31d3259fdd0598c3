//! Identity and rotation: fresh keys, token read afresh, answers verified before the swap,
//! renewal at half-life with jitter, backoff, and an expired certificate never presented.

mod support;

use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::SpiffeId;
use palisade_proxy::identity::{IdentityError, run_rotation};
use palisade_testkit::pki::Authority;
use rustls::client::ResolvesClientCert;
use support::fake_ca::{Answer, unreachable};
use support::identity_rig::{ME, rig};
use tokio::sync::watch;

fn csr_public_key(csr: &str) -> Vec<u8> {
    use rcgen::PublicKeyData;
    rcgen::CertificateSigningRequestParams::from_pem(csr)
        .unwrap()
        .public_key
        .der_bytes()
        .to_vec()
}

#[tokio::test(start_paused = true)]
async fn store_starts_empty_and_fills_with_a_verified_certificate() {
    let r = rig();
    let store = &r.identity.store;
    assert!(store.valid().is_none());
    assert!(!ResolvesClientCert::has_certs(store.as_ref()));
    let installed = r.identity.renew_once().await.unwrap();
    assert_eq!(installed.spiffe_id, ME.parse::<SpiffeId>().unwrap());
    assert!(store.valid().is_some());
    assert!(ResolvesClientCert::has_certs(store.as_ref()));
    assert_eq!(r.ca.seen.lock().unwrap()[0].token, "token-1");
    assert!(r.identity.metrics.render().contains(&format!(
        "palisade_certificate_not_after_seconds {}",
        installed.not_after
    )));
}

#[tokio::test(start_paused = true)]
async fn every_request_has_a_fresh_key_and_reads_the_token_again() {
    let r = rig();
    r.identity.renew_once().await.unwrap();
    std::fs::write(&r.token, "token-2").unwrap();
    r.identity.renew_once().await.unwrap();
    let seen = r.ca.seen.lock().unwrap().clone();
    assert_eq!(seen[0].token, "token-1");
    assert_eq!(seen[1].token, "token-2");
    assert_ne!(csr_public_key(&seen[0].csr), csr_public_key(&seen[1].csr));
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&seen[0].csr).unwrap();
    assert_eq!(csr.params.subject_alt_names.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn missing_or_empty_token_file_is_an_error_naming_it() {
    let r = rig();
    std::fs::remove_file(&r.token).unwrap();
    let err = r.identity.renew_once().await.unwrap_err();
    assert!(matches!(err, IdentityError::TokenFile { .. }), "{err}");
    assert!(err.to_string().contains("token"), "{err}");
    std::fs::write(&r.token, "  \n").unwrap();
    assert!(matches!(
        r.identity.renew_once().await.unwrap_err(),
        IdentityError::EmptyToken(_)
    ));
    assert_eq!(r.ca.requests(), 0);
    assert!(r.identity.store.valid().is_none());
}

#[tokio::test(start_paused = true)]
async fn an_answer_for_another_identity_is_refused_and_not_installed() {
    let r = rig();
    r.identity.renew_once().await.unwrap();
    let before = r.identity.store.current().unwrap().serial.clone();
    let ca = r.ca.clone();
    let clock = r.identity.clock.clone();
    r.ca.script([Answer::Custom(Box::new(move |csr| {
        ca.response_for(ca.authority.sign_csr(
            csr,
            clock.now(),
            Duration::from_secs(3600),
            Some("spiffe://cluster.local/ns/shop/sa/admin"),
        ))
    }))]);
    let err = r.identity.renew_once().await.unwrap_err();
    assert!(matches!(err, IdentityError::WrongIdentity { .. }), "{err}");
    assert_eq!(r.identity.store.current().unwrap().serial, before);
}

#[tokio::test(start_paused = true)]
async fn a_certificate_signed_for_another_key_is_refused() {
    let r = rig();
    let ca = r.ca.clone();
    r.ca.script([Answer::Custom(Box::new(move |_csr| {
        let leaf = ca.authority.leaf(ME);
        ca.response_for(palisade_ca_api::cert::cert_to_pem(&leaf.chain[0]))
    }))]);
    let err = r.identity.renew_once().await.unwrap_err();
    assert!(err.to_string().contains("not for the key"), "{err}");
    assert!(r.identity.store.current().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_chain_from_an_unrelated_root_is_refused_even_with_its_bundle() {
    let r = rig();
    let other = Arc::new(Authority::new("evil"));
    let clock = r.identity.clock.clone();
    r.ca.script([Answer::Custom(Box::new(move |csr| {
        palisade_ca_api::wire::CertificateResponse {
            spiffe_id: ME.into(),
            certificate_chain: vec![
                other.sign_csr(csr, clock.now(), Duration::from_secs(3600), None),
                other.intermediate.pem(),
            ],
            trust_bundle: vec![other.root_pem()],
            expires_at: String::new(),
        }
    }))]);
    let err = r.identity.renew_once().await.unwrap_err();
    assert!(matches!(err, IdentityError::BadAnswer(_)), "{err}");
    assert!(r.identity.store.current().is_none());
    assert_eq!(r.identity.bundle.ders().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_bundle_that_keeps_a_current_root_is_adopted() {
    let r = rig();
    let new_root = Authority::new("next");
    r.ca.extra_roots.lock().unwrap().push(new_root.root_pem());
    r.identity.renew_once().await.unwrap();
    let ders = r.identity.bundle.ders();
    assert_eq!(ders.len(), 2);
    assert!(ders.contains(&new_root.root_der()));
}

#[tokio::test(start_paused = true)]
async fn renews_between_40_and_60_percent_of_lifetime() {
    let r = rig();
    r.ca.set_default(Answer::Issue(Duration::from_secs(1000)));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_rotation(r.identity.clone(), stopped));
    // The certificate is valid from now-60s to now+1000s; its usable life starts when it
    // arrives (now), so renewal comes between 400 and 600 s from now.
    tokio::time::sleep(Duration::from_secs(395)).await;
    assert_eq!(r.ca.requests(), 1);
    tokio::time::sleep(Duration::from_secs(210)).await;
    assert_eq!(r.ca.requests(), 2);
    assert_eq!(r.identity.metrics.rotations(), (2, 0));
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_the_proxy_waits_for_the_ca() {
    let r = rig();
    r.ca.script([
        Answer::Fail(unreachable()),
        Answer::Fail(unreachable()),
        Answer::Fail(unreachable()),
        Answer::Fail(unreachable()),
    ]);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_rotation(r.identity.clone(), stopped));
    // Four refusals wait at least 0.5 + 1 + 2 + 4 s (equal jitter: each wait is in the upper
    // half of its doubling step).
    tokio::time::sleep(Duration::from_millis(7_400)).await;
    // A control plane down at start-up: no certificate, so not ready.
    assert!(r.identity.store.valid().is_none());
    // ... and at most 1 + 2 + 4 + 8 s.
    tokio::time::sleep(Duration::from_millis(8_000)).await;
    let seen = r.ca.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (gap, step) in gaps.iter().zip([1u64, 2, 4, 8]) {
        let step = Duration::from_secs(step);
        assert!(
            *gap >= step / 2 && *gap <= step,
            "a wait outside the upper half of its step: {gaps:?}"
        );
    }
    assert!(r.identity.store.valid().is_some());
    assert_eq!(r.identity.metrics.rotations(), (1, 4));
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_current_certificate_serves_until_expiry_and_is_never_presented_after() {
    let r = rig();
    r.ca.script([Answer::Issue(Duration::from_secs(600))]);
    r.ca.set_default(Answer::Fail(unreachable()));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_rotation(r.identity.clone(), stopped));
    // A control plane that goes down later: the certificate keeps serving ...
    tokio::time::sleep(Duration::from_secs(500)).await;
    assert!(r.ca.requests() > 1);
    assert!(r.identity.store.valid().is_some());
    assert!(ResolvesClientCert::has_certs(r.identity.store.as_ref()));
    // ... until it expires; then it is never handed to a handshake.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(r.identity.store.current().is_some());
    assert!(r.identity.store.valid().is_none());
    assert!(!ResolvesClientCert::has_certs(r.identity.store.as_ref()));
    assert!(ResolvesClientCert::resolve(r.identity.store.as_ref(), &[], &[]).is_none());
    stop.send(true).unwrap();
    task.await.unwrap();
}
