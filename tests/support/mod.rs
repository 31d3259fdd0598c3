//! Shared harness of the whole-system tests.
// Each test binary uses the part of the harness its scenarios need.
#![allow(dead_code)]

pub mod node;
pub mod routed;
pub mod services;
