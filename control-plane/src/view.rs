//! A node's view of the mesh, keyed: what one node proxy holds, and the
//! difference between two views. The tests' reference: the view of a mesh
//! is the full state a stream would send for it ([`crate::full_state`]),
//! and the deltas a stream sends ([`crate::fanout`]) must bring a proxy
//! from one view to the next.
//!
//! A node gets its own pods in full (labels included, for policy), the pods
//! of other nodes without labels (a source proxy needs where and who, not
//! how they are selected), every Service, the AuthorizationPolicies its own
//! pods are subject to, and the trust bundle. Because the
//! remote form leaves labels out, a label change on one node's pod reaches
//! only that node.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use weft_api::parts::Assembler;
use weft_api::v1 as pb;

use crate::fanout::{NodeFeed, Published};
use crate::forms::{changes_nothing, meshed_namespaces};
use crate::mesh::Mesh;

/// Small parts, so that the views the tests compare also check that an
/// update in many parts reads as the whole.
const TEST_PART_BYTES: usize = 512;

/// Everything one node proxy holds, keyed as on the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    /// Pods on this node.
    pub local: BTreeMap<String, pb::Workload>,
    /// Pods on other nodes, without labels.
    pub remote: BTreeMap<String, pb::Workload>,
    /// Services by `<namespace>/<name>`.
    pub services: BTreeMap<String, pb::Service>,
    /// The AuthorizationPolicies local workloads refer to.
    pub authorization_policies: BTreeMap<String, pb::AuthorizationPolicy>,
    /// Mesh roots.
    pub trust: pb::TrustBundle,
    /// Whether the mesh is being uninstalled.
    pub uninstalling: bool,
    /// The namespaces labelled meshed.
    pub meshed_namespaces: std::collections::BTreeSet<String>,
}

impl NodeView {
    /// The view of `node` in `mesh`: its full state, as a stream writes it
    /// (in small parts, put back together), keyed. An error only if those
    /// parts do not decode, which is a bug.
    pub fn of(mesh: &Mesh, node: &str) -> Result<NodeView, weft_api::Error> {
        let published = Arc::new(Published::first(mesh.clone()));
        let (_, full) = NodeFeed::start(node, &published, 1);
        let mut assembler = Assembler::default();
        for part in full.parts(TEST_PART_BYTES) {
            let bytes = part.bytes().len();
            let decoded = pb::ConfigUpdate::decode(part.bytes().clone())
                .map_err(|error| weft_api::Error::Undecodable(error.to_string()))?;
            if let Some(update) = assembler.push(decoded, bytes, usize::MAX)? {
                return Ok(NodeView::from_full_state(update));
            }
        }
        Err(weft_api::Error::Undecodable(
            "the last part is missing".into(),
        ))
    }

    /// A full state, keyed.
    pub fn from_full_state(update: pb::ConfigUpdate) -> NodeView {
        let key = |namespace: &str, name: &str| format!("{namespace}/{name}");
        NodeView {
            local: update
                .local_workloads
                .into_iter()
                .map(|w| (w.uid.clone(), w))
                .collect(),
            remote: update
                .remote_workloads
                .into_iter()
                .map(|w| (w.uid.clone(), w))
                .collect(),
            services: update
                .services
                .into_iter()
                .map(|s| (key(&s.namespace, &s.name), s))
                .collect(),
            authorization_policies: update
                .authorization_policies
                .into_iter()
                .map(|p| (key(&p.namespace, &p.name), p))
                .collect(),
            trust: update.trust.unwrap_or_default(),
            uninstalling: update.uninstalling.unwrap_or_default(),
            meshed_namespaces: update
                .meshed_namespaces
                .map(|m| m.names.into_iter().collect())
                .unwrap_or_default(),
        }
    }

    /// This view as a full state at `version`.
    pub fn full_update(&self, version: u64) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version,
            full_state: true,
            local_workloads: self.local.values().cloned().collect(),
            remote_workloads: self.remote.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            trust: Some(self.trust.clone()),
            authorization_policies: self.authorization_policies.values().cloned().collect(),
            uninstalling: Some(self.uninstalling),
            meshed_namespaces: Some(meshed_namespaces(&self.meshed_namespaces)),
            ..pb::ConfigUpdate::default()
        }
    }

    /// What turns `self` into `next`, as a delta at `version`; `None` when
    /// nothing this node sees has changed.
    pub fn delta_to(&self, next: &NodeView, version: u64) -> Option<pb::ConfigUpdate> {
        let (local_workloads, removed_local_workloads) = diff(&self.local, &next.local);
        let (remote_workloads, removed_remote_workloads) = diff(&self.remote, &next.remote);
        let (services, removed_services) = diff(&self.services, &next.services);
        let (authorization_policies, removed_authorization_policies) =
            diff(&self.authorization_policies, &next.authorization_policies);
        let trust = (self.trust != next.trust).then(|| next.trust.clone());
        let uninstalling = (self.uninstalling != next.uninstalling).then_some(next.uninstalling);
        let meshed_namespaces = (self.meshed_namespaces != next.meshed_namespaces)
            .then(|| meshed_namespaces(&next.meshed_namespaces));
        let update = pb::ConfigUpdate {
            version,
            full_state: false,
            local_workloads,
            removed_local_workloads,
            remote_workloads,
            removed_remote_workloads,
            services,
            removed_services,
            trust,
            authorization_policies,
            removed_authorization_policies,
            uninstalling,
            meshed_namespaces,
            more_follows: false,
        };
        (!changes_nothing(&update)).then_some(update)
    }
}

/// Entries of `next` that are new or differ from `old`, and keys of `old`
/// that `next` lacks.
fn diff<T: Clone + PartialEq>(
    old: &BTreeMap<String, T>,
    next: &BTreeMap<String, T>,
) -> (Vec<T>, Vec<String>) {
    let changed = next
        .iter()
        .filter(|(key, value)| old.get(*key) != Some(value))
        .map(|(_, value)| value.clone())
        .collect();
    let removed = old
        .keys()
        .filter(|key| !next.contains_key(*key))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;
    use crate::cluster::ClusterState;

    /// The mesh of a cluster holding `daemon_set` (YAML, may be empty).
    fn mesh_with(daemon_set: &str) -> (Mesh, ClusterState) {
        let cluster = ClusterState::from_yaml(daemon_set);
        (
            Mesh::derive(&cluster, pb::TrustBundle::default(), "weft-system"),
            cluster,
        )
    }

    fn daemon_set(namespace: &str, annotation: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: weft-node-proxy, namespace: {namespace}, annotations: {{weft.dev/uninstall: \"{annotation}\"}}}}\nspec: {{selector: {{matchLabels: {{app: p}}}}, template: {{metadata: {{labels: {{app: p}}}}, spec: {{containers: []}}}}}}\n"
        )
    }

    #[test]
    fn an_annotated_node_proxy_daemon_set_announces_the_uninstall_to_every_node() {
        let (before, _) = mesh_with("");
        assert!(!before.uninstalling);
        // Another namespace's DaemonSet of that name, or another value: nothing.
        for (namespace, value) in [("shop", "true"), ("weft-system", "false")] {
            let (mesh, _) = mesh_with(&daemon_set(namespace, value));
            assert!(!mesh.uninstalling, "{namespace} {value}");
        }

        let (during, _) = mesh_with(&daemon_set("weft-system", "true"));
        assert!(during.uninstalling);
        let (old, new) = (
            NodeView::of(&before, "node-1").unwrap(),
            NodeView::of(&during, "node-1").unwrap(),
        );
        assert_eq!(new.full_update(1).uninstalling, Some(true));
        assert_eq!(old.full_update(1).uninstalling, Some(false));
        let delta = old.delta_to(&new, 2).expect("the announcement is a change");
        assert_eq!(delta.uninstalling, Some(true));
        assert!(delta.local_workloads.is_empty() && delta.services.is_empty());
        assert!(new.delta_to(&new.clone(), 3).is_none());

        // The DaemonSet is deleted (that is the uninstall): still uninstalling.
        let (mut gone, cluster) = mesh_with("");
        gone.continue_uninstall(&during, &cluster, "weft-system");
        assert!(
            gone.uninstalling,
            "an uninstall goes on once its DaemonSet is gone"
        );
        // A new installation's DaemonSet, without the annotation: over.
        let (mut reinstalled, cluster) = mesh_with(&daemon_set("weft-system", "false"));
        reinstalled.continue_uninstall(&gone, &cluster, "weft-system");
        assert!(!reinstalled.uninstalling);
    }

    #[test]
    fn the_meshed_namespaces_go_to_every_node_and_change_as_labels_do() {
        let namespace = |name: &str, label: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{weft.dev/mesh: \"{label}\"}}}}\n"
            )
        };
        let (before, _) = mesh_with(&format!(
            "{}---\n{}",
            namespace("shop", "enabled"),
            namespace("legacy", "disabled")
        ));
        let (after, _) = mesh_with(&namespace("legacy", "enabled"));
        let (old, new) = (
            NodeView::of(&before, "node-1").unwrap(),
            NodeView::of(&after, "node-1").unwrap(),
        );
        let names = |update: &pb::ConfigUpdate| update.meshed_namespaces.clone().map(|m| m.names);
        assert_eq!(names(&old.full_update(1)), Some(vec!["shop".to_owned()]));
        let delta = old.delta_to(&new, 2).expect("a label changed");
        assert_eq!(names(&delta), Some(vec!["legacy".to_owned()]));
        assert!(new.delta_to(&new.clone(), 3).is_none());
    }
}
