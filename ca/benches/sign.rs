//! The sign path for one CSR on one thread: CSR checks plus signing, no network.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_ca::authority::Authority;
use palisade_ca::csr::check_csr;
use palisade_ca::keys::{KeySource, load_or_create};
use palisade_ca_api::SpiffeId;

fn sign_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let material = load_or_create(dir.path(), &KeySource::Generated, "cluster.local", now).unwrap();
    let authority = Authority::new(material, Vec::new()).unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let ttl = time::Duration::hours(1);
    c.bench_function("csr_check_and_sign_p256", |b| {
        b.iter(|| {
            let accepted = check_csr(&csr, &id).unwrap();
            authority
                .issue_leaf(&accepted.spki_der, &id, ttl, now)
                .unwrap()
        })
    });
}

criterion_group!(benches, sign_path);
criterion_main!(benches);
