//! What the model tests share: manifests written to a directory and read
//! into the mesh model as the control plane does.
#![allow(dead_code)] // each test file uses a part of it

use std::path::Path;

use weft_api::v1 as pb;
use weft_control_plane::manifests::ManifestDir;
use weft_control_plane::mesh::Mesh;

pub fn trust() -> pb::TrustBundle {
    pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: "roots".into(),
    }
}

pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

pub fn mesh_of(dir: &Path) -> (Mesh, ManifestDir) {
    let mut source = ManifestDir::new(dir);
    source.reload().unwrap();
    (
        Mesh::derive(&source.state(), trust(), "weft-system"),
        source,
    )
}
