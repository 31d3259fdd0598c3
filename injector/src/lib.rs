//! palisade-injector (see docs/DESIGN.md).
