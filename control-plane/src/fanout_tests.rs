#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeMap;

use prost::Message as _;
use weft_api::parts::Assembler;
use weft_api::v1 as pb;

use super::*;
use crate::cluster::ClusterState;
use crate::test_clusters::{Dice, NODES, random_cluster};
use crate::view::NodeView;

fn mesh_of(cluster: &ClusterState, roots: usize) -> Mesh {
    let trust = pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: format!("roots {roots}"),
    };
    Mesh::derive(cluster, trust, "weft-system")
}

/// What a proxy holds, as it applies the updates it receives.
#[derive(Debug, Default, PartialEq)]
struct Applied {
    local: BTreeMap<String, pb::Workload>,
    remote: BTreeMap<String, pb::Workload>,
    services: BTreeMap<String, pb::Service>,
    policies: BTreeMap<String, pb::AuthorizationPolicy>,
    trust: Option<pb::TrustBundle>,
    uninstalling: bool,
    meshed: Vec<String>,
}

impl Applied {
    fn apply(&mut self, update: &pb::ConfigUpdate) {
        if update.full_state {
            *self = Applied::default();
        }
        for w in &update.local_workloads {
            self.local.insert(w.uid.clone(), w.clone());
        }
        for uid in &update.removed_local_workloads {
            assert!(self.local.remove(uid).is_some(), "removed unknown {uid}");
        }
        for w in &update.remote_workloads {
            self.remote.insert(w.uid.clone(), w.clone());
        }
        for uid in &update.removed_remote_workloads {
            assert!(self.remote.remove(uid).is_some(), "removed unknown {uid}");
        }
        for s in &update.services {
            self.services
                .insert(format!("{}/{}", s.namespace, s.name), s.clone());
        }
        for key in &update.removed_services {
            assert!(self.services.remove(key).is_some(), "removed unknown {key}");
        }
        for p in &update.authorization_policies {
            self.policies
                .insert(format!("{}/{}", p.namespace, p.name), p.clone());
        }
        for key in &update.removed_authorization_policies {
            assert!(self.policies.remove(key).is_some(), "removed unknown {key}");
        }
        if let Some(trust) = &update.trust {
            self.trust = Some(trust.clone());
        }
        if let Some(uninstalling) = update.uninstalling {
            self.uninstalling = uninstalling;
        }
        if let Some(meshed) = &update.meshed_namespaces {
            self.meshed = meshed.names.clone();
        }
    }

    fn of(view: &Result<NodeView, weft_api::Error>) -> Applied {
        let view = view.as_ref().unwrap();
        let mut applied = Applied::default();
        applied.apply(&view.full_update(1));
        applied
    }
}

/// What a stream sends, as the proxy reads it: a full state in small parts,
/// put back together.
fn whole(outgoing: Outgoing) -> pb::ConfigUpdate {
    let parts: Vec<_> = match outgoing {
        Outgoing::Delta(delta) => delta.parts(300),
        Outgoing::Full(full) => full.parts(300).collect(),
    };
    let mut assembler = Assembler::default();
    let mut assembled = None;
    for part in &parts {
        let decoded = pb::ConfigUpdate::decode(part.bytes().clone()).unwrap();
        assembled = assembler.push(decoded, 0, usize::MAX).unwrap();
    }
    assembled.unwrap()
}

/// Follows `steps` random meshes on every node, each stream reading only
/// every `stride`-th version (the others coalesce), with `keep` changes
/// kept; after each read, what the proxy holds is the node's view.
fn follow(seed: u64, steps: usize, stride: usize, keep: usize) -> usize {
    let mut dice = Dice(seed);
    let mut published = Arc::new(Published::first(mesh_of(&random_cluster(&mut dice), 0)));
    let mut feeds = Vec::new();
    for node in NODES {
        let (feed, full) = NodeFeed::start(node, &published, 1);
        let mut applied = Applied::default();
        applied.apply(&whole(Outgoing::Full(full)));
        assert_eq!(applied, Applied::of(&NodeView::of(&published.mesh, node)));
        feeds.push((node, feed, applied, 1));
    }
    let mut fulls = 0;
    for step in 0..steps {
        let previous = published.mesh.clone();
        let mesh = mesh_of(&random_cluster(&mut dice), dice.roll(8) / 7);
        if let Some(next) = published.next(mesh, keep) {
            published = Arc::new(next);
        }
        // The shared entries, brought along change by change, are those of
        // the mesh.
        assert_eq!(*published.shared, SharedEntries::of(&published.mesh));
        if step % stride != 0 {
            continue;
        }
        for (node, feed, applied, version) in &mut feeds {
            let view = NodeView::of(&published.mesh, node);
            let update = feed.update(&published, *version + 1);
            if stride == 1 {
                // One step at a time: a message exactly when the node's view changed.
                let reference = NodeView::of(&previous, node)
                    .unwrap()
                    .delta_to(view.as_ref().unwrap(), 0);
                assert_eq!(
                    update.is_some(),
                    reference.is_some(),
                    "seed {seed} step {step} {node}"
                );
            }
            if let Some(update) = update.map(whole) {
                *version += 1;
                fulls += usize::from(update.full_state);
                applied.apply(&update);
            }
            assert_eq!(
                *applied,
                Applied::of(&view),
                "seed {seed} step {step} {node}"
            );
        }
    }
    fulls
}

#[test]
fn every_delta_brings_the_proxy_to_its_nodes_view() {
    for seed in 1..=10 {
        assert_eq!(follow(seed * 7919, 60, 1, 1000), 0, "no full state needed");
    }
}

#[test]
fn a_stream_that_slept_through_versions_catches_up_by_keys() {
    for seed in 1..=10 {
        assert_eq!(follow(seed * 104_729, 60, 4, 1000), 0);
    }
}

#[test]
fn a_stream_behind_the_kept_changes_gets_a_full_state() {
    let fulls: usize = (1..=5).map(|seed| follow(seed * 31, 40, 3, 2)).sum();
    assert!(fulls > 0, "a stream three versions behind with two kept");
}

#[test]
fn a_change_only_one_node_sees_leaves_the_other_streams_silent() {
    let pods = |tier: &str| {
        ClusterState::from_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{weft.dev/mesh: enabled}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, namespace: shop, labels: {{tier: {tier}}}}}\nspec: {{nodeName: node-1, serviceAccountName: web, containers: []}}\nstatus: {{phase: Running, podIP: 10.244.1.2}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: db-1, namespace: shop}}\nspec: {{nodeName: node-2, serviceAccountName: db, containers: []}}\nstatus: {{phase: Running, podIP: 10.244.2.2}}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: front, namespace: shop}}\nspec: {{selector: {{matchLabels: {{tier: front}}}}, action: ALLOW, rules: [{{}}]}}\n"
        ))
    };
    let first = Arc::new(Published::first(mesh_of(&pods("back"), 0)));
    let (mut node1, _) = NodeFeed::start("node-1", &first, 1);
    let (mut node2, _) = NodeFeed::start("node-2", &first, 1);

    // web-1's label now selects it for a policy: node-1 hears of both, node-2 of nothing.
    let second = Arc::new(first.next(mesh_of(&pods("front"), 0), 10).unwrap());
    let delta = whole(node1.update(&second, 2).unwrap());
    assert!(!delta.full_state);
    assert_eq!(delta.local_workloads.len(), 1);
    assert_eq!(delta.authorization_policies.len(), 1);
    assert!(delta.remote_workloads.is_empty());
    assert!(node2.update(&second, 2).is_none());

    // Nothing changed at all: no new version.
    assert!(second.next(mesh_of(&pods("front"), 0), 10).is_none());
}
