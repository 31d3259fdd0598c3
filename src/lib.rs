//! The library side of the `palisade` CLI: what tests drive without a process, handing it a
//! Kubernetes client of their own: `check`, and the cluster reader of `policy explain|suggest
//! --kube`.

pub mod check;
pub mod cluster;
pub mod kube_list;
pub mod manifests;
