//! The mesh model: what the cluster's objects mean for the mesh. Workloads
//! (pods with an identity, a node, IPs and whether they are meshed) and
//! services (VIPs, ports, endpoints). Always consistent with one snapshot
//! of the sources: derived from a [`ClusterState`], and brought along from
//! one snapshot to the next by what changed ([`crate::mesh_update`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::v1 as pb;
use weft_certs::Identity;

use crate::cluster::{ClusterState, MIRROR_POD_ANNOTATION, in_namespace};
use crate::policy;

/// The label that turns the mesh on for a namespace, or on or off for a pod.
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// The DaemonSet of weft's node proxies, in the control plane's namespace.
pub const NODE_PROXY_DAEMONSET: &str = "weft-node-proxy";
/// The annotation on [`NODE_PROXY_DAEMONSET`] that says the mesh is being
/// uninstalled (value `"true"`), set by `weft-control-plane uninstall`.
/// The DaemonSet goes with the installation, so the next one starts
/// without it.
pub const UNINSTALL_ANNOTATION: &str = "weft.dev/uninstall";
/// The EndpointSlice label naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshWorkload {
    /// The wire form sent to proxies.
    pub workload: pb::Workload,
    /// The parsed identity.
    pub identity: Identity,
    /// Whether the pod has an IP: from then on its containers (init
    /// containers first) can open connections, and they must be meshed, so
    /// the CA signs its identity. A pod that is only scheduled has none
    /// yet; a finished one is not a workload at all.
    pub has_ip: bool,
}

/// The whole mesh, derived from one snapshot of the cluster. Its maps are
/// persistent ([`imbl::OrdMap`]): the next mesh shares everything a change
/// did not touch, and two meshes are compared in proportion to what
/// differs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mesh {
    /// Workloads by uid (`<namespace>/<pod>`).
    pub workloads: imbl::OrdMap<String, Arc<MeshWorkload>>,
    /// Services by `<namespace>/<name>`.
    pub services: imbl::OrdMap<String, Arc<pb::Service>>,
    /// AuthorizationPolicies by `<namespace>/<name>`, as sent (see
    /// [`policy::AuthorizationPolicies::valid`]).
    pub authorization_policies: imbl::OrdMap<String, pb::AuthorizationPolicy>,
    /// The invalid AuthorizationPolicies: why, by `<namespace>/<name>`.
    pub invalid_authorization_policies: imbl::OrdMap<String, String>,
    /// The mesh roots and trust domain.
    pub trust: pb::TrustBundle,
    /// Whether the mesh is being uninstalled (see [`UNINSTALL_ANNOTATION`]):
    /// proxies that stop remove their capture.
    pub uninstalling: bool,
    /// The namespaces labelled `weft.dev/mesh: enabled`.
    pub meshed_namespaces: std::collections::BTreeSet<String>,
    /// The workloads claiming each IP, to quarantine the ones that share.
    pub(crate) ip_owners: imbl::OrdMap<String, imbl::OrdSet<String>>,
}

impl Mesh {
    /// Derives the mesh from the cluster. Pods that cannot be part of it
    /// (finished, unscheduled, or whose identity is invalid) are left out.
    pub fn derive(cluster: &ClusterState, trust: pb::TrustBundle, mesh_namespace: &str) -> Mesh {
        Mesh::default().next(&ClusterState::default(), cluster, trust, mesh_namespace)
    }

    /// Keeps an uninstall announced once the node proxies' DaemonSet is
    /// gone: deleting it is the uninstall itself, and its proxies must
    /// still hear "uninstalling" (not a change back) until they stop. A
    /// DaemonSet that comes back (a new installation) brings its own
    /// annotation, or none.
    pub fn continue_uninstall(
        &mut self,
        previous: &Mesh,
        cluster: &ClusterState,
        mesh_namespace: &str,
    ) {
        let daemon_set = format!("{mesh_namespace}/{NODE_PROXY_DAEMONSET}");
        if previous.uninstalling && !cluster.daemon_sets.contains_key(&daemon_set) {
            self.uninstalling = true;
        }
    }

    /// Whether `node` runs a meshed pod with `identity` that has an IP
    /// (Pending with its init containers, or Running): the CA's condition
    /// for signing that identity for that node.
    pub fn node_runs(&self, node: &str, identity: &Identity) -> bool {
        self.workloads.values().any(|w| {
            w.has_ip && w.workload.meshed && w.workload.node == node && &w.identity == identity
        })
    }
}

/// Why a pod gets no identity, if it gets none: a static pod's mirror (its
/// spec comes from a node's disk, so the node, not the API, says who it
/// is), a pod without a ServiceAccount, or one in the host's network
/// namespace (its address is the node's: capturing it would capture the
/// node). Such pods are left out of the mesh: no certificate, no capture.
fn no_identity_reason(pod: &Pod) -> Option<&'static str> {
    let spec = pod.spec.as_ref()?;
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
    {
        return Some("a static pod's mirror");
    }
    if spec.host_network == Some(true) {
        return Some("in the host's network namespace");
    }
    if spec
        .service_account_name
        .as_deref()
        .unwrap_or("")
        .is_empty()
    {
        return Some("without a ServiceAccount");
    }
    None
}

pub(crate) fn workload_of(
    cluster: &ClusterState,
    policies: &policy::AuthorizationPolicies,
    uid: &str,
    pod: &Pod,
    trust_domain: &str,
) -> Option<MeshWorkload> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase == "Succeeded" || phase == "Failed" {
        return None;
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let reason = if namespace == policies.mesh_namespace {
        // The control plane's own identities are never a workload's.
        Some("in the control plane's namespace")
    } else {
        no_identity_reason(pod)
    };
    if let Some(reason) = reason {
        tracing::debug!(
            pod = uid,
            reason,
            "pod left out of the mesh: it gets no identity"
        );
        return None;
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let service_account = spec.service_account_name.clone().unwrap_or_default();
    let identity = match Identity::new(trust_domain, &namespace, &service_account) {
        Ok(identity) => identity,
        Err(error) => {
            tracing::warn!(pod = uid, %error, "pod left out of the mesh: no valid identity");
            return None;
        }
    };

    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|s| s.pod_ip.clone())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());

    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let namespace_meshed = cluster
        .namespaces
        .get(&namespace)
        .and_then(|ns| ns.metadata.labels.as_ref())
        .and_then(|labels| labels.get(MESH_LABEL))
        .is_some_and(|value| value == "enabled");
    let meshed = match labels.get(MESH_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => namespace_meshed,
    };

    let has_ip = !ips.is_empty();
    let workload_name = workload_name(pod, &name, &labels);
    let applicable = policies.applying_to(cluster, &namespace, &labels);
    let (mtls_mode, mtls_policy) =
        policy::mtls_mode_of(cluster, &policies.mesh_namespace, &namespace, &labels);
    Some(MeshWorkload {
        workload: pb::Workload {
            workload_name,
            uid: uid.to_owned(),
            namespace,
            name,
            service_account,
            identity: identity.to_string(),
            node,
            ips,
            meshed,
            labels: labels.into_iter().collect(),
            authorization_policies: applicable.keys,
            invalid_authorization_policies: applicable.invalid,
            quarantine: String::new(),
            probe_ports: probe_ports(spec),
            pod_uid: runtime_uid(pod),
            mtls_mode: mtls_mode as i32,
            mtls_policy,
        },
        identity,
        has_ip,
    })
}

/// The UID the container runtime knows the pod by: a static pod's is the
/// kubelet's own (the mirror pod the API server holds names it in an
/// annotation), any other pod's its `metadata.uid`.
fn runtime_uid(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get("kubernetes.io/config.mirror"))
        .or(pod.metadata.uid.as_ref())
        .cloned()
        .unwrap_or_default()
}

/// The TCP ports the kubelet itself connects to in `spec`: every
/// container's (init containers' too: restartable ones have probes)
/// liveness, readiness and startup probes over HTTP, TCP or gRPC, and its
/// postStart and preStop hooks over HTTP or TCP, a named port resolved
/// among the container's ports. A name that matches no port is left out
/// (the kubelet cannot reach it either).
fn probe_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<u32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut ports = std::collections::BTreeSet::new();
    for container in containers {
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        let mut targets: Vec<Option<&IntOrString>> = Vec::new();
        let mut numbers: Vec<i32> = Vec::new();
        for probe in probes.into_iter().flatten() {
            targets.push(probe.http_get.as_ref().map(|http| &http.port));
            targets.push(probe.tcp_socket.as_ref().map(|tcp| &tcp.port));
            numbers.extend(probe.grpc.as_ref().map(|grpc| grpc.port));
        }
        let lifecycle = container.lifecycle.as_ref();
        let hooks = [
            lifecycle.and_then(|l| l.post_start.as_ref()),
            lifecycle.and_then(|l| l.pre_stop.as_ref()),
        ];
        for hook in hooks.into_iter().flatten() {
            targets.push(hook.http_get.as_ref().map(|http| &http.port));
            targets.push(hook.tcp_socket.as_ref().map(|tcp| &tcp.port));
        }
        for target in targets.into_iter().flatten() {
            let number = match target {
                IntOrString::Int(number) => Some(*number),
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port),
            };
            numbers.extend(number);
        }
        ports.extend(
            numbers
                .into_iter()
                .filter_map(|n| u32::try_from(n).ok())
                .filter(|n| (1..=65535).contains(n)),
        );
    }
    ports.into_iter().collect()
}

/// The name of the workload a pod belongs to, for metrics: one name for all
/// replicas, stable across rollouts (so metric series do not grow with every
/// new pod), as Istio derives it.
fn workload_name(pod: &Pod, pod_name: &str, labels: &BTreeMap<String, String>) -> String {
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true));
    if let Some(owner) = controller {
        return match (owner.kind.as_str(), labels.get("pod-template-hash")) {
            // A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
            ("ReplicaSet", Some(hash)) => owner
                .name
                .strip_suffix(&format!("-{hash}"))
                .unwrap_or(&owner.name)
                .to_owned(),
            _ => owner.name.clone(),
        };
    }
    labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .cloned()
        .unwrap_or_else(|| pod_name.to_owned())
}

pub(crate) fn service_of(cluster: &ClusterState, service: &Service) -> pb::Service {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let spec = service.spec.as_ref();
    let mut vips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if let Some(ip) = spec.and_then(|s| s.cluster_ip.clone())
        && !vips.contains(&ip)
    {
        vips.insert(0, ip);
    }
    vips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());

    let slices: Vec<_> = in_namespace(&cluster.endpoint_slices, &namespace)
        .map(|(_, slice)| slice)
        .filter(|slice| {
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|svc| svc == &name)
        })
        .collect();

    // Each endpoint with whether it is still serving while it terminates.
    let mut endpoints: Vec<(pb::Endpoint, bool)> = Vec::new();
    for slice in &slices {
        let ports: BTreeMap<String, u32> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), port_number(p.port?)?)))
            .collect();
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            // Unset means ready, per the EndpointSlice API.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let workload_uid = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .map(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(&namespace);
                    format!("{ns}/{}", r.name.as_deref().unwrap_or(""))
                })
                .unwrap_or_default();
            // A pod being deleted takes no new connections from the moment
            // the control plane sees its deletion, which may come before
            // the EndpointSlice says so: its containers are told to stop
            // at the same time.
            let deleting = cluster
                .pods
                .get(&workload_uid)
                .is_some_and(|pod| pod.metadata.deletion_timestamp.is_some());
            for ip in &endpoint.addresses {
                if ip.parse::<std::net::IpAddr>().is_ok() {
                    let wire = pb::Endpoint {
                        workload_uid: workload_uid.clone(),
                        ip: ip.clone(),
                        ready: ready && !deleting,
                        ports: ports.clone().into_iter().collect(),
                    };
                    endpoints.push((wire, serving));
                }
            }
        }
    }
    // As kube-proxy does: when no endpoint is ready but some still serve
    // while terminating (every pod of the Service is being replaced at
    // once), new connections go to those rather than nowhere.
    if !endpoints.iter().any(|(endpoint, _)| endpoint.ready) {
        for (endpoint, serving) in &mut endpoints {
            endpoint.ready = *serving;
        }
    }
    let mut endpoints: Vec<pb::Endpoint> = endpoints.into_iter().map(|(e, _)| e).collect();
    endpoints.sort_by(|a, b| (&a.ip, &a.workload_uid).cmp(&(&b.ip, &b.workload_uid)));

    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|port| {
            let service_port = port_number(port.port)?;
            let port_name = port.name.clone().unwrap_or_default();
            let from_slice = slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|p| p.name.as_deref().unwrap_or("") == port_name)
                .and_then(|p| port_number(p.port?));
            let target_port = match (&port.target_port, from_slice) {
                (_, Some(resolved)) => resolved,
                (Some(IntOrString::Int(n)), None) => port_number(*n).unwrap_or(0),
                (Some(IntOrString::String(_)), None) => 0,
                (None, None) => service_port,
            };
            Some(pb::ServicePort {
                name: port_name,
                port: service_port,
                target_port,
            })
        })
        .collect();

    let traffic_policy = crate::traffic::traffic_policy_of(cluster, &namespace, &name);
    pb::Service {
        namespace,
        name,
        vips,
        ports,
        endpoints,
        traffic_policy,
    }
}

fn port_number(port: i32) -> Option<u32> {
    u32::try_from(port).ok().filter(|p| (1..=65535).contains(p))
}
