//! Which endpoints of a Service take new connections while its pods come
//! and go (a rolling update): the model's reading of pods being deleted and
//! of EndpointSlice conditions.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use common::{mesh_of, write};

#[test]
fn endpoints_of_pods_being_deleted_take_no_new_connections_unless_nothing_else_serves() {
    let dir = tempfile::tempdir().unwrap();
    let pod = |name: &str, ip: &str, deleting: bool| {
        let deletion = if deleting {
            ", deletionTimestamp: \"2026-12-01T00:00:00Z\""
        } else {
            ""
        };
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: api}}{deletion}}}
spec: {{nodeName: node-2, serviceAccountName: api, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {ip}}}
---
"
        )
    };
    let service = |name: &str, endpoints: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{clusterIP: 10.96.0.{n}, selector: {{app: api}}, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{port: 80, protocol: TCP}}]
---
",
            n = name.len()
        )
    };
    let endpoint = |pod: &str, ip: &str, conditions: &str| {
        format!(
            "- addresses: [{ip}]
  conditions: {conditions}
  targetRef: {{kind: Pod, name: {pod}, namespace: shop}}
"
        )
    };
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n---\n",
    );
    yaml += &pod("api-old", "10.244.2.10", true);
    yaml += &pod("api-new", "10.244.2.11", false);
    yaml += &pod("solo-old", "10.244.2.12", true);
    // The slice still says ready: its controller has not caught up.
    yaml += &service(
        "api",
        &(endpoint("api-old", "10.244.2.10", "{ready: true}")
            + &endpoint("api-new", "10.244.2.11", "{ready: true}")),
    );
    // The only pod is terminating and still serving.
    yaml += &service(
        "solo",
        &endpoint(
            "solo-old",
            "10.244.2.12",
            "{ready: false, serving: true, terminating: true}",
        ),
    );
    write(dir.path(), "cluster.yaml", &yaml);
    let (mesh, source) = mesh_of(dir.path());
    assert!(source.problems().is_empty(), "{:?}", source.problems());

    let ready = |service: &str| -> Vec<(String, bool)> {
        mesh.services[service]
            .endpoints
            .iter()
            .map(|e| (e.ip.clone(), e.ready))
            .collect()
    };
    assert_eq!(
        ready("shop/api"),
        vec![
            ("10.244.2.10".to_owned(), false),
            ("10.244.2.11".to_owned(), true)
        ]
    );
    assert_eq!(ready("shop/solo"), vec![("10.244.2.12".to_owned(), true)]);
}
