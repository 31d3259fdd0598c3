//! The cheap check every bearer token passes before any TokenReview: arbitrary text, never a
//! panic, and an accepted token is at least three dot-separated parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_ca::auth::precheck::precheck;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if precheck(token, "palisade-ca", 1_700_000_000).is_ok() {
        assert_eq!(token.split('.').count(), 3, "accepted a token that is not a JWS");
    }
});
