#![allow(clippy::unwrap_used)]

use std::time::Duration;

use prometheus_client::registry::Registry;

use super::*;
use crate::mesh::Mesh;
use crate::reported_traffic::TrafficLimits;

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: []}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: node-2, serviceAccountName: db, containers: []}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: {principals: ['spiffe://cluster.local/ns/shop/sa/web']}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {selector: {matchLabels: {app: nothing}}, rules: [{from: {principals: ['']}}]}
";

fn dashboard() -> Dashboard {
    let cluster = ClusterState::from_yaml(CLUSTER);
    let trust = pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: String::new(),
    };
    let mesh = Mesh::derive(&cluster, trust, "weft-system");
    let (_, mesh_rx) = watch::channel(Arc::new(Published::first(mesh)));
    let (_, cluster_rx) = watch::channel(Arc::new(cluster));
    let mut metrics = Registry::default();
    let nodes = NodeRegistry::new(&mut metrics);
    let traffic = Arc::new(ReportedTraffic::new(
        TrafficLimits {
            window: Duration::from_secs(300),
            max_edges: 100,
            max_edges_per_report: 100,
        },
        &mut metrics,
    ));
    Dashboard {
        nodes,
        mesh: mesh_rx,
        cluster: cluster_rx,
        traffic,
        mesh_namespace: "weft-system".into(),
        trust_domain: "cluster.local".into(),
        verdicts: Default::default(),
    }
}

fn get(dashboard: &Dashboard, path: &str, query: Option<&str>) -> (u16, Value) {
    let (status, content_type, body) = dashboard.answer(path, query).unwrap();
    assert_eq!(content_type, "application/json");
    (status, serde_json::from_str(&body).unwrap())
}

#[test]
fn the_page_and_its_assets_are_served_from_the_binary() {
    let dashboard = dashboard();
    for path in [
        "/",
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ] {
        let (status, _, body) = dashboard.answer(path, None).unwrap();
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty());
    }
    let (_, _, page) = dashboard.answer("/", None).unwrap();
    // Nothing is fetched from elsewhere: the page works without internet.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(dashboard.answer("/nothing-here", None).is_none());
}

#[test]
fn nodes_show_their_proxy_its_refusals_and_certificates_and_a_node_without_one() {
    let dashboard = dashboard();
    dashboard.nodes.connected("node-1", "0.1.0", 4);
    dashboard.nodes.sent("node-1", 3);
    dashboard.nodes.nacked("node-1", 3, "bad policy", false);
    dashboard.nodes.reported(
        "node-1",
        &[pb::HeldCertificate {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            not_after: 4_000_000_000,
        }],
    );
    let (_, nodes) = get(&dashboard, "/api/nodes", None);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["name"], "node-1");
    assert_eq!(nodes[0]["connected"], true);
    assert_eq!(nodes[0]["up_to_date"], false);
    assert_eq!(nodes[0]["last_nack"]["reason"], "bad policy");
    assert_eq!(nodes[0]["certificates"][0]["not_after"], 4_000_000_000_i64);
    // node-2 runs a pod and has no proxy: the mesh does not serve it.
    assert_eq!(nodes[1]["name"], "node-2");
    assert_eq!(nodes[1]["connected"], false);
    assert_eq!(nodes[1]["pods"], 1);

    let (_, workloads) = get(&dashboard, "/api/workloads", Some("q=web"));
    assert_eq!(workloads["total"], 1);
    let web = &workloads["workloads"][0];
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(web["certificate"]["not_after"], 4_000_000_000_i64);
    let (_, db) = get(&dashboard, "/api/workloads", Some("namespace=shop&q=db"));
    assert_eq!(db["workloads"][0]["policies"][0], "shop/db-from-web");
    assert_eq!(db["workloads"][0]["mtls"], "PERMISSIVE");
}

#[test]
fn policies_carry_their_conditions() {
    let (_, policies) = get(&dashboard(), "/api/policies", None);
    let typo = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["object"] == "shop/broken")
        .unwrap();
    assert_eq!(typo["kind"], "AuthorizationPolicy");
    assert_eq!(typo["conditions"][0]["type"], "Accepted");
    assert_eq!(typo["conditions"][0]["status"], false);
    assert!(
        typo["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("empty principal pattern")
    );
}

#[test]
fn the_explain_form_answers_as_the_cli_does() {
    let dashboard = dashboard();
    let (status, allowed) = get(
        &dashboard,
        "/api/explain",
        Some("from=shop%2Fweb&to=shop%2Fdb-1%3A5432&plaintext=false"),
    );
    assert_eq!(status, 200);
    assert_eq!(allowed["allowed"], true, "{allowed}");
    let (_, denied) = get(
        &dashboard,
        "/api/explain",
        Some("from=shop/evil&to=shop/db-1:5432"),
    );
    assert_eq!(denied["allowed"], false);
    let cli = crate::explain::explain(
        &dashboard.cluster.borrow(),
        pb::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: String::new(),
        },
        "weft-system",
        &ExplainArgs {
            from: "shop/evil".into(),
            to: "shop/db-1:5432".into(),
            plaintext: false,
            from_ip: [0, 0, 0, 0].into(),
        },
    )
    .unwrap();
    assert_eq!(denied["report"], cli.report);

    for bad in [
        None,
        Some("from=shop/web"),
        Some("from=x&to=nowhere"),
        Some("from=a/b&to=shop/db-1:1&from_ip=ten"),
    ] {
        let (status, answer) = get(&dashboard, "/api/explain", bad);
        assert_eq!(status, 400, "{bad:?}");
        assert!(answer["error"].is_string());
    }
}

#[test]
fn the_overview_counts_what_the_pages_list() {
    let dashboard = dashboard();
    dashboard.nodes.connected("node-1", "0.1.0", 4);
    dashboard.traffic.record(
        "node-2",
        &["shop/db".to_owned()].into(),
        &pb::TrafficReport {
            edges: vec![pb::TrafficEdge {
                reporter: "destination".into(),
                source_workload: "shop/evil".into(),
                destination_workload: "shop/db".into(),
                security: "mutual_tls".into(),
                denied: vec![pb::PolicyCount {
                    policy: "shop/db-from-web".into(),
                    connections: 3,
                }],
                ..pb::TrafficEdge::default()
            }],
            ..pb::TrafficReport::default()
        },
        SystemTime::now(),
    );
    let (_, traffic) = get(&dashboard, "/api/traffic", Some("namespace=shop&limit=5"));
    assert_eq!(traffic["matching"], 1);
    assert_eq!(traffic["edges"][0]["denied"]["shop/db-from-web"], 3);
    let (_, elsewhere) = get(&dashboard, "/api/traffic", Some("namespace=other"));
    assert_eq!(
        (elsewhere["total"].as_u64(), elsewhere["matching"].as_u64()),
        (Some(1), Some(0))
    );
    let (_, overview) = get(&dashboard, "/api/overview", None);
    assert_eq!(overview["nodes"]["known"], 2);
    assert_eq!(overview["nodes"]["connected"], 1);
    assert_eq!(overview["workloads"]["meshed"], 2);
    assert_eq!(overview["traffic"]["denied"], 3);
    assert_eq!(overview["policies"]["not_accepted"], 1);
}
