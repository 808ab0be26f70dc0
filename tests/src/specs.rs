//! What a test declares a testbed's pods and services to be ([`PodSpec`],
//! [`ServiceSpec`], borrowed, for terse declarations), and the owned forms
//! the builder keeps until it plans the testbed ([`crate::topology`]).

use std::collections::BTreeMap;

/// A pod to create: a network namespace behind its node, plus the Kubernetes
/// metadata the manifests report for it.
///
/// `PodSpec { node: "node-1", name: "client", ..PodSpec::default() }` gives a meshed
/// pod in namespace `default` with service account `default` and no labels.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    /// The node the pod runs on; must have been declared with `.node(..)`.
    pub node: &'a str,
    /// Kubernetes namespace of the pod.
    pub namespace: &'a str,
    /// Pod name, unique within the whole testbed (it is how [`crate::Target::Pod`]
    /// finds the pod).
    pub name: &'a str,
    /// Kubernetes service account the pod runs as (its mesh identity).
    pub service_account: &'a str,
    /// Pod labels, matched by service selectors.
    pub labels: &'a [(&'a str, &'a str)],
    /// Whether the pod is part of the mesh (see the manifests' `weft.dev/mesh` label).
    pub meshed: bool,
    /// The ports the kubelet probes (a TCP readiness probe each, in the
    /// manifest): the node's own connections to them pass the capture.
    pub probe_ports: &'a [u16],
}

impl<'a> PodSpec<'a> {
    /// A pod with no labels and no probes, running as the ServiceAccount
    /// of its own name.
    pub fn named(node: &'a str, namespace: &'a str, name: &'a str, meshed: bool) -> Self {
        PodSpec {
            node,
            namespace,
            name,
            service_account: name,
            labels: &[],
            meshed,
            probe_ports: &[],
        }
    }

    /// The same pod, with the kubelet probing `ports`.
    pub fn probed(self, ports: &'a [u16]) -> Self {
        PodSpec {
            probe_ports: ports,
            ..self
        }
    }
}

impl Default for PodSpec<'_> {
    fn default() -> Self {
        PodSpec {
            node: "",
            namespace: "default",
            name: "",
            service_account: "default",
            labels: &[],
            meshed: true,
            probe_ports: &[],
        }
    }
}

/// A Kubernetes Service with one TCP port. It gets a ClusterIP from 10.96.1.0/24, which
/// exists only in the manifests: no namespace routes or translates it.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec<'a> {
    /// Kubernetes namespace of the service.
    pub namespace: &'a str,
    /// Service name, unique within its namespace.
    pub name: &'a str,
    /// The port clients dial on the ClusterIP.
    pub port: u16,
    /// The port the selected pods listen on.
    pub target_port: u16,
    /// Labels a pod in the same namespace must all carry to be an endpoint.
    pub selector: &'a [(&'a str, &'a str)],
}

/// A declared pod, owned: what the builder keeps until `build`.
#[derive(Debug, Clone)]
pub(crate) struct PodDecl {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub meshed: bool,
    pub probe_ports: Vec<u16>,
}

impl From<PodSpec<'_>> for PodDecl {
    fn from(spec: PodSpec<'_>) -> Self {
        PodDecl {
            node: spec.node.to_owned(),
            namespace: spec.namespace.to_owned(),
            name: spec.name.to_owned(),
            service_account: spec.service_account.to_owned(),
            labels: to_map(spec.labels),
            meshed: spec.meshed,
            probe_ports: spec.probe_ports.to_vec(),
        }
    }
}

/// A declared service, owned.
#[derive(Debug, Clone)]
pub(crate) struct ServiceDecl {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub selector: BTreeMap<String, String>,
}

impl From<ServiceSpec<'_>> for ServiceDecl {
    fn from(spec: ServiceSpec<'_>) -> Self {
        ServiceDecl {
            namespace: spec.namespace.to_owned(),
            name: spec.name.to_owned(),
            port: spec.port,
            target_port: spec.target_port,
            selector: to_map(spec.selector),
        }
    }
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
