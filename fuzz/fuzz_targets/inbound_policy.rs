//! Policy evaluation over any inbound policy a proxy could be sent and any caller: a decision,
//! never a panic; audit policies never change it; a caller of another trust domain is never
//! let in by a rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::{Caller, InboundPolicy, PolicyMode, Reason, evaluate_inbound};

fuzz_target!(|data: &[u8]| {
    // [port: 2 bytes][caller length: 1 byte][caller][policy JSON]
    if data.len() < 3 {
        return;
    }
    let port = u16::from_be_bytes([data[0], data[1]]);
    let n = usize::from(data[2]).min(data.len() - 3);
    let (caller, policy) = data[3..].split_at(n);
    let Ok(policy) = serde_json::from_slice::<InboundPolicy>(policy) else {
        return;
    };
    let id = std::str::from_utf8(caller)
        .ok()
        .and_then(|s| s.parse::<SpiffeId>().ok());
    let caller = match &id {
        Some(id) => Caller::Authenticated(id),
        None => Caller::Unauthenticated,
    };
    let decision = evaluate_inbound(&policy, port, caller);

    if let Some(id) = &id
        && id.trust_domain() != policy.trust_domain
    {
        assert_ne!(decision.reason, Reason::RuleMatched, "a foreign caller matched a rule");
    }

    let mut enforced_only = policy.clone();
    enforced_only.policies.retain(|p| p.mode == PolicyMode::Enforce);
    let without_audit = evaluate_inbound(&enforced_only, port, caller);
    assert_eq!(decision.allowed, without_audit.allowed, "audit changed the outcome");
});
