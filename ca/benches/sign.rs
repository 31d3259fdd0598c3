//! The CPU work of one issuance on one thread, no network: the token check, the CSR checks, the
//! signing, and the bare P-256 operations under them (two verifications and one signature per
//! certificate, which no optimisation of the CA can remove).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::authority::Authority;
use palisade_ca::csr::check_csr;
use palisade_ca::keys::{KeySource, load_or_create};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::wire::TOKEN_AUDIENCE;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

fn sign_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let material = load_or_create(dir.path(), &KeySource::Generated, "cluster.local", now).unwrap();
    let authority = Authority::new(material, Vec::new()).unwrap();
    let issuer = LocalIssuer::load_or_create(dir.path()).unwrap();
    let token = issuer
        .mint(
            "shop",
            "web",
            Some("web-1"),
            TOKEN_AUDIENCE,
            Duration::from_secs(600),
        )
        .unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let spki = check_csr(&csr, &id).unwrap().spki_der;
    let ttl = time::Duration::hours(1);
    c.bench_function("csr_check_and_sign_p256", |b| {
        b.iter(|| {
            let accepted = check_csr(&csr, &id).unwrap();
            authority
                .issue_leaf(&accepted.spki_der, &id, ttl, now)
                .unwrap()
        })
    });
    c.bench_function("token_check_es256", |b| {
        b.iter(|| issuer.verify(&token, TOKEN_AUDIENCE).unwrap())
    });
    c.bench_function("csr_check_p256", |b| {
        b.iter(|| check_csr(&csr, &id).unwrap())
    });
    c.bench_function("leaf_sign_p256", |b| {
        b.iter(|| authority.issue_leaf(&spki, &id, ttl, now).unwrap())
    });

    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let message = [7u8; 300];
    let signature = key.sign(&rng, &message).unwrap();
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    c.bench_function("ring_p256_verify", |b| {
        b.iter(|| public.verify(&message, signature.as_ref()).unwrap())
    });
    c.bench_function("ring_p256_sign", |b| {
        b.iter(|| key.sign(&rng, &message).unwrap())
    });
}

criterion_group!(benches, sign_path);
criterion_main!(benches);
