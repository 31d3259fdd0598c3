//! The library side of the `palisade` CLI: what tests drive without a process. Only `check`
//! lives here, since its tests hand it a Kubernetes client of their own.

pub mod check;
