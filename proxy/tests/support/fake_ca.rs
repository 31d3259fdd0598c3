//! A scriptable in-process CA signing with a test [`Authority`] (root and intermediate).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_ca_api::wire::{CertificateRequest, CertificateResponse};
use palisade_proxy::clock::Clock;
use palisade_proxy::source::{BoxFuture, CertificateSource, SourceError};
use palisade_testkit::pki::Authority;

/// What the fake CA does with the next request.
pub enum Answer {
    /// Sign the CSR with this lifetime.
    Issue(Duration),
    /// Fail with this error.
    Fail(SourceError),
    /// Answer anything the test builds from the CSR.
    Custom(Box<dyn Fn(&str) -> CertificateResponse + Send + Sync>),
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub token: String,
    pub csr: String,
    pub at: tokio::time::Instant,
}

pub struct FakeCa {
    pub authority: Authority,
    pub clock: Clock,
    script: Mutex<VecDeque<Answer>>,
    /// What to do when the script is exhausted.
    pub default: Mutex<Answer>,
    pub seen: Mutex<Vec<Seen>>,
    pub extra_roots: Mutex<Vec<String>>,
}

impl FakeCa {
    pub fn new(clock: Clock) -> Arc<Self> {
        Arc::new(FakeCa {
            authority: Authority::new("palisade test"),
            clock,
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Answer::Issue(Duration::from_secs(3600))),
            seen: Mutex::new(Vec::new()),
            extra_roots: Mutex::new(Vec::new()),
        })
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    pub fn set_default(&self, answer: Answer) {
        *self.default.lock().unwrap() = answer;
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn response_for(&self, leaf_pem: String) -> CertificateResponse {
        let mut bundle = vec![self.authority.root_pem()];
        bundle.extend(self.extra_roots.lock().unwrap().iter().cloned());
        CertificateResponse {
            spiffe_id: String::new(),
            certificate_chain: vec![leaf_pem, self.authority.intermediate.pem()],
            trust_bundle: bundle,
            expires_at: String::new(),
        }
    }

    fn answer(&self, csr: &str, answer: &Answer) -> Result<CertificateResponse, SourceError> {
        match answer {
            Answer::Issue(ttl) => {
                Ok(self.response_for(self.authority.sign_csr(csr, self.clock.now(), *ttl, None)))
            }
            Answer::Fail(e) => Err(e.clone()),
            Answer::Custom(f) => Ok(f(csr)),
        }
    }
}

pub fn unreachable() -> SourceError {
    SourceError::Transport("connection refused".into())
}

impl CertificateSource for FakeCa {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(Seen {
                token: token.to_owned(),
                csr: req.csr.clone(),
                at: tokio::time::Instant::now(),
            });
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(a) => self.answer(&req.csr, &a),
                None => self.answer(&req.csr, &self.default.lock().unwrap()),
            }
        })
    }
}
