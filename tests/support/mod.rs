//! Shared harness of the whole-system tests.

pub mod node;
