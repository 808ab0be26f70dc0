//! What changed from one mesh to the next, by key: computed once per new
//! mesh, read by every stream ([`crate::fanout`]) and by the shared
//! full-state entries ([`crate::full_state`]).

use std::collections::BTreeMap;

use imbl::ordmap::DiffItem;

use crate::forms::remote_form;
use crate::mesh::Mesh;

/// How a workload changed from one mesh to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadChange {
    /// Its node before, `None` when it is new.
    pub before: Option<String>,
    /// Its node after, `None` when it is gone.
    pub after: Option<String>,
    /// Whether what other nodes see of it (its remote form) changed; a
    /// label change alone does not.
    pub remote: bool,
}

/// What changed from one mesh to the next, by key. A keyed entry of
/// services and policies says whether the key existed before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshChange {
    /// Changed, added and removed workloads by uid.
    pub workloads: BTreeMap<String, WorkloadChange>,
    /// Changed services, with whether each existed before.
    pub services: BTreeMap<String, bool>,
    /// Changed AuthorizationPolicies, with whether each existed before.
    pub authorization_policies: BTreeMap<String, bool>,
    /// The trust bundle changed.
    pub trust: bool,
    /// The uninstall announcement changed.
    pub uninstalling: bool,
    /// The set of meshed namespaces changed.
    pub meshed_namespaces: bool,
}

impl MeshChange {
    /// What turns `old` into `new`, in proportion to what differs (the
    /// maps share the rest).
    pub fn between(old: &Mesh, new: &Mesh) -> MeshChange {
        let mut workloads = BTreeMap::new();
        for item in old.workloads.diff(&new.workloads) {
            let (uid, change) = match item {
                DiffItem::Update { old, new } if old.1.workload == new.1.workload => continue,
                DiffItem::Update { old, new } => (
                    old.0,
                    WorkloadChange {
                        before: Some(old.1.workload.node.clone()),
                        after: Some(new.1.workload.node.clone()),
                        remote: remote_form(&old.1.workload) != remote_form(&new.1.workload),
                    },
                ),
                DiffItem::Add(uid, added) => (
                    uid,
                    WorkloadChange {
                        before: None,
                        after: Some(added.workload.node.clone()),
                        remote: true,
                    },
                ),
                DiffItem::Remove(uid, removed) => (
                    uid,
                    WorkloadChange {
                        before: Some(removed.workload.node.clone()),
                        after: None,
                        remote: true,
                    },
                ),
            };
            workloads.insert(uid.clone(), change);
        }
        MeshChange {
            workloads,
            services: changed_keys(&old.services, &new.services),
            authorization_policies: changed_keys(
                &old.authorization_policies,
                &new.authorization_policies,
            ),
            trust: old.trust != new.trust,
            uninstalling: old.uninstalling != new.uninstalling,
            meshed_namespaces: old.meshed_namespaces != new.meshed_namespaces,
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
            && self.services.is_empty()
            && self.authorization_policies.is_empty()
            && !self.trust
            && !self.uninstalling
            && !self.meshed_namespaces
    }
}

/// Keys whose values differ between `old` and `new`, with whether each was
/// in `old`.
pub(crate) fn changed_keys<T: PartialEq + Clone>(
    old: &imbl::OrdMap<String, T>,
    new: &imbl::OrdMap<String, T>,
) -> BTreeMap<String, bool> {
    old.diff(new)
        .map(|item| match item {
            DiffItem::Add(key, _) => (key.clone(), false),
            DiffItem::Update { old, .. } => (old.0.clone(), true),
            DiffItem::Remove(key, _) => (key.clone(), true),
        })
        .collect()
}
