//! palisade-ca
