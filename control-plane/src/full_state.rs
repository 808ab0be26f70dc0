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
    /// The node it runs on: that node gets it in its local form instead.
    node: Arc<str>,
    /// Its remote form, encoded.
    bytes: Bytes,
}

/// The encoded entries that every node's full state shares, keyed as the
/// mesh is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedEntries {
    remote: imbl::OrdMap<Arc<str>, RemoteEntry>,
    services: imbl::OrdMap<Arc<str>, Bytes>,
}

impl SharedEntries {
    /// The entries of `mesh`, each encoded.
    pub fn of(mesh: &Mesh) -> SharedEntries {
        SharedEntries {
            remote: mesh
                .workloads
                .iter()
                .map(|(uid, w)| (Arc::from(uid.as_str()), remote_entry(&w.workload)))
                .collect(),
            services: mesh
                .services
                .iter()
                .map(|(key, service)| {
                    (
                        Arc::from(key.as_str()),
                        Bytes::from(service.encode_to_vec()),
                    )
                })
                .collect(),
        }
    }

    /// These entries brought to `mesh`, which `change` led to: only what
    /// changed is encoded again; the rest is shared with `self` (the maps
    /// are persistent: the copy is O(1)).
    pub fn next(&self, mesh: &Mesh, change: &MeshChange) -> SharedEntries {
        let mut next = self.clone();
        for (uid, workload) in &change.workloads {
            match mesh.workloads.get(uid) {
                None => {
                    next.remote.remove(uid.as_str());
                }
                Some(now) if workload.remote => {
                    next.remote
                        .insert(Arc::from(uid.as_str()), remote_entry(&now.workload));
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
}

fn remote_entry(workload: &weft_api::v1::Workload) -> RemoteEntry {
    RemoteEntry {
        node: Arc::from(workload.node.as_str()),
        bytes: remote_form(workload).encode_to_vec().into(),
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
        FullStateParts {
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
                        if *entry.node == *self.full.node {
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
