//! palisade-ca: the certificate authority and control plane of Palisade.

pub mod csr;
pub mod keys;
