//! The inbound classifier that tells a mesh ClientHello from a plaintext caller, fed whatever a
//! hostile pod sends first. Deciding on a prefix never contradicts deciding on more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_proxy::detect::{Sniff, classify};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for end in 0..data.len() {
        match classify(&data[..end]) {
            Sniff::NeedMore => {}
            early => assert_eq!(early, whole, "decided on {end} bytes, then changed its mind"),
        }
    }
});
