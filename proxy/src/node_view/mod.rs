//! The node's view of the mesh as the control plane last sent it and the
//! proxy could apply it: local and remote workloads, services, trust roots.
//!
//! Updates arrive as `weft_api::v1::ConfigUpdate`s. [`NodeView::apply`] turns
//! one into the next view, or refuses it with an [`UpdateProblem`] that
//! becomes the NACK reason. Everything in an update is validated (and turned
//! into typed values: [`Identity`], [`IpAddr`], [`TrustBundle`]) before any
//! of it is used, and the previous view is only ever read, so a refused
//! update cannot leave a half-applied state behind: the last good view keeps
//! serving. A view is immutable; readers share it as an `Arc` snapshot.

mod convert;
mod entries;
#[cfg(test)]
mod entries_tests;
mod keyed;
mod names;
mod pod_uid;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod reconnect_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

pub use crate::packed_map::{Change, PackedMap};
use weft_api::authorization::Policy;
pub use weft_api::traffic::{LoadBalancing, OutlierDetection, TrafficPolicy};
use weft_api::v1::ConfigUpdate;
use weft_certs::{Identity, TrustBundle};

pub use entries::{
    Addresses, Endpoint, LocalDetails, Service, ServicePort, ServicePorts, TargetPorts, Workload,
};

pub use keyed::{HasKey, Keyed, ViewKey};
pub use pod_uid::PodUid;

/// The compiled AuthorizationPolicies by `<namespace>/<name>`: a persistent
/// map as [`Keyed`] is (few entries: a policy does not carry its key).
pub type Policies = PackedMap<Arc<str>, Arc<Policy>>;

/// One applied version of the node's config. Maps are keyed as on the wire:
/// workloads by uid (`<namespace>/<pod>`), services by `<namespace>/<name>`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    version: u64,
    generation: u64,
    /// Whether the mesh is being uninstalled: a proxy that stops now
    /// removes its capture (else it leaves it, failing closed).
    uninstalling: bool,
    /// The namespaces whose new pods are captured on announcement; `None`
    /// while no update said (a control plane older than the field).
    meshed_namespaces: Option<std::collections::BTreeSet<String>>,
    /// Whether it was restored from the node's kept state, not received
    /// from the control plane since the proxy started.
    restored: bool,
    trust: Trust,
    local_workloads: Keyed<Workload>,
    remote_workloads: Keyed<Workload>,
    services: Keyed<Service>,
    #[serde(serialize_with = "policy_summaries")]
    authorization_policies: Policies,
}

/// An applied update, and the entries of it that were refused (each kept
/// at its previous value, or left out if it had none).
#[derive(Debug)]
pub struct Applied {
    /// The new view.
    pub view: NodeView,
    /// What was refused, entry by entry.
    pub refused: Vec<UpdateProblem>,
}

/// The mesh roots, with the trust domain they are for.
#[derive(Clone, Debug, Serialize)]
pub struct Trust {
    /// The mesh's trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// The roots; more than one during a root rotation.
    #[serde(serialize_with = "roots_count", rename = "roots")]
    pub bundle: TrustBundle,
}

/// Which keyed list of an update an entry belongs to, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// `local_workloads` / `removed_local_workloads`.
    LocalWorkload,
    /// `remote_workloads` / `removed_remote_workloads`.
    RemoteWorkload,
    /// `services` / `removed_services`.
    Service,
    /// `authorization_policies` / `removed_authorization_policies`.
    AuthorizationPolicy,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::LocalWorkload => "local workload",
            EntryKind::RemoteWorkload => "remote workload",
            EntryKind::Service => "service",
            EntryKind::AuthorizationPolicy => "authorization policy",
        })
    }
}

/// Why an update was refused. Its text is the NACK reason, so it names the
/// entry and the value at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateProblem {
    /// A delta arrived before any full state.
    #[error("delta version {version} has no base: no full state has been applied yet")]
    DeltaWithoutBase {
        /// The delta's version.
        version: u64,
    },
    /// A delta's version is not the applied version plus one.
    #[error("delta version {version} does not follow the applied version {applied}")]
    VersionGap {
        /// The version the proxy holds.
        applied: u64,
        /// The delta's version.
        version: u64,
    },
    /// A full state came without the mesh roots.
    #[error("a full state must carry the trust bundle")]
    MissingTrust,
    /// The trust bundle is unusable.
    #[error("trust bundle: {reason}")]
    InvalidTrust {
        /// What is wrong with it.
        reason: String,
    },
    /// An entry has an empty uid or name.
    #[error("{kind} with an empty key: {reason}")]
    EmptyKey {
        /// Which list.
        kind: EntryKind,
        /// Which field is empty.
        reason: &'static str,
    },
    /// An entry is invalid.
    #[error("{kind} {key}: {reason}")]
    InvalidEntry {
        /// Which list.
        kind: EntryKind,
        /// The entry's key.
        key: String,
        /// What is wrong, naming the field and its value.
        reason: String,
    },
    /// The same key appears twice in one list.
    #[error("{kind} {key} is listed twice")]
    Duplicate {
        /// Which list.
        kind: EntryKind,
        /// The repeated key.
        key: String,
    },
    /// A delta both updates and removes the same key.
    #[error("{kind} {key} is both updated and removed")]
    UpdatedAndRemoved {
        /// Which list.
        kind: EntryKind,
        /// The key.
        key: String,
    },
}

impl UpdateProblem {
    /// Whether the proxy can no longer follow the stream's deltas and needs a
    /// full state: every later delta would build on a version it lacks.
    pub fn needs_full_state(&self) -> bool {
        matches!(
            self,
            UpdateProblem::DeltaWithoutBase { .. } | UpdateProblem::VersionGap { .. }
        )
    }
}

impl NodeView {
    /// Applies `update` on top of `previous` (the view applied last, if any)
    /// for the proxy of `node`, following the proto's rules: a full state
    /// replaces everything; a delta needs a previous view whose version is
    /// exactly one less, adds or replaces the entries it lists whole and
    /// deletes the keys it removes.
    ///
    /// An entry that does not convert is refused alone: it keeps its
    /// previous value (or stays out if it had none) and is reported in
    /// [`Applied::refused`]; the rest applies, so one bad object cannot
    /// freeze the node's config. Only a problem with the update as a whole
    /// (no base, a version gap, unusable roots) refuses all of it.
    /// `previous` is never modified.
    pub fn apply(
        previous: Option<&NodeView>,
        update: &ConfigUpdate,
        node: &str,
    ) -> Result<Applied, UpdateProblem> {
        let base = if update.full_state {
            None
        } else {
            let previous = previous.ok_or(UpdateProblem::DeltaWithoutBase {
                version: update.version,
            })?;
            if previous.version.checked_add(1) != Some(update.version) {
                return Err(UpdateProblem::VersionGap {
                    applied: previous.version,
                    version: update.version,
                });
            }
            Some(previous)
        };
        let trust = match (&update.trust, base) {
            (Some(trust), _) => convert::trust(trust)?,
            (None, Some(base)) => base.trust.clone(),
            (None, None) => return Err(UpdateProblem::MissingTrust),
        };
        let mut refused = Vec::new();
        // What a refused entry leaves behind, kind by kind, so that a
        // refusal never loosens anything. A local pod keeps its last good
        // entry, quarantined: its addresses stay captured and every
        // connection to it is refused. A remote pod is dropped: its
        // addresses vouch for no identity. A Service keeps its last good
        // routing. A policy is dropped: the pods it applies to refuse every
        // connection until it is back.
        let local_workloads = merge(
            EntryKind::LocalWorkload,
            (base.is_some(), previous.map(|p| &p.local_workloads)),
            &update.local_workloads,
            &update.removed_local_workloads,
            |w| convert::workload(EntryKind::LocalWorkload, w, Some(node)),
            |old, problem| {
                let why = format!("its last update was refused ({problem})");
                Some(Arc::new(old.quarantined(why)))
            },
            &mut refused,
        );
        let remote_workloads = merge(
            EntryKind::RemoteWorkload,
            (base.is_some(), previous.map(|p| &p.remote_workloads)),
            &update.remote_workloads,
            &update.removed_remote_workloads,
            |w| convert::workload(EntryKind::RemoteWorkload, w, None),
            |_, _| None,
            &mut refused,
        );
        let services = merge(
            EntryKind::Service,
            (base.is_some(), previous.map(|p| &p.services)),
            &update.services,
            &update.removed_services,
            convert::service,
            |old, _| Some(old.clone()),
            &mut refused,
        );
        let authorization_policies = merge(
            EntryKind::AuthorizationPolicy,
            (base.is_some(), previous.map(|p| &p.authorization_policies)),
            &update.authorization_policies,
            &update.removed_authorization_policies,
            convert::authorization_policy,
            |_, _| None,
            &mut refused,
        );
        // A workload whose policy is missing refuses every connection
        // (fail closed, see `weft_api::authorization::decide`). Say so when
        // this update made it so: the workload is listed, or the policy was
        // removed or refused.
        let listed: HashSet<PodUid> = update
            .local_workloads
            .iter()
            .map(|w| PodUid::new(&w.uid))
            .collect();
        let touched: HashSet<String> = update
            .removed_authorization_policies
            .iter()
            .cloned()
            .chain(
                update
                    .authorization_policies
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name)),
            )
            .collect();
        for workload in local_workloads.values() {
            let missing = workload
                .local()
                .authorization_policies
                .iter()
                .filter(|key| {
                    !authorization_policies.contains_key(key.as_str())
                        && (listed.contains(&workload.uid) || touched.contains(*key))
                });
            for missing in missing {
                refused.push(UpdateProblem::InvalidEntry {
                    kind: EntryKind::LocalWorkload,
                    key: workload.uid.to_string(),
                    reason: format!(
                        "refers to authorization policy {missing}, which is not applied: connections to it are refused"
                    ),
                });
            }
        }
        Ok(Applied {
            view: NodeView {
                version: update.version,
                generation: previous.map_or(1, |p| p.generation.saturating_add(1)),
                uninstalling: update
                    .uninstalling
                    .unwrap_or_else(|| base.is_some_and(|b| b.uninstalling)),
                meshed_namespaces: match &update.meshed_namespaces {
                    Some(meshed) => Some(meshed.names.iter().cloned().collect()),
                    None => base.and_then(|b| b.meshed_namespaces.clone()),
                },
                restored: false,
                trust,
                local_workloads,
                remote_workloads,
                services,
                authorization_policies,
            },
            refused,
        })
    }

    /// The version this view was built from, as the control plane numbered
    /// it. Each config stream numbers from 1 again, so it tells nothing
    /// about which of two views is newer: see [`NodeView::generation`].
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many views this proxy applied up to and including this one (a
    /// restored view counts as the first): newer views have larger
    /// generations, across config streams and control-plane restarts.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the mesh is being uninstalled (`ConfigUpdate.uninstalling`).
    pub fn uninstalling(&self) -> bool {
        self.uninstalling
    }

    /// Whether this view was restored from the node's kept state (the
    /// control plane has sent nothing since the proxy started).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The same view, marked restored from the node's kept state.
    pub fn into_restored(self) -> NodeView {
        NodeView {
            restored: true,
            ..self
        }
    }

    /// Whether new pods of `namespace` are meshed unless they opt out
    /// (`ConfigUpdate.meshed_namespaces`).
    pub fn namespace_meshed(&self, namespace: &str) -> bool {
        self.meshed_namespaces
            .as_ref()
            .is_some_and(|meshed| meshed.contains(namespace))
    }

    /// Every namespace whose new pods are meshed, if an update said.
    pub fn meshed_namespaces(&self) -> Option<&std::collections::BTreeSet<String>> {
        self.meshed_namespaces.as_ref()
    }

    /// The mesh roots.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Pods on this node, by uid.
    pub fn local_workloads(&self) -> &Keyed<Workload> {
        &self.local_workloads
    }

    /// Pods on other nodes, by uid.
    pub fn remote_workloads(&self) -> &Keyed<Workload> {
        &self.remote_workloads
    }

    /// Services, by `<namespace>/<name>`.
    pub fn services(&self) -> &Keyed<Service> {
        &self.services
    }

    /// AuthorizationPolicies local workloads refer to, compiled, by
    /// `<namespace>/<name>`.
    pub fn authorization_policies(&self) -> &Policies {
        &self.authorization_policies
    }

    /// The identities of this node's meshed pods: the ones that need a
    /// certificate. Several pods of one ServiceAccount share one identity.
    pub fn meshed_local_identities(&self) -> BTreeSet<Identity> {
        self.local_workloads
            .values()
            .filter(|w| w.meshed())
            .map(|w| w.identity().clone())
            .collect()
    }
}

/// What [`merge`] needs of a view's map: the workloads' and Services'
/// [`Keyed`] maps and the policies' plain one.
trait ViewMap<T>: Clone + Default {
    /// What the map holds its keys as.
    type Key: ViewKey;
    fn get_key_value(&self, key: &str) -> Option<(&Self::Key, &Arc<T>)>;
    fn get(&self, key: &str) -> Option<&Arc<T>> {
        ViewMap::get_key_value(self, key).map(|(_, value)| value)
    }
    fn get_held(&self, key: &Self::Key) -> Option<&Arc<T>>;
    fn apply(&mut self, changes: Vec<(Self::Key, Option<Arc<T>>)>);
}

impl<T: HasKey + PartialEq> ViewMap<T> for Keyed<T> {
    type Key = T::Key;
    fn get_key_value(&self, key: &str) -> Option<(&T::Key, &Arc<T>)> {
        Keyed::get_key_value(self, key)
    }
    fn get_held(&self, key: &T::Key) -> Option<&Arc<T>> {
        self.get_by_key(key).map(|(_, value)| value)
    }
    fn apply(&mut self, changes: Vec<(T::Key, Option<Arc<T>>)>) {
        Keyed::apply(self, changes);
    }
}

impl<T> ViewMap<T> for PackedMap<Arc<str>, Arc<T>> {
    type Key = Arc<str>;
    fn get_key_value(&self, key: &str) -> Option<(&Arc<str>, &Arc<T>)> {
        PackedMap::get_key_value(self, key)
    }
    fn get_held(&self, key: &Arc<str>) -> Option<&Arc<T>> {
        PackedMap::get(self, key)
    }
    fn apply(&mut self, changes: Vec<(Arc<str>, Option<Arc<T>>)>) {
        PackedMap::apply(self, changes);
    }
}

/// Builds one keyed map of the next view: the base's entries (none for a
/// full state), minus the removed keys, plus the listed entries, each
/// converted (and so validated) by `convert`. `(is_delta, previous)`: whether
/// the update builds on `previous`, the map of the view applied last. An
/// entry that does not convert is reported in `refused`, and its key gets
/// what `fallback` makes of its previous value (nothing if it had none, or
/// if the update also removes it). An entry listed twice or both listed and
/// removed is reported; the first listing, or the removal, stands. An
/// entry equal to its previous value is that value: after a reconnect's
/// full state, the view and the route table built from it share every
/// entry that did not change, instead of holding an old copy and a new.
fn merge<P, T: PartialEq, M: ViewMap<T>>(
    kind: EntryKind,
    (is_delta, previous): (bool, Option<&M>),
    listed: &[P],
    removed: &[String],
    convert: impl Fn(&P) -> Result<(M::Key, T), UpdateProblem>,
    fallback: impl Fn(&Arc<T>, &UpdateProblem) -> Option<Arc<T>>,
    refused: &mut Vec<UpdateProblem>,
) -> M {
    let mut map = match (is_delta, previous) {
        (true, Some(previous)) => previous.clone(),
        _ => M::default(),
    };
    // A full state has no base to remove from; its removed lists mean nothing.
    let removed: HashSet<&str> = if is_delta {
        removed.iter().map(String::as_str).collect()
    } else {
        HashSet::new()
    };
    // Made in order and applied at once (the last change of a key stands):
    // each run of the map they touch is rebuilt once.
    let mut changes: Vec<(M::Key, Option<Arc<T>>)> =
        Vec::with_capacity(removed.len() + listed.len());
    changes.extend(
        removed
            .iter()
            .filter_map(|key| map.get_key_value(key))
            .map(|(key, _)| (key.clone(), None)),
    );
    let mut seen = HashSet::new();
    for entry in listed {
        let (key, value) = match convert(entry) {
            Ok(converted) => converted,
            Err(problem) => {
                if let UpdateProblem::InvalidEntry { key, .. } = &problem {
                    let old = previous.and_then(|p| p.get(key.as_str()));
                    let kept = old
                        .filter(|_| !removed.contains(key.as_str()))
                        .and_then(|old| fallback(old, &problem));
                    changes.push((key.as_str().into(), kept));
                }
                refused.push(problem);
                continue;
            }
        };
        if !removed.is_empty() && removed.contains(key.to_string().as_str()) {
            let key = key.to_string();
            refused.push(UpdateProblem::UpdatedAndRemoved { kind, key });
            continue;
        }
        if !seen.insert(key.clone()) {
            let key = key.to_string();
            refused.push(UpdateProblem::Duplicate { kind, key });
            continue;
        }
        let value = match previous.and_then(|p| p.get_held(&key)) {
            Some(old) if **old == value => old.clone(),
            _ => Arc::new(value),
        };
        changes.push((key, Some(value)));
    }
    map.apply(changes);
    map
}

/// Serializes a value by its `Display` form (identities in JSON dumps).
pub(crate) fn display<T: fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// AuthorizationPolicies in the config dump: action and rule count by key.
fn policy_summaries<S: serde::Serializer>(
    policies: &Policies,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(
        policies
            .iter()
            .map(|(key, policy)| (key, policy_summary(policy))),
    )
}

/// What the config dump shows of an AuthorizationPolicy.
pub(crate) fn policy_summary(policy: &Policy) -> serde_json::Value {
    serde_json::json!({ "action": policy.action.as_str(), "rules": policy.rules.len() })
}

fn roots_count<S: serde::Serializer>(
    bundle: &TrustBundle,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(bundle.roots().len() as u64)
}
