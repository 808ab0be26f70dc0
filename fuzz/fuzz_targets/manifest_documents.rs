//! Arbitrary text as a manifest file: YAML documents into cluster objects,
//! then into the mesh model and every node's view. Nothing may panic; the
//! text cut into chunks (as the control plane re-reads a file) must parse
//! to the documents the whole gives; the
//! mesh of the first half of the objects, brought along to all of them by
//! `Mesh::next`, must be the mesh derived from all of them; and a view's
//! full state must round-trip through its own delta.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::v1 as pb;
use weft_control_plane::cluster::{ClusterObject, ClusterState};
use weft_control_plane::manifests::{chunks, parse_documents};
use weft_control_plane::mesh::Mesh;
use weft_control_plane::view::NodeView;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(documents) = parse_documents(text) else {
        return;
    };
    // A chunk may fail alone where the whole parses (the parser's limits
    // apply per chunk; the control plane then parses the file whole).
    let pieced: Option<Result<Vec<_>, _>> =
        chunks(text).map(|pieces| pieces.into_iter().map(parse_documents).collect());
    if let Some(Ok(pieced)) = pieced {
        assert_eq!(pieced.concat(), documents, "the chunks give the documents of the whole");
    }
    let half = documents.len() / 2;
    let mut cluster = ClusterState::default();
    let mut first_half = ClusterState::default();
    for (i, document) in documents.into_iter().enumerate() {
        if let Ok(object) = ClusterObject::from_value(document) {
            let _ = object.describe();
            if i == half {
                first_half = cluster.clone();
            }
            cluster.insert(object);
        }
    }
    let trust = pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: String::new(),
    };
    let mesh = Mesh::derive(&cluster, trust.clone(), "weft-system");
    let stepped = Mesh::derive(&first_half, trust.clone(), "weft-system").next(
        &first_half,
        &cluster,
        trust,
        "weft-system",
    );
    assert_eq!(stepped, mesh, "the mesh brought along is the mesh derived");
    let empty = NodeView::default();
    for workload in mesh.workloads.values() {
        let view = NodeView::of(&mesh, &workload.workload.node)
            .expect("a full state written by the control plane reads back");
        let _ = view.full_update(1);
        let _ = empty.delta_to(&view, 2);
        assert_eq!(view.delta_to(&view, 3), None, "a view differs from itself");
    }
});
