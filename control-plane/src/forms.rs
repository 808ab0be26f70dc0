//! What a node is sent of each entry, the rules the fan-out, the full
//! states and the reference view share.

use weft_api::v1 as pb;

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
/// matters only where it runs, and what its uid and identity say is not
/// said again (the pod's name is its uid's, its namespace and
/// ServiceAccount its identity's; the runtime's uid of the pod concerns its
/// node alone). Every node holds every remote workload: each byte left out
/// here is left out of a full state 50,000 times at 50,000 pods.
pub(crate) fn remote_form(workload: &pb::Workload) -> pb::Workload {
    pb::Workload {
        namespace: String::new(),
        name: String::new(),
        service_account: String::new(),
        pod_uid: String::new(),
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
