//! palisade-proxy (see docs/DESIGN.md).
