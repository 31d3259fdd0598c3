use super::*;
use crate::auth::jwt::{KubernetesClaims, ObjectRef, ServiceAccountClaims};
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};
use x509_parser::prelude::FromDer;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const AUD: &str = "palisade-ca";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: serde_json::Value,
}

fn es256(kid: &str) -> Signer {
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw();
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
    }
}

fn rs256(kid: &str) -> Signer {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    let spki = run(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = info.parsed().unwrap() else {
        panic!("not RSA")
    };
    let trim = |b: &[u8]| {
        b.iter()
            .skip_while(|x| **x == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    Signer {
        kid: kid.into(),
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
        jwk: serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent))}),
    }
}

fn claims(iss: &str, aud: &str, exp: u64, nbf: Option<u64>) -> ServiceAccountClaims {
    ServiceAccountClaims {
        iss: iss.into(),
        sub: "system:serviceaccount:shop:web".into(),
        aud: vec![aud.into()],
        exp,
        nbf,
        iat: Some(now()),
        kubernetes: KubernetesClaims {
            namespace: "shop".into(),
            serviceaccount: ObjectRef {
                name: "web".into(),
                uid: "u-1".into(),
            },
            pod: Some(ObjectRef {
                name: "web-7d4".into(),
                uid: "p-1".into(),
            }),
        },
    }
}

fn sign(s: &Signer, c: &ServiceAccountClaims) -> String {
    let mut h = Header::new(s.alg);
    h.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&h, c, &s.key).unwrap()
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()})
        .to_string()
}

async fn authenticator(doc: &str) -> (Arc<JwksAuthenticator>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, doc).unwrap();
    let a = JwksAuthenticator::new(ISS.into(), AUD.into(), JwksSource::File(path))
        .await
        .unwrap();
    (a, dir)
}

#[tokio::test]
async fn accepts_rs256_and_es256_service_account_tokens() {
    let (ec, rsa) = (es256("ec-1"), rs256("rsa-1"));
    let (auth, _dir) = authenticator(&jwks(&[&ec, &rsa])).await;
    for s in [&ec, &rsa] {
        let id = auth
            .authenticate(&sign(s, &claims(ISS, AUD, now() + 600, Some(now()))))
            .await
            .unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(id.pod_name.as_deref(), Some("web-7d4"));
        assert_eq!(id.pod_uid.as_deref(), Some("p-1"));
    }
}

#[tokio::test]
async fn refuses_bad_tokens_with_the_right_error() {
    let ec = es256("ec-1");
    let stranger = es256("ec-1"); // same kid, another key
    let (auth, _dir) = authenticator(&jwks(&[&ec])).await;
    let ok = |c| sign(&ec, &c);
    type Check = fn(&AuthError) -> bool;
    let cases: Vec<(String, Check)> = vec![
        (String::new(), |e| *e == AuthError::Missing),
        (
            "garbage".into(),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("not a JWT")),
        ),
        (ok(claims(ISS, AUD, now() - 3600, None)), |e| {
            *e == AuthError::Expired
        }),
        (
            ok(claims(ISS, "kubernetes", now() + 600, None)),
            |e| matches!(e, AuthError::WrongAudience(a) if a.contains("kubernetes")),
        ),
        (
            ok(claims("https://other-issuer", AUD, now() + 600, None)),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("other-issuer")),
        ),
        (
            ok(claims(ISS, AUD, now() + 7200, Some(now() + 3600))),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("nbf")),
        ),
        (
            sign(&stranger, &claims(ISS, AUD, now() + 600, None)),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("signature")),
        ),
        (
            sign(&es256("ec-2"), &claims(ISS, AUD, now() + 600, None)),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("unknown key")),
        ),
        (
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims(ISS, AUD, now() + 600, None),
                &EncodingKey::from_secret(b"s"),
            )
            .unwrap(),
            |e| matches!(e, AuthError::Invalid(m) if m.contains("HS256")),
        ),
    ];
    for (token, check) in cases {
        let err = auth.authenticate(&token).await.unwrap_err();
        assert!(check(&err), "{token:.40}: {err:?}");
    }
    let mut forged = claims(ISS, AUD, now() + 600, None);
    forged.sub = "system:serviceaccount:kube-system:admin".into();
    let err = auth.authenticate(&ok(forged)).await.unwrap_err();
    assert!(
        matches!(err, AuthError::Invalid(ref m) if m.contains("subject")),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unknown_key_is_fetched_before_the_token_is_answered() {
    let (old, new) = (es256("old"), es256("new"));
    let (auth, dir) = authenticator(&jwks(&[&old])).await;
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&old, &new])).unwrap();
    let token = sign(&new, &claims(ISS, AUD, now() + 600, None));
    // The issuer rotated: the first token signed by its new key waits for the fetch and passes.
    let id = auth.authenticate(&token).await.unwrap();
    assert_eq!(id.service_account, "web");
}

#[tokio::test]
async fn forced_refreshes_are_spaced_out() {
    let (old, new, newer) = (es256("old"), es256("new"), es256("newer"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&old])).unwrap();
    let auth = JwksAuthenticator::with_forced_refresh_interval(
        ISS.into(),
        AUD.into(),
        JwksSource::File(path.clone()),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    std::fs::write(&path, jwks(&[&old, &new])).unwrap();
    assert!(
        auth.authenticate(&sign(&new, &claims(ISS, AUD, now() + 600, None)))
            .await
            .is_ok()
    );
    // Within the interval no token, however unknown its key, fetches again.
    std::fs::write(&path, jwks(&[&old, &new, &newer])).unwrap();
    let err = auth
        .authenticate(&sign(&newer, &claims(ISS, AUD, now() + 600, None)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AuthError::Invalid(m) if m.contains("unknown key")),
        "{err:?}"
    );
}

#[tokio::test]
async fn loads_keys_from_a_url() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ec = es256("ec-1");
    let doc = jwks(&[&ec]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{doc}",
            doc.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
    });
    let source = JwksSource::Url {
        url: format!("http://{addr}/openid/v1/jwks"),
        ca_file: None,
    };
    let auth = JwksAuthenticator::new(ISS.into(), AUD.into(), source)
        .await
        .unwrap();
    assert!(
        auth.authenticate(&sign(&ec, &claims(ISS, AUD, now() + 600, None)))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_bad_jwks_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, "{\"keys\": []}").unwrap();
    let err = JwksAuthenticator::new(ISS.into(), AUD.into(), JwksSource::File(path))
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("keys.json") && err.contains("no RS256 or ES256"),
        "{err}"
    );
}
