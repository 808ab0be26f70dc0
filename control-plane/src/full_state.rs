//! Full states that cost a node's share, not the cluster's: the entries
//! every node's full state carries (other nodes' pods in their remote form,
//! the Services) are encoded once per change ([`SharedEntries`]), and a
//! node's full state is those bytes copied into parts, with its own pods
//! and policies encoded for it ([`FullState`]). A full state is written a
//! part at a time as gRPC takes them, so a stream never holds more than a
//! part of it.

use std::ops::Bound;
use std::sync::Arc;

use prost::Message as _;
use prost::bytes::Bytes;
use weft_api::parts::{EncodedUpdate, List, PartWriter};

use crate::forms::{meshed_namespaces, remote_form};
use crate::mesh::Mesh;
use crate::mesh_change::MeshChange;

/// Another node's pod as a full state carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RemoteEntry {
    /// The node it runs on (the key of [`SharedEntries::pods_by_node`], so
    /// the same `Arc` for every pod of a node): that node gets it in its
    /// local form instead.
    node: Arc<str>,
    /// Its remote form, encoded.
    bytes: Bytes,
}

/// The encoded entries that every node's full state shares, keyed as the
/// mesh is, and the pods of each node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedEntries {
    remote: imbl::OrdMap<Arc<str>, RemoteEntry>,
    services: imbl::OrdMap<Arc<str>, Bytes>,
    /// The uids of each node's pods: a node's full state starts from its
    /// own, without looking at every pod.
    pods_by_node: imbl::OrdMap<Arc<str>, imbl::OrdSet<Arc<str>>>,
}

impl SharedEntries {
    /// The entries of `mesh`, each encoded.
    pub fn of(mesh: &Mesh) -> SharedEntries {
        SharedEntries::default().next(mesh, &MeshChange::between(&Mesh::default(), mesh))
    }

    /// These entries brought to `mesh`, which `change` led to: only what
    /// changed is encoded again; the rest is shared with `self` (the maps
    /// are persistent: the copy is O(1)).
    pub fn next(&self, mesh: &Mesh, change: &MeshChange) -> SharedEntries {
        let mut next = self.clone();
        for (uid, workload) in &change.workloads {
            let uid: Arc<str> = Arc::from(uid.as_str());
            if workload.before != workload.after
                && let Some(before) = &workload.before
            {
                next.leave(before, &uid);
            }
            match mesh.workloads.get(&*uid) {
                None => {
                    next.remote.remove(&uid);
                }
                Some(now) if workload.remote => {
                    let node = next.join(&now.workload.node, &uid);
                    let bytes = Bytes::from(remote_form(&now.workload).encode_to_vec());
                    next.remote.insert(uid, RemoteEntry { node, bytes });
                }
                Some(_) => {} // only what its own node sees changed
            }
        }
        for key in change.services.keys() {
            match mesh.services.get(key) {
                Some(service) => {
                    next.services.insert(
                        Arc::from(key.as_str()),
                        Bytes::from(service.encode_to_vec()),
                    );
                }
                None => {
                    next.services.remove(key.as_str());
                }
            }
        }
        next
    }

    /// The pod `uid` in its remote form, encoded.
    pub(crate) fn remote_bytes(&self, uid: &str) -> Option<&Bytes> {
        self.remote.get(uid).map(|entry| &entry.bytes)
    }

    /// The Service `key`, encoded.
    pub(crate) fn service_bytes(&self, key: &str) -> Option<&Bytes> {
        self.services.get(key)
    }

    /// The uids of `node`'s pods.
    pub fn pods_on(&self, node: &str) -> impl Iterator<Item = &str> {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|uid| &**uid)
    }

    /// Counts `uid` among `node`'s pods; the node's shared name.
    fn join(&mut self, node: &str, uid: &Arc<str>) -> Arc<str> {
        let key = match self.pods_by_node.get_key_value(node) {
            Some((key, _)) => key.clone(),
            None => Arc::from(node),
        };
        self.pods_by_node
            .entry(key.clone())
            .or_default()
            .insert(uid.clone());
        key
    }

    /// Counts `uid` no longer among `node`'s pods.
    fn leave(&mut self, node: &str, uid: &Arc<str>) {
        if let Some(pods) = self.pods_by_node.get_mut(node) {
            pods.remove(uid);
            if pods.is_empty() {
                self.pods_by_node.remove(node);
            }
        }
    }
}

/// One node's full state of a published mesh, not yet written: the node's
/// own pods and the policies they refer to, and the shared entries.
#[derive(Debug)]
pub struct FullState {
    mesh: Arc<Mesh>,
    shared: Arc<SharedEntries>,
    node: String,
    version: u64,
    /// Uids of the node's pods.
    local: Vec<String>,
    /// Keys of the policies they refer to.
    policies: Vec<String>,
}

impl FullState {
    /// The full state at `version` of `node` in `mesh`, whose pods are
    /// `local` and need `policies`; `shared` are the mesh's shared entries.
    pub(crate) fn new(
        mesh: Arc<Mesh>,
        shared: Arc<SharedEntries>,
        node: &str,
        version: u64,
        local: Vec<String>,
        policies: Vec<String>,
    ) -> FullState {
        FullState {
            mesh,
            shared,
            node: node.to_owned(),
            version,
            local,
            policies,
        }
    }

    /// Its version on the stream.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Its parts of about `max_bytes` each, written as they are taken.
    pub fn parts(self, max_bytes: usize) -> FullStateParts {
        let node = self
            .shared
            .pods_by_node
            .get_key_value(self.node.as_str())
            .map(|(key, _)| key.clone());
        FullStateParts {
            node,
            writer: Some(PartWriter::new(self.version, true, max_bytes)),
            next: Next::Own,
            full: self,
        }
    }
}

/// Where a full state's writing goes on.
#[derive(Debug)]
enum Next {
    /// The single fields, the node's pods and their policies.
    Own,
    /// The services after this key (`None`: from the first).
    Services(Option<Arc<str>>),
    /// Other nodes' pods after this uid.
    Remote(Option<Arc<str>>),
    /// Everything is written.
    Done,
}

/// A full state's parts, in order (see [`FullState::parts`]).
#[derive(Debug)]
pub struct FullStateParts {
    full: FullState,
    /// The node's shared name, if it has pods: its pods are the remote
    /// entries with this very `Arc` (a pointer comparison per entry).
    node: Option<Arc<str>>,
    /// `None` once the last part is out.
    writer: Option<PartWriter>,
    next: Next,
}

impl Iterator for FullStateParts {
    type Item = EncodedUpdate;

    fn next(&mut self) -> Option<EncodedUpdate> {
        loop {
            let writer = self.writer.as_mut()?;
            if let Some(part) = writer.ready_part() {
                return Some(part);
            }
            let (mesh, shared) = (&self.full.mesh, &self.full.shared);
            self.next = match std::mem::replace(&mut self.next, Next::Done) {
                Next::Own => {
                    writer.trust(&mesh.trust);
                    writer.uninstalling(mesh.uninstalling);
                    writer.meshed_namespaces(&meshed_namespaces(&mesh.meshed_namespaces));
                    for uid in &self.full.local {
                        if let Some(workload) = mesh.workloads.get(uid) {
                            writer.message(List::LocalWorkloads, &workload.workload);
                        }
                    }
                    for key in &self.full.policies {
                        if let Some(policy) = mesh.authorization_policies.get(key) {
                            writer.message(List::AuthorizationPolicies, policy);
                        }
                    }
                    Next::Services(None)
                }
                Next::Services(after) => {
                    let mut last = None;
                    for (key, bytes) in after_key(&shared.services, after.as_deref()) {
                        writer.encoded(List::Services, bytes);
                        last = Some(key.clone());
                        if writer.has_ready_part() {
                            break;
                        }
                    }
                    match last {
                        Some(key) => Next::Services(Some(key)),
                        None => Next::Remote(None),
                    }
                }
                Next::Remote(after) => {
                    let mut last = None;
                    for (uid, entry) in after_key(&shared.remote, after.as_deref()) {
                        last = Some(uid.clone());
                        if self
                            .node
                            .as_ref()
                            .is_some_and(|node| Arc::ptr_eq(node, &entry.node))
                        {
                            continue; // sent in its local form
                        }
                        writer.encoded(List::RemoteWorkloads, &entry.bytes);
                        if writer.has_ready_part() {
                            break;
                        }
                    }
                    match last {
                        Some(uid) => Next::Remote(Some(uid)),
                        None => Next::Done,
                    }
                }
                Next::Done => {
                    // The last part; the ones before it were taken.
                    let writer = self.writer.take()?;
                    return writer.finish().pop();
                }
            };
        }
    }
}

/// The entries of `map` after `key` (all of them for `None`).
fn after_key<'a, V: Clone>(
    map: &'a imbl::OrdMap<Arc<str>, V>,
    key: Option<&str>,
) -> impl Iterator<Item = (&'a Arc<str>, &'a V)> {
    let start = key.map_or(Bound::Unbounded, Bound::Excluded);
    map.range::<_, str>((start, Bound::Unbounded))
}
