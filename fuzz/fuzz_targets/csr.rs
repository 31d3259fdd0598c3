//! The CA's CSR checks: DER (and PEM) from an authenticated but untrusted caller. An accepted
//! CSR always carries a public key that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_ca::csr::{check_csr, csr_der_from_pem};
use palisade_ca_api::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let identity: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let der = match std::str::from_utf8(data) {
        Ok(text) if text.starts_with("-----BEGIN") => match csr_der_from_pem(text) {
            Ok(der) => der,
            Err(_) => return,
        },
        _ => data.to_vec(),
    };
    if let Ok(accepted) = check_csr(&der, &identity) {
        assert!(!accepted.spki_der.is_empty());
        assert!(!accepted.key_type.is_empty());
    }
});
