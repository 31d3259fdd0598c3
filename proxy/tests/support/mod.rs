//! Test helpers: an in-process CA whose answers a test can script, certificate minting, and
//! an in-process mesh control plane.
#![allow(dead_code)]

pub mod fake_ca;
pub mod fake_mesh;
pub mod identity_rig;
pub mod rig;
