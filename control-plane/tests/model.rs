//! From manifests to each node's view: parsing, the mesh model, and deltas.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::path::Path;

use common::{mesh_of, trust, write};
use weft_control_plane::manifests::ManifestDir;
use weft_control_plane::mesh::Mesh;
use weft_control_plane::view::NodeView;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: node-2, serviceAccountName: db, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-1, namespace: shop, labels: {weft.dev/mesh: disabled}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: done-1, namespace: shop}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: db}
  ports: [{name: sql, port: 5432, targetPort: postgres}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-abc, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.2.2]
  conditions: {ready: true}
  nodeName: node-2
  targetRef: {kind: Pod, name: db-1, namespace: shop}
ports: [{name: sql, port: 15432, protocol: TCP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored, namespace: shop}
"#;

#[test]
fn pods_become_workloads_with_identity_node_and_mesh_membership() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    let (mesh, source) = mesh_of(dir.path());
    assert!(source.problems().is_empty(), "{:?}", source.problems());

    let web = &mesh.workloads["shop/web-1"];
    assert_eq!(
        web.workload.identity,
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(web.workload.node, "node-1");
    assert_eq!(web.workload.ips, vec!["10.244.1.2"]);
    assert!(web.workload.meshed && web.has_ip);
    assert_eq!(
        web.workload.labels.get("app").map(String::as_str),
        Some("web")
    );

    assert!(
        !mesh.workloads["shop/batch-1"].workload.meshed,
        "pod label opts out"
    );
    assert_eq!(
        mesh.workloads["shop/batch-1"].workload.service_account, "default",
        "no serviceAccountName means the default ServiceAccount"
    );
    assert!(
        !mesh.workloads["legacy/old-1"].workload.meshed,
        "unlabelled namespace"
    );
    assert!(
        !mesh.workloads.contains_key("shop/done-1"),
        "finished pods are gone"
    );
}

#[test]
fn services_carry_vips_resolved_ports_and_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    let (mesh, _) = mesh_of(dir.path());

    let db = &mesh.services["shop/db"];
    assert_eq!(db.vips, vec!["10.96.0.10"]);
    assert_eq!(db.ports.len(), 1);
    assert_eq!(
        (db.ports[0].port, db.ports[0].target_port),
        (5432, 15432),
        "named targetPort resolved by the slice"
    );
    assert_eq!(db.endpoints.len(), 1);
    assert_eq!(db.endpoints[0].ip, "10.244.2.2");
    assert_eq!(db.endpoints[0].workload_uid, "shop/db-1");
    assert!(db.endpoints[0].ready);
    assert_eq!(db.endpoints[0].ports.get("sql"), Some(&15432));
}

#[test]
fn the_ca_condition_needs_a_meshed_pod_with_an_ip_on_that_node() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    let (mesh, _) = mesh_of(dir.path());
    let web = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let default = "spiffe://cluster.local/ns/shop/sa/default".parse().unwrap();
    let legacy = "spiffe://cluster.local/ns/legacy/sa/default"
        .parse()
        .unwrap();

    assert!(mesh.node_runs("node-1", &web));
    assert!(!mesh.node_runs("node-2", &web), "web runs on node-1 only");
    assert!(!mesh.node_runs("node-1", &default), "batch-1 is not meshed");
    assert!(!mesh.node_runs("node-2", &legacy), "legacy is not meshed");
}

#[test]
fn the_ca_signs_for_a_pending_pod_once_it_has_an_ip() {
    // Init containers run while the pod is Pending; their connections must
    // be meshed, so the identity is signed as soon as the pod has an IP.
    let dir = tempfile::tempdir().unwrap();
    let pod = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{weft.dev/mesh: enabled}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: init-1, namespace: shop}}\n\
             spec: {{nodeName: node-1, serviceAccountName: init, containers: [{{name: c, image: x}}]}}\n\
             status: {{phase: Pending{ip}}}\n"
        )
    };
    let init = "spiffe://cluster.local/ns/shop/sa/init".parse().unwrap();

    write(dir.path(), "cluster.yaml", &pod(""));
    let (mesh, _) = mesh_of(dir.path());
    assert!(
        !mesh.node_runs("node-1", &init),
        "scheduled but without an IP: nothing can connect yet"
    );

    write(dir.path(), "cluster.yaml", &pod(", podIP: 10.244.1.40"));
    let (mesh, _) = mesh_of(dir.path());
    assert!(
        mesh.node_runs("node-1", &init),
        "Pending with an IP: signed"
    );
    assert!(!mesh.node_runs("node-2", &init), "only for its own node");
}

#[test]
fn each_node_sees_its_own_pods_in_full_and_others_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    let (mesh, _) = mesh_of(dir.path());

    let node1 = NodeView::of(&mesh, "node-1").unwrap();
    let node2 = NodeView::of(&mesh, "node-2").unwrap();
    assert_eq!(
        node1.local.keys().collect::<Vec<_>>(),
        ["shop/batch-1", "shop/web-1"]
    );
    assert_eq!(
        node2.local.keys().collect::<Vec<_>>(),
        ["legacy/old-1", "shop/db-1"]
    );
    assert!(node1.remote.contains_key("shop/db-1"));
    assert!(node1.remote["shop/db-1"].labels.is_empty());
    assert!(!node1.local["shop/web-1"].labels.is_empty());
    assert_eq!(node1.services.len(), 1);

    let full = node1.full_update(1);
    assert!(full.full_state);
    assert_eq!(full.local_workloads.len(), 2);
    assert_eq!(full.trust, Some(trust()));
}

#[test]
fn a_change_to_one_pod_reaches_only_the_nodes_that_see_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    let (before, _) = mesh_of(dir.path());

    // A label change on web-1 matters to node-1 (policy) but not to node-2.
    write(
        dir.path(),
        "cluster.yaml",
        &CLUSTER.replace("labels: {app: web}", "labels: {app: web, tier: front}"),
    );
    let (after, _) = mesh_of(dir.path());
    let delta1 = NodeView::of(&before, "node-1")
        .unwrap()
        .delta_to(&NodeView::of(&after, "node-1").unwrap(), 2)
        .unwrap();
    assert!(!delta1.full_state);
    assert_eq!(delta1.local_workloads.len(), 1);
    assert_eq!(delta1.local_workloads[0].uid, "shop/web-1");
    assert!(
        delta1.remote_workloads.is_empty() && delta1.services.is_empty() && delta1.trust.is_none()
    );
    assert_eq!(
        NodeView::of(&before, "node-2")
            .unwrap()
            .delta_to(&NodeView::of(&after, "node-2").unwrap(), 2),
        None
    );

    // A new IP for web-1 reaches node-2 as a remote change.
    write(
        dir.path(),
        "cluster.yaml",
        &CLUSTER.replace("10.244.1.2", "10.244.1.9"),
    );
    let (moved, _) = mesh_of(dir.path());
    let delta2 = NodeView::of(&before, "node-2")
        .unwrap()
        .delta_to(&NodeView::of(&moved, "node-2").unwrap(), 2)
        .unwrap();
    assert_eq!(delta2.remote_workloads.len(), 1);
    assert_eq!(delta2.remote_workloads[0].ips, vec!["10.244.1.9"]);
    assert!(delta2.local_workloads.is_empty());

    // Deleting it is a removal for both.
    let without_web = CLUSTER.replace("name: web-1", "name: web-2");
    write(dir.path(), "cluster.yaml", &without_web);
    let (renamed, _) = mesh_of(dir.path());
    let delta = NodeView::of(&before, "node-1")
        .unwrap()
        .delta_to(&NodeView::of(&renamed, "node-1").unwrap(), 2)
        .unwrap();
    assert_eq!(delta.removed_local_workloads, vec!["shop/web-1"]);
    assert_eq!(delta.local_workloads[0].uid, "shop/web-2");
    let delta = NodeView::of(&before, "node-2")
        .unwrap()
        .delta_to(&NodeView::of(&renamed, "node-2").unwrap(), 2)
        .unwrap();
    assert_eq!(delta.removed_remote_workloads, vec!["shop/web-1"]);
}

#[test]
fn a_broken_file_is_reported_and_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", CLUSTER);
    write(
        dir.path(),
        "extra.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop}\nspec: {nodeName: node-1, serviceAccountName: web, containers: []}\nstatus: {phase: Running, podIP: 10.244.1.7}\n",
    );
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();
    assert!(
        Mesh::derive(&source.state(), trust(), "weft-system")
            .workloads
            .contains_key("shop/extra")
    );

    // Document 1 of extra.yaml is not a valid Pod; the file keeps its old objects.
    write(
        dir.path(),
        "extra.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop}\nspec: {nodeName: node-1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nspec: {nodeName: [not, a, string]}\n",
    );
    source.reload().unwrap();
    let problems = source.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].file.ends_with("extra.yaml"));
    assert_eq!(problems[0].document, Some(1));
    let message = problems[0].to_string();
    assert!(
        message.contains("extra.yaml document 1") && message.contains("Pod"),
        "{message}"
    );
    let mesh = Mesh::derive(&source.state(), trust(), "weft-system");
    assert_eq!(
        mesh.workloads["shop/extra"].workload.ips,
        vec!["10.244.1.7"],
        "last good state"
    );
    assert!(
        mesh.workloads.contains_key("shop/web-1"),
        "other files are untouched"
    );

    // Invalid YAML, a document without kind, and a Pod without a name.
    for bad in [
        "a: [unclosed",
        "apiVersion: v1\nmetadata: {name: x}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {namespace: shop}\n",
    ] {
        write(dir.path(), "extra.yaml", bad);
        source.reload().unwrap();
        assert_eq!(source.problems().len(), 1, "{bad}");
        assert!(
            Mesh::derive(&source.state(), trust(), "weft-system")
                .workloads
                .contains_key("shop/extra"),
            "{bad}"
        );
    }

    // Fixing the file clears the problem; removing it removes its objects.
    std::fs::remove_file(dir.path().join("extra.yaml")).unwrap();
    source.reload().unwrap();
    assert!(source.problems().is_empty());
    assert!(
        !Mesh::derive(&source.state(), trust(), "weft-system")
            .workloads
            .contains_key("shop/extra")
    );
}

#[test]
fn unreadable_directory_is_an_error() {
    let mut source = ManifestDir::new(Path::new("/nonexistent/weft/manifests"));
    let err = source.reload().unwrap_err().to_string();
    assert!(err.contains("/nonexistent/weft/manifests"), "{err}");
}

#[test]
fn pods_are_named_by_the_workload_they_belong_to() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "owned.yaml",
        &format!(
            "{CLUSTER}---
apiVersion: v1
kind: Pod
metadata:
  name: api-7d9f8c6b5-x2x4z
  namespace: shop
  labels: {{pod-template-hash: 7d9f8c6b5}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: api-7d9f8c6b5, uid: u1, controller: true}}]
spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 10.244.1.8}}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  ownerReferences: [{{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u2, controller: true}}]
spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 10.244.1.9}}
"
        ),
    );
    let (mesh, source) = mesh_of(dir.path());
    assert!(source.problems().is_empty(), "{:?}", source.problems());
    let name = |uid: &str| mesh.workloads[uid].workload.workload_name.clone();
    assert_eq!(
        name("shop/api-7d9f8c6b5-x2x4z"),
        "api",
        "Deployment, through its ReplicaSet"
    );
    assert_eq!(name("shop/db-0"), "db", "StatefulSet");
    assert_eq!(name("shop/web-1"), "web", "the app label");
    assert_eq!(
        name("shop/batch-1"),
        "batch-1",
        "nothing better than the pod's name"
    );
}

/// Demo applications' YAML (bookinfo, Online Boutique, httpbin) is written
/// for `kubectl apply -n <namespace>`: no `metadata.namespace`, pods
/// without a ServiceAccount, and kinds weft does not use.
const DEMO: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, labels: {app: httpbin}}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 8000, targetPort: 8080}]
  selector: {app: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin}
spec: {replicas: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-1, labels: {app: httpbin}}
spec: {nodeName: node-1, serviceAccountName: httpbin, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: curl-1}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.21}
"#;

#[test]
fn demo_yaml_without_namespaces_is_read_as_kubectl_would() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "httpbin.yaml", DEMO);
    let (mesh, source) = mesh_of(dir.path());
    assert!(source.problems().is_empty(), "{:?}", source.problems());
    let state = source.state();
    assert!(state.service_accounts.contains_key("default/httpbin"));
    assert!(mesh.services.contains_key("default/httpbin"));
    assert_eq!(
        mesh.workloads["default/httpbin-1"].workload.identity,
        "spiffe://cluster.local/ns/default/sa/httpbin"
    );
    // The ServiceAccount admission plugin's default.
    assert_eq!(
        mesh.workloads["default/curl-1"].workload.identity,
        "spiffe://cluster.local/ns/default/sa/default"
    );
    // The Deployment is not dropped without a word.
    let notes: Vec<String> = source.notes().iter().map(ToString::to_string).collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].ends_with(
            "httpbin.yaml document 2: ignored: weft does not use kind apps/v1/Deployment"
        ),
        "{notes:?}"
    );
}

#[test]
fn pods_that_cannot_prove_an_identity_are_left_out_and_shared_ips_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let pod = |name: &str, extra_meta: &str, spec: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop{extra_meta}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: x}}]{spec}}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
        )
    };
    let yaml = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n"
            .to_owned(),
        // A static pod's mirror: the node wrote its spec, no SA admission.
        pod(
            "mirror",
            ", annotations: {kubernetes.io/config.mirror: abc}",
            "",
            "10.244.1.30",
        ),
        pod(
            "mirror-sa",
            ", annotations: {kubernetes.io/config.mirror: abc}",
            ", serviceAccountName: web",
            "10.244.1.31",
        ),
        pod("host", "", ", hostNetwork: true, serviceAccountName: web", "192.168.0.1"),
        pod("a", "", ", serviceAccountName: web", "10.244.1.40"),
        pod("b", "", ", serviceAccountName: db", "10.244.1.40"),
        pod("ok", "", ", serviceAccountName: web", "10.244.1.41"),
    ]
    .concat();
    write(dir.path(), "pods.yaml", &yaml);
    let (mesh, source) = mesh_of(dir.path());
    assert!(source.problems().is_empty(), "{:?}", source.problems());
    let uids: Vec<&str> = mesh.workloads.keys().map(String::as_str).collect();
    assert_eq!(uids, ["shop/a", "shop/b", "shop/ok"]);
    // Both claimants keep the address (still captured) and are quarantined.
    for uid in ["shop/a", "shop/b"] {
        let workload = &mesh.workloads[uid].workload;
        assert_eq!(workload.ips, ["10.244.1.40"]);
        assert_eq!(
            workload.quarantine,
            "IP 10.244.1.40 is claimed by pods shop/a, shop/b"
        );
    }
    assert_eq!(mesh.workloads["shop/ok"].workload.ips, ["10.244.1.41"]);
    assert_eq!(mesh.workloads["shop/ok"].workload.quarantine, "");
    let web = weft_certs::Identity::new("cluster.local", "shop", "web").unwrap();
    assert!(!mesh.node_runs(
        "node-1",
        &weft_certs::Identity::new("cluster.local", "shop", "default").unwrap()
    ));
    assert!(mesh.node_runs("node-1", &web));
}

#[test]
fn the_control_planes_namespace_holds_mesh_wide_policies_and_no_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh-ops, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: sneaky, namespace: mesh-ops}
spec: {nodeName: node-1, serviceAccountName: weft-control-plane, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.3}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: everywhere, namespace: mesh-ops}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: not-everywhere, namespace: weft-system}
spec: {action: AUDIT, rules: [{}]}
"#;
    write(dir.path(), "cluster.yaml", yaml);
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();
    let mesh = Mesh::derive(&source.state(), trust(), "mesh-ops");
    assert_eq!(
        mesh.workloads["shop/web-1"].workload.authorization_policies,
        ["mesh-ops/everywhere"]
    );
    // No workload in the control plane's namespace: its identities are
    // never signed for a workload.
    assert!(!mesh.workloads.contains_key("mesh-ops/sneaky"));
    let control_plane =
        weft_certs::Identity::new("cluster.local", "mesh-ops", "weft-control-plane").unwrap();
    assert!(!mesh.node_runs("node-1", &control_plane));
}

#[test]
fn a_weft_object_the_api_server_would_refuse_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "traffic.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: tp, namespace: shop}\nspec: {service: db, retries: {attempts: 6}}\n",
    );
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();
    let problems: Vec<String> = source.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(
            "TrafficPolicy shop/tp: spec.retries.attempts: Invalid value: 6: \
             spec.retries.attempts in body should be less than or equal to 5"
        ),
        "{problems:?}"
    );
    assert!(source.state().traffic_policies.is_empty());
}
