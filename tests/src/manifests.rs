//! The testbed as Kubernetes objects: what a control plane reading a manifests
//! directory (or an API server) would see for the cluster the testbed built.
//!
//! Objects are built as JSON values and rendered to multi-document YAML, in the order
//! Namespaces, ServiceAccounts, Pods, Services, EndpointSlices.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::topology::{Pod, Service, Topology};

/// Label that puts a namespace in the mesh, or takes a pod out of it.
pub const MESH_LABEL: &str = "weft.dev/mesh";

/// Every object, in apply order.
pub(crate) fn objects(topology: &Topology) -> Vec<Value> {
    let meshed_namespaces: BTreeSet<&str> = topology
        .pods
        .iter()
        .filter(|p| p.meshed)
        .map(|p| p.namespace.as_str())
        .collect();
    let namespaces: BTreeSet<&str> = topology
        .pods
        .iter()
        .map(|p| p.namespace.as_str())
        .chain(topology.services.iter().map(|s| s.namespace.as_str()))
        .collect();
    let service_accounts: BTreeSet<(&str, &str)> = topology
        .pods
        .iter()
        .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
        .collect();

    let mut objects = Vec::new();
    for ns in &namespaces {
        objects.push(namespace(ns, meshed_namespaces.contains(ns)));
    }
    for (ns, name) in &service_accounts {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": name, "namespace": ns },
        }));
    }
    for pod in &topology.pods {
        objects.push(pod_object(
            topology,
            pod,
            meshed_namespaces.contains(pod.namespace.as_str()),
        ));
    }
    for service in &topology.services {
        objects.push(service_object(service));
    }
    for service in topology.services.iter().filter(|s| !s.selector.is_empty()) {
        objects.push(endpoint_slice(topology, service));
    }
    objects
}

/// All objects as one multi-document YAML string.
pub(crate) fn render(topology: &Topology) -> Result<String> {
    serde_saphyr::to_string_multiple(&objects(topology)).context("rendering manifests as YAML")
}

fn namespace(name: &str, meshed: bool) -> Value {
    let mut metadata = json!({ "name": name });
    if meshed {
        metadata["labels"] = json!({ MESH_LABEL: "enabled" });
    }
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": metadata })
}

fn pod_object(topology: &Topology, pod: &Pod, namespace_meshed: bool) -> Value {
    let node = &topology.nodes[pod.node];
    let mut labels: BTreeMap<&str, &str> = pod
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if namespace_meshed && !pod.meshed {
        labels.insert(MESH_LABEL, "disabled");
    }
    let mut ips = Vec::new();
    if topology.ip_families.v4() {
        ips.push(pod.ip.to_string());
    }
    if topology.ip_families.v6() {
        ips.push(pod.ip6.to_string());
    }
    let ip = ips.first().cloned().unwrap_or_default();
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    // One container per probed port, each with its TCP readiness probe.
    let mut containers: Vec<Value> = pod
        .probe_ports
        .iter()
        .map(|port| {
            json!({
                "name": format!("app-{port}"),
                "image": "weft-testbed/workload:latest",
                "readinessProbe": { "tcpSocket": { "port": port } },
            })
        })
        .collect();
    if containers.is_empty() {
        containers.push(json!({ "name": "app", "image": "weft-testbed/workload:latest" }));
    }
    let host_ip = node.ip.to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod_uid(&pod.namespace, &pod.name),
            "labels": labels,
        },
        "spec": {
            "nodeName": node.name,
            "serviceAccountName": pod.service_account,
            "containers": containers,
        },
        "status": {
            "phase": "Running",
            "conditions": [{ "type": "Ready", "status": "True" }],
            "hostIP": host_ip,
            "hostIPs": [{ "ip": host_ip }],
            "podIP": ip,
            "podIPs": pod_ips,
        },
    })
}

fn service_object(service: &Service) -> Value {
    let vip = service.vip.to_string();
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": vip,
        "clusterIPs": [vip],
        "ipFamilies": ["IPv4"],
        "ports": [{
            "protocol": "TCP",
            "port": service.port,
            "targetPort": service.target_port,
        }],
    });
    if !service.selector.is_empty() {
        spec["selector"] = json!(service.selector);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": service.name, "namespace": service.namespace },
        "spec": spec,
    })
}

fn endpoint_slice(topology: &Topology, service: &Service) -> Value {
    let endpoints: Vec<Value> = topology
        .pods
        .iter()
        .filter(|pod| service.selects(pod))
        .map(|pod| {
            json!({
                "addresses": [pod.ip.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": topology.nodes[pod.node].name,
                "targetRef": { "kind": "Pod", "namespace": pod.namespace, "name": pod.name },
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-testbed", service.name),
            "namespace": service.namespace,
            "labels": {
                "kubernetes.io/service-name": service.name,
                "endpointslice.kubernetes.io/managed-by": "weft-testbed",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "", "protocol": "TCP", "port": service.target_port }],
    })
}

/// The `metadata.uid` the testbed gives pod `namespace/name` (the API
/// server would make one up; the testbed's runtime announces the same).
pub fn pod_uid(namespace: &str, name: &str) -> String {
    format!("testbed-{namespace}-{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{PodSpec, ServiceSpec};

    #[test]
    fn mesh_labels_follow_the_pods() {
        let nodes = ["node-1".to_owned()];
        let pods = [
            PodSpec {
                node: "node-1",
                name: "in",
                ..PodSpec::default()
            },
            PodSpec {
                node: "node-1",
                name: "out",
                meshed: false,
                ..PodSpec::default()
            },
            PodSpec {
                node: "node-1",
                namespace: "legacy",
                name: "old",
                meshed: false,
                ..PodSpec::default()
            },
        ];
        let services = [ServiceSpec {
            namespace: "default",
            name: "svc",
            port: 80,
            target_port: 8080,
            selector: &[],
        }];
        let topology = Topology::plan(
            "wft1x0",
            &nodes,
            &crate::topology::tests::decls(pods),
            &[services[0].into()],
        )
        .unwrap();
        let objects = objects(&topology);
        let find = |kind: &str, name: &str| {
            objects
                .iter()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(
            find("Namespace", "default")["metadata"]["labels"][MESH_LABEL],
            "enabled"
        );
        assert!(find("Namespace", "legacy")["metadata"]["labels"].is_null());
        assert!(find("Pod", "in")["metadata"]["labels"][MESH_LABEL].is_null());
        assert_eq!(
            find("Pod", "out")["metadata"]["labels"][MESH_LABEL],
            "disabled"
        );
        assert!(find("Pod", "old")["metadata"]["labels"][MESH_LABEL].is_null());
        // No selector: no EndpointSlice, as in Kubernetes.
        assert!(!objects.iter().any(|o| o["kind"] == "EndpointSlice"));
    }
}
