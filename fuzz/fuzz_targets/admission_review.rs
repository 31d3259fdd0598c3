//! The injector's AdmissionReview handling: any body the API server (or anything that reaches
//! the webhook port) sends. An answer is always a JSON AdmissionReview.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade_injector::review::review;
use palisade_injector::settings::{InjectorSettings, RawSettings};

static SETTINGS: LazyLock<InjectorSettings> =
    LazyLock::new(|| RawSettings::default().validate().unwrap());

fuzz_target!(|data: &[u8]| {
    if let Ok(outcome) = review(data, &SETTINGS) {
        let answer: serde_json::Value =
            serde_json::from_slice(&outcome.body).expect("the answer is JSON");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert!(answer["response"]["uid"].is_string());
    }
});
