//! One node's delta, written from the entries every node shares: a changed
//! pod in its remote form and a changed Service are encoded once per change
//! ([`SharedEntries`]), and each node's delta copies those bytes instead of
//! cloning and encoding the entry again, a thousand times over at a
//! thousand nodes. Only the node's own pods and policies are encoded for
//! it.

use prost::Message as _;
use prost::bytes::Bytes;
use weft_api::parts::{EncodedUpdate, List, PartWriter};
use weft_api::v1 as pb;

use crate::forms::remote_form;
use crate::full_state::SharedEntries;
use crate::mesh::Mesh;

/// A delta for one node, not yet written.
#[derive(Debug, Default)]
pub struct Delta {
    version: u64,
    trust: Option<pb::TrustBundle>,
    uninstalling: Option<bool>,
    meshed_namespaces: Option<pb::MeshedNamespaces>,
    local_workloads: Vec<pb::Workload>,
    /// Encoded remote forms.
    remote_workloads: Vec<Bytes>,
    /// Encoded Services.
    services: Vec<Bytes>,
    authorization_policies: Vec<pb::AuthorizationPolicy>,
    /// Removed keys, each with its list.
    removed: Vec<(List, String)>,
}

impl Delta {
    /// An empty delta at `version`.
    pub(crate) fn new(version: u64) -> Delta {
        Delta {
            version,
            ..Delta::default()
        }
    }

    /// Its version on the stream.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether it changes nothing (and so is not sent).
    pub fn is_empty(&self) -> bool {
        self.trust.is_none()
            && self.uninstalling.is_none()
            && self.meshed_namespaces.is_none()
            && self.local_workloads.is_empty()
            && self.remote_workloads.is_empty()
            && self.services.is_empty()
            && self.authorization_policies.is_empty()
            && self.removed.is_empty()
    }

    /// Local, remote and Service entries, and removed keys, for the log.
    pub fn counts(&self) -> [usize; 4] {
        [
            self.local_workloads.len(),
            self.remote_workloads.len(),
            self.services.len(),
            self.removed.len(),
        ]
    }

    /// Its parts of about `max_bytes` each.
    pub fn parts(&self, max_bytes: usize) -> Vec<EncodedUpdate> {
        let mut writer = PartWriter::new(self.version, false, max_bytes);
        if let Some(trust) = &self.trust {
            writer.trust(trust);
        }
        if let Some(uninstalling) = self.uninstalling {
            writer.uninstalling(uninstalling);
        }
        if let Some(names) = &self.meshed_namespaces {
            writer.meshed_namespaces(names);
        }
        for workload in &self.local_workloads {
            writer.message(List::LocalWorkloads, workload);
        }
        for policy in &self.authorization_policies {
            writer.message(List::AuthorizationPolicies, policy);
        }
        for bytes in &self.services {
            writer.encoded(List::Services, bytes);
        }
        for bytes in &self.remote_workloads {
            writer.encoded(List::RemoteWorkloads, bytes);
        }
        for (list, key) in &self.removed {
            writer.key(*list, key);
        }
        writer.finish()
    }

    pub(crate) fn trust(&mut self, trust: &pb::TrustBundle) {
        self.trust = Some(trust.clone());
    }

    pub(crate) fn uninstalling(&mut self, uninstalling: bool) {
        self.uninstalling = Some(uninstalling);
    }

    pub(crate) fn meshed_namespaces(&mut self, names: pb::MeshedNamespaces) {
        self.meshed_namespaces = Some(names);
    }

    pub(crate) fn local_workload(&mut self, workload: &pb::Workload) {
        self.local_workloads.push(workload.clone());
    }

    pub(crate) fn authorization_policy(&mut self, policy: &pb::AuthorizationPolicy) {
        self.authorization_policies.push(policy.clone());
    }

    /// The pod `uid` of `mesh` in its remote form, as `shared` has it
    /// encoded.
    pub(crate) fn remote_workload(&mut self, uid: &str, mesh: &Mesh, shared: &SharedEntries) {
        let bytes = shared.remote_bytes(uid).cloned().or_else(|| {
            // Not there: the shared entries lag the mesh (they never should).
            let workload = &mesh.workloads.get(uid)?.workload;
            Some(Bytes::from(remote_form(workload).encode_to_vec()))
        });
        self.remote_workloads.extend(bytes);
    }

    /// The Service `key` of `mesh`, as `shared` has it encoded.
    pub(crate) fn service(&mut self, key: &str, mesh: &Mesh, shared: &SharedEntries) {
        let bytes = shared.service_bytes(key).cloned().or_else(|| {
            let service = mesh.services.get(key)?;
            Some(Bytes::from(service.encode_to_vec()))
        });
        self.services.extend(bytes);
    }

    pub(crate) fn removed(&mut self, list: List, key: &str) {
        self.removed.push((list, key.to_owned()));
    }
}
