//! How one change of the mesh reaches every node's stream without each
//! stream looking at the whole mesh: the control plane computes what changed
//! once per new mesh ([`MeshChange::between`]) and publishes it beside the
//! mesh ([`Published`]); each stream reads only the keys that changed and
//! holds only what is its own: its node's pods and their policies
//! ([`NodeFeed`]).
//!
//! A feed starts with a full state ([`crate::full_state`]); its deltas,
//! applied in order, give exactly the full state of the newest mesh (the
//! tests check it over random changes, through [`crate::view::NodeView`]).
//! The cost of a change is the diff (once, in proportion to the cluster
//! today) plus, per stream, the changed keys; a stream's memory is its own
//! pods, not the cluster.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use weft_api::parts::List;

use crate::forms::meshed_namespaces;
use crate::full_state::{FullState, SharedEntries};
use crate::mesh::Mesh;
pub use crate::mesh_change::{MeshChange, WorkloadChange};
pub use crate::node_delta::Delta;

/// A mesh as the streams follow it: numbered, with the changes that led to
/// it, so a stream that slept through several versions catches up by keys.
#[derive(Debug, Default)]
pub struct Published {
    /// Counts meshes from 1; not the version a proxy is sent (each stream
    /// numbers its own messages).
    pub version: u64,
    /// The mesh.
    pub mesh: Arc<Mesh>,
    /// Its entries that every node's full state carries, encoded.
    pub shared: Arc<SharedEntries>,
    /// The change that produced each of the last versions, newest last.
    history: VecDeque<(u64, Arc<MeshChange>)>,
}

impl Published {
    /// The first mesh.
    pub fn first(mesh: Mesh) -> Published {
        Published {
            version: 1,
            shared: Arc::new(SharedEntries::of(&mesh)),
            mesh: Arc::new(mesh),
            history: VecDeque::new(),
        }
    }

    /// `mesh` as the version after this one, keeping the last `keep`
    /// changes; `None` when nothing changed.
    pub fn next(&self, mesh: Mesh, keep: usize) -> Option<Published> {
        let change = MeshChange::between(&self.mesh, &mesh);
        if change.is_empty() {
            return None;
        }
        let version = self.version + 1;
        let shared = Arc::new(self.shared.next(&mesh, &change));
        let mut history = self.history.clone();
        history.push_back((version, Arc::new(change)));
        while history.len() > keep.max(1) {
            history.pop_front();
        }
        Some(Published {
            version,
            mesh: Arc::new(mesh),
            shared,
            history,
        })
    }

    /// The changes after `version` up to this one, oldest first; `None` when
    /// some of them are no longer kept.
    pub fn changes_since(&self, version: u64) -> Option<Vec<&MeshChange>> {
        if version >= self.version {
            return Some(Vec::new());
        }
        let oldest = self.history.front().map_or(self.version + 1, |(v, _)| *v);
        if version + 1 < oldest {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|(v, _)| *v > version)
                .map(|(_, change)| change.as_ref())
                .collect(),
        )
    }
}

/// One stream's memory of what its proxy holds beyond the shared mesh: the
/// mesh version it was brought to, its node's pods, and the policies sent
/// for them.
#[derive(Debug)]
pub struct NodeFeed {
    node: String,
    mesh_version: u64,
    local: BTreeSet<String>,
    policies: BTreeSet<String>,
}

/// What a stream sends next.
#[derive(Debug)]
pub enum Outgoing {
    /// A delta: it is as large as the change.
    Delta(Delta),
    /// A full state, written part by part as it is sent.
    Full(FullState),
}

/// Several changes of one workload, merged.
#[derive(Default)]
struct Merged<'a> {
    /// Its node before the first change (`None`: absent).
    start: Option<Option<&'a str>>,
    /// Whether its remote form changed at some point.
    remote: bool,
}

impl NodeFeed {
    /// The full state of `node` in `published`, and the feed that follows
    /// it from there.
    pub fn start(node: &str, published: &Arc<Published>, version: u64) -> (NodeFeed, FullState) {
        let mesh = &published.mesh;
        let mut feed = NodeFeed {
            node: node.to_owned(),
            mesh_version: published.version,
            local: BTreeSet::new(),
            policies: BTreeSet::new(),
        };
        feed.local = published.shared.pods_on(node).map(str::to_owned).collect();
        feed.policies = feed.needed_policies(mesh);
        let full = FullState::new(
            published.mesh.clone(),
            published.shared.clone(),
            node,
            version,
            feed.local.iter().cloned().collect(),
            feed.policies.iter().cloned().collect(),
        );
        (feed, full)
    }

    /// What the proxy needs to go from the mesh it was last brought to to
    /// `published`, as the update at `version`: a delta, a full state when
    /// the changes in between are no longer kept, or `None` when nothing it
    /// sees changed.
    pub fn update(&mut self, published: &Arc<Published>, version: u64) -> Option<Outgoing> {
        let Some(changes) = published.changes_since(self.mesh_version) else {
            let (feed, full) = NodeFeed::start(&self.node, published, version);
            *self = feed;
            return Some(Outgoing::Full(full));
        };
        self.mesh_version = published.version;
        let (mesh, shared) = (&published.mesh, &published.shared);
        let mut update = Delta::new(version);
        let local_changed = self.workloads(&changes, mesh, shared, &mut update);
        self.policies(&changes, mesh, local_changed, &mut update);
        let mut services: BTreeMap<&str, bool> = BTreeMap::new();
        for change in &changes {
            for (key, existed) in &change.services {
                services.entry(key).or_insert(*existed);
            }
        }
        for (key, existed) in services {
            if mesh.services.contains_key(key) {
                update.service(key, mesh, shared);
            } else if existed {
                update.removed(List::RemovedServices, key);
            }
        }
        if changes.iter().any(|c| c.trust) {
            update.trust(&mesh.trust);
        }
        if changes.iter().any(|c| c.uninstalling) {
            update.uninstalling(mesh.uninstalling);
        }
        if changes.iter().any(|c| c.meshed_namespaces) {
            update.meshed_namespaces(meshed_namespaces(&mesh.meshed_namespaces));
        }
        (!update.is_empty()).then_some(Outgoing::Delta(update))
    }

    /// Adds the changed workloads to `update`; whether a local one changed.
    fn workloads(
        &mut self,
        changes: &[&MeshChange],
        mesh: &Mesh,
        shared: &SharedEntries,
        update: &mut Delta,
    ) -> bool {
        let mut merged: BTreeMap<&str, Merged<'_>> = BTreeMap::new();
        for change in changes {
            for (uid, workload) in &change.workloads {
                let entry = merged.entry(uid).or_default();
                entry.start.get_or_insert(workload.before.as_deref());
                entry.remote |= workload.remote;
            }
        }
        let node = self.node.as_str();
        let mut local_changed = false;
        for (uid, merged) in merged {
            let start = merged.start.flatten();
            let was_local = start == Some(node);
            let was_remote = start.is_some() && !was_local;
            let now = mesh.workloads.get(uid).map(|w| &w.workload);
            let is_local = now.is_some_and(|w| w.node == node);
            let is_remote = now.is_some() && !is_local;
            match now {
                Some(workload) if is_local => {
                    update.local_workload(workload);
                    local_changed = true;
                }
                Some(_) if merged.remote || !was_remote => {
                    update.remote_workload(uid, mesh, shared);
                }
                _ => {}
            }
            if was_local && !is_local {
                update.removed(List::RemovedLocalWorkloads, uid);
                local_changed = true;
            }
            if was_remote && !is_remote {
                update.removed(List::RemovedRemoteWorkloads, uid);
            }
            if is_local {
                self.local.insert(uid.to_owned());
            } else {
                self.local.remove(uid);
            }
        }
        local_changed
    }

    /// Adds the policies the node's pods now need, or need no longer, or
    /// that changed, to `update`.
    fn policies(
        &mut self,
        changes: &[&MeshChange],
        mesh: &Mesh,
        local_changed: bool,
        update: &mut Delta,
    ) {
        let changed: BTreeSet<&str> = changes
            .iter()
            .flat_map(|c| c.authorization_policies.keys())
            .map(String::as_str)
            .collect();
        if !local_changed && changed.is_empty() {
            return; // neither the node's pods nor any policy changed
        }
        let needed = self.needed_policies(mesh);
        for key in &needed {
            let wanted = !self.policies.contains(key) || changed.contains(key.as_str());
            if let Some(policy) = mesh.authorization_policies.get(key).filter(|_| wanted) {
                update.authorization_policy(policy);
            }
        }
        for key in self.policies.difference(&needed) {
            update.removed(List::RemovedAuthorizationPolicies, key);
        }
        self.policies = needed;
    }

    /// The policies the node's pods refer to that the mesh has.
    fn needed_policies(&self, mesh: &Mesh) -> BTreeSet<String> {
        self.local
            .iter()
            .filter_map(|uid| mesh.workloads.get(uid))
            .flat_map(|w| &w.workload.authorization_policies)
            .filter(|key| mesh.authorization_policies.contains_key(*key))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
#[path = "fanout_tests.rs"]
mod tests;
