//! The CA's side of the storm: a process of its own (the benchmark binary run again with
//! [`CHILD_FLAG`]), so that its CPU time is read whole from `/proc/<pid>/stat` and its file
//! descriptors do not count against the load client's. It starts the CA as the binary would
//! (defaults of `ServeConfig`, a tokio runtime with as many workers as cores, audit lines to a
//! file), times the crypto one certificate costs it on one core, says so on stdout, and serves
//! until its stdin closes.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::authority::Authority;
use palisade_ca::config::ServeConfig;
use palisade_ca::csr::{check_csr, csr_der_from_pem};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::wire::TOKEN_AUDIENCE;

pub const CHILD_FLAG: &str = "--storm-ca";

/// What the CA process reports once it serves.
pub struct Ready {
    pub api_addr: String,
    pub admin_addr: String,
    pub ceiling: Ceiling,
}

/// One-core cost, in µs, of the crypto the CA cannot avoid per certificate: the three checks of
/// a request, and the server's half of a full TLS 1.3 handshake on the connection it came on
/// (an X25519 key exchange: one key generation and one agreement; one ECDSA P-256 signature,
/// the CertificateVerify).
pub struct Ceiling {
    pub token_us: f64,
    pub csr_us: f64,
    pub sign_us: f64,
    pub ecdhe_us: f64,
    pub handshake_sign_us: f64,
}

impl Ceiling {
    pub fn total_us(&self) -> f64 {
        self.token_us + self.csr_us + self.sign_us + self.ecdhe_us + self.handshake_sign_us
    }

    fn to_line(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.token_us, self.csr_us, self.sign_us, self.ecdhe_us, self.handshake_sign_us
        )
    }
}

impl Ready {
    /// `ready <api> <admin> <five figures>`.
    pub fn parse(line: &str) -> Option<Ready> {
        let mut f = line.split_whitespace();
        (f.next()? == "ready").then_some(())?;
        let (api_addr, admin_addr) = (f.next()?.to_owned(), f.next()?.to_owned());
        let mut n = || f.next().and_then(|v| v.parse::<f64>().ok());
        Some(Ready {
            api_addr,
            admin_addr,
            ceiling: Ceiling {
                token_us: n()?,
                csr_us: n()?,
                sign_us: n()?,
                ecdhe_us: n()?,
                handshake_sign_us: n()?,
            },
        })
    }
}

/// The child's whole life.
pub fn run(dir: &Path) {
    palisade_ca_api::tls::install_default_provider();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("palisade-ca")
        .enable_all()
        .build()
        .unwrap();
    // Every limit at its default, as the binary starts: caps, timeouts, rate limits.
    let mut config = ServeConfig::embedded(dir.join("state"), dir.join("mesh.yaml"));
    config.audit_file = Some(dir.join("audit.jsonl"));
    let running = rt.block_on(palisade_ca::server::start(config)).unwrap();
    let issuer = LocalIssuer::load_or_create(&dir.join("state")).unwrap();
    let ceiling = measure(&issuer, &running.ca.rotation.authority());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ready {} {} {}",
        running.api_addr,
        running.admin_addr,
        ceiling.to_line()
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    rt.block_on(running.shutdown());
}

fn measure(issuer: &LocalIssuer, authority: &Authority) -> Ceiling {
    use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey as PeerKey, X25519};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    const N: usize = 64;
    let samples: Vec<(String, Vec<u8>, SpiffeId)> = (0..N)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let csr = palisade_testkit::pki::csr_pem(&key, vec![]);
            let token = issuer
                .mint(
                    "ceiling",
                    &format!("sa-{i}"),
                    Some(&format!("pod-{i}")),
                    TOKEN_AUDIENCE,
                    Duration::from_secs(3600),
                )
                .unwrap();
            let id = SpiffeId::new("cluster.local", "ceiling", &format!("sa-{i}")).unwrap();
            (token, csr_der_from_pem(&csr).unwrap(), id)
        })
        .collect();
    let spkis: Vec<Vec<u8>> = samples
        .iter()
        .map(|(_, der, id)| check_csr(der, id).unwrap().spki_der)
        .collect();
    let rng = SystemRandom::new();
    let peer = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
    let peer_public = peer.compute_public_key().unwrap();
    // The CA's serving key is an rcgen default: ECDSA P-256, as here.
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // TLS 1.3's CertificateVerify input: 64 spaces, a context string, a zero, a hash.
    let transcript = [0x20u8; 130];
    let ttl = time::Duration::hours(1);
    let now = time::OffsetDateTime::now_utc();
    Ceiling {
        token_us: per_call_us(|i| {
            issuer.verify(&samples[i % N].0, TOKEN_AUDIENCE).unwrap();
        }),
        csr_us: per_call_us(|i| {
            check_csr(&samples[i % N].1, &samples[i % N].2).unwrap();
        }),
        sign_us: per_call_us(|i| {
            authority
                .issue_leaf(&spkis[i % N], &samples[i % N].2, ttl, now)
                .unwrap();
        }),
        ecdhe_us: per_call_us(|_| {
            let own = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
            own.compute_public_key().unwrap();
            ring::agreement::agree_ephemeral(
                own,
                &PeerKey::new(&X25519, peer_public.as_ref()),
                |secret| secret[0],
            )
            .unwrap();
        }),
        handshake_sign_us: per_call_us(|_| {
            key.sign(&rng, &transcript).unwrap();
        }),
    }
}

/// The least disturbed of a few timed batches, in µs per call, after a warm-up.
fn per_call_us(mut f: impl FnMut(usize)) -> f64 {
    const BATCH: usize = 200;
    (0..BATCH).for_each(&mut f);
    (0..5)
        .map(|b| {
            let t = Instant::now();
            (b * BATCH..(b + 1) * BATCH).for_each(&mut f);
            t.elapsed().as_secs_f64() * 1e6 / BATCH as f64
        })
        .fold(f64::INFINITY, f64::min)
}
