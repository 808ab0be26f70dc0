//! A node's view of the mesh: what one node proxy needs, and the difference
//! between two views. This is the definition of what each node sees; the
//! streams do not build whole views per change ([`crate::fanout`] sends the
//! same result by keys), the tests compare against it.
//!
//! A node gets its own pods in full (labels included, for policy), the pods
//! of other nodes without labels (a source proxy needs where and who, not
//! how they are selected), every Service, the AuthorizationPolicies its own
//! pods are subject to, and the trust bundle. Because the
//! remote form leaves labels out, a label change on one node's pod reaches
//! only that node.

use std::collections::BTreeMap;

use weft_api::v1 as pb;

use crate::mesh::Mesh;

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
    /// The view of `node` in `mesh`.
    pub fn of(mesh: &Mesh, node: &str) -> NodeView {
        let mut view = NodeView {
            services: mesh.services.clone(),
            trust: mesh.trust.clone(),
            uninstalling: mesh.uninstalling,
            meshed_namespaces: mesh.meshed_namespaces.clone(),
            ..NodeView::default()
        };
        for (uid, workload) in &mesh.workloads {
            if workload.workload.node == node {
                for key in &workload.workload.authorization_policies {
                    if let Some(policy) = mesh.authorization_policies.get(key) {
                        view.authorization_policies
                            .insert(key.clone(), policy.clone());
                    }
                }
                view.local.insert(uid.clone(), workload.workload.clone());
            } else {
                view.remote
                    .insert(uid.clone(), remote_form(&workload.workload));
            }
        }
        view
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
        };
        (!changes_nothing(&update)).then_some(update)
    }
}

/// Whether a delta carries nothing: such a delta is never sent.
pub(crate) fn changes_nothing(update: &pb::ConfigUpdate) -> bool {
    update.local_workloads.is_empty()
        && update.removed_local_workloads.is_empty()
        && update.remote_workloads.is_empty()
        && update.removed_remote_workloads.is_empty()
        && update.services.is_empty()
        && update.removed_services.is_empty()
        && update.trust.is_none()
        && update.authorization_policies.is_empty()
        && update.removed_authorization_policies.is_empty()
        && update.uninstalling.is_none()
        && update.meshed_namespaces.is_none()
}

/// A workload as other nodes see it: how a pod is selected and protected
/// matters only where it runs.
pub(crate) fn remote_form(workload: &pb::Workload) -> pb::Workload {
    pb::Workload {
        labels: Default::default(),
        authorization_policies: Vec::new(),
        invalid_authorization_policies: Vec::new(),
        probe_ports: Vec::new(),
        mtls_mode: pb::MtlsMode::Permissive as i32,
        mtls_policy: String::new(),
        ..workload.clone()
    }
}

pub(crate) fn meshed_namespaces(
    names: &std::collections::BTreeSet<String>,
) -> pb::MeshedNamespaces {
    pb::MeshedNamespaces {
        names: names.iter().cloned().collect(),
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
            NodeView::of(&before, "node-1"),
            NodeView::of(&during, "node-1"),
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
            NodeView::of(&before, "node-1"),
            NodeView::of(&after, "node-1"),
        );
        let names = |update: &pb::ConfigUpdate| update.meshed_namespaces.clone().map(|m| m.names);
        assert_eq!(names(&old.full_update(1)), Some(vec!["shop".to_owned()]));
        let delta = old.delta_to(&new, 2).expect("a label changed");
        assert_eq!(names(&delta), Some(vec!["legacy".to_owned()]));
        assert!(new.delta_to(&new.clone(), 3).is_none());
    }
}
