//! The mesh file (workloads, Services, policies) as an operator might write it, wrong in every
//! way: an error or a state, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use palisade_ca::mesh::file::parse_mesh_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse_mesh_file(Path::new("mesh.yaml"), text, "cluster.local") {
        assert!(e.to_string().contains("mesh.yaml"), "the error names the file");
    }
});
