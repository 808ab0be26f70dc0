//! The ports the kubelet itself connects to, found in a pod's spec: the
//! node reaches them uncaptured (see the proxy's `capture::node_source`).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::Path;

use weft_api::v1 as pb;
use weft_control_plane::manifests::ManifestDir;
use weft_control_plane::mesh::Mesh;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn mesh_of(dir: &Path) -> (Mesh, ManifestDir) {
    let mut source = ManifestDir::new(dir);
    source.reload().unwrap();
    let trust = pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: "roots".into(),
    };
    (Mesh::derive(&source.state(), trust, "weft-system"), source)
}

#[test]
fn the_ports_the_kubelet_probes_go_with_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "cluster.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n",
    );
    write(
        dir.path(),
        "probed.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: web
  initContainers:
  - name: proxy
    image: x
    restartPolicy: Always
    startupProbe: {tcpSocket: {port: 9901}}
  containers:
  - name: app
    image: x
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9000}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
    livenessProbe: {httpGet: {path: /live, port: 8081}}
  - name: rpc
    image: x
    lifecycle:
      postStart: {httpGet: {path: /warm, port: 7070}}
      preStop: {tcpSocket: {port: 7071}}
    livenessProbe: {grpc: {port: 50051}}
    readinessProbe: {exec: {command: ["true"]}}
    startupProbe: {httpGet: {path: /, port: missing}}
status: {phase: Pending, podIP: 10.244.1.9}
"#,
    );
    let (mesh, _) = mesh_of(dir.path());
    assert_eq!(
        mesh.workloads["shop/api-1"].workload.probe_ports,
        [7070, 7071, 8080, 8081, 9901, 50051]
    );
}
