//! What the test suites of the workspace share, one module per concern, so that a certificate
//! profile, the mesh file's shape or the way a namespace is torn down lives once.
//!
//! Dev-only: no crate depends on it outside `[dev-dependencies]`.

pub mod capture;
pub mod mesh_file;
pub mod netns;
pub mod pki;
pub mod process;
