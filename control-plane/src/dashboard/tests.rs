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
        peers: Default::default(),
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

/// A replica on loopback that answers every GET with `nodes` or `traffic`
/// by path, and records the paths asked.
async fn peer_replica(
    nodes: Value,
    traffic: Value,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0; 4096];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            let path = request.split(' ').nth(1).unwrap_or("").to_owned();
            let body = if path.starts_with("/api/nodes") {
                nodes.to_string()
            } else {
                traffic.to_string()
            };
            seen.lock().unwrap().push(path);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (address, asked)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_merge_what_the_other_replicas_hold() {
    // node-2's proxy holds its stream on the other replica, and reported
    // a refused connection there.
    let (other, asked) = peer_replica(
        json!([{"name": "node-2", "connected": true, "up_to_date": true, "pods": 1,
                "certificates": [], "last_nack": null}]),
        json!({"total": 1, "left_out": 0, "edges": [{
            "source": "shop/evil", "destination": "shop/db", "source_principal": "",
            "service": "", "security": "mutual_tls", "reported_by": "destination",
            "opened": 4, "closed": 4, "bytes_received": 0, "bytes_sent": 0,
            "denied": {"shop/db-from-web": 4}, "audited": {}}]}),
    )
    .await;
    let mut dashboard = dashboard();
    dashboard.nodes.connected("node-1", "0.1.0", 4);
    dashboard.peers = Peers {
        fixed: vec![other, "127.0.0.1:1".parse().unwrap()],
        timeout: Duration::from_secs(5),
        ..Peers::default()
    };
    let dashboard = Arc::new(dashboard);
    let pages = dashboard.clone();
    let (nodes, traffic, overview, own) = tokio::task::spawn_blocking(move || {
        (
            get(&pages, "/api/nodes", None).1,
            get(&pages, "/api/traffic", Some("namespace=shop")).1,
            get(&pages, "/api/overview", None).1,
            get(&pages, "/api/nodes", Some("own=1")).1,
        )
    })
    .await
    .unwrap();
    let connected: Vec<(&str, bool)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["connected"] == true))
        .collect();
    assert_eq!(connected, [("node-1", true), ("node-2", true)]);
    assert_eq!(traffic["edges"][0]["denied"]["shop/db-from-web"], 4);
    assert_eq!(traffic["replicas"]["asked"], 2);
    assert_eq!(overview["nodes"]["connected"], 2);
    assert_eq!(overview["traffic"]["denied"], 4);
    // The replica that is not there is named, not waited for forever.
    let unanswered = overview["replicas"]["unanswered"].as_array().unwrap();
    assert!(
        unanswered.len() == 1 && unanswered[0].as_str().unwrap().starts_with("127.0.0.1:1: "),
        "{overview}"
    );
    // Asked for its own view, a replica asks nobody.
    assert!(
        own.as_array()
            .unwrap()
            .iter()
            .all(|n| n["name"] != "node-2" || n["connected"] == false),
        "{own}"
    );
    let asked = asked.lock().unwrap().clone();
    assert!(!asked.is_empty());
    assert!(asked.iter().all(|path| path.contains("own=1")), "{asked:?}");
    assert!(
        asked.iter().any(|path| path.contains("namespace=shop")),
        "{asked:?}"
    );
}
