//! End to end on the testbed: the control plane's dashboard shows what the
//! mesh does. The proxies report their traffic up their config streams; the
//! dashboard's JSON (what its pages draw) must show the test's own
//! connections, a refused one under the policy that refused it, every node
//! with its proxy and certificates, and answer the explain form as the CLI
//! does.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::Duration;

use serde_json::Value;
use weft_testbed::{ALLOW_WEB_TO_DB, Testbed, WeftMesh, wait_until};

fn start() -> (Testbed, WeftMesh, weft_testbed::EchoServer) {
    let testbed = weft_testbed::shop_testbed().unwrap();
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    (testbed, mesh, server)
}

fn api(mesh: &WeftMesh, testbed: &Testbed, path: &str) -> Value {
    let body = mesh.control_plane_page(testbed, path).unwrap();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The edge from a source whose name contains `from` to one whose name
/// contains `to`, if the dashboard shows one.
fn edge(traffic: &Value, from: &str, to: &str) -> Option<Value> {
    traffic["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["source"].as_str().unwrap().contains(from)
                && e["destination"].as_str().unwrap().contains(to)
        })
        .cloned()
}

#[test]
fn the_dashboard_shows_the_mesh_its_traffic_and_a_refusal_under_its_policy() {
    let (testbed, mesh, _server) = start();
    let db = weft_testbed::shop_db(&testbed).unwrap();
    for _ in 0..3 {
        assert!(weft_testbed::echoes(&testbed, "web-1", db));
    }
    // Plaintext from outside the mesh, accepted (PERMISSIVE).
    assert!(weft_testbed::echoes(&testbed, "old-1", db));
    mesh.write_manifest("policy.yaml", ALLOW_WEB_TO_DB).unwrap();
    weft_testbed::wait_for_reach(&testbed, "batch-1", db, false);
    assert!(!weft_testbed::echoes(&testbed, "batch-1", db));

    // The reports come every second; wait until the window holds them.
    let mut traffic = Value::Null;
    wait_until(Duration::from_secs(30), || {
        traffic = api(&mesh, &testbed, "/api/traffic");
        let web = edge(&traffic, "web", "db");
        let batch = edge(&traffic, "batch", "db");
        Ok(web.is_some_and(|e| e["opened"].as_u64() >= Some(3))
            && batch.is_some_and(|e| e["denied"]["shop/db-from-web"].as_u64() >= Some(1)))
    })
    .unwrap_or_else(|e| panic!("{e}: {traffic:#}"));
    let web = edge(&traffic, "web", "db").unwrap();
    assert_eq!(web["security"], "mutual_tls", "{web}");
    assert_eq!(
        web["reported_by"], "destination",
        "counted once, from db's node: {web}"
    );
    assert!(web["bytes_received"].as_u64().unwrap() > 0, "{web}");
    assert_eq!(
        web["source_principal"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let plaintext = traffic["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["security"] == "none" && e["destination"].as_str().unwrap().contains("db"));
    assert!(
        plaintext.is_some(),
        "plaintext from old-1 is shown as plaintext: {traffic:#}"
    );

    // Every node with its proxy, on its latest config, with certificates.
    let nodes = api(&mesh, &testbed, "/api/nodes");
    for node in nodes.as_array().unwrap() {
        assert_eq!(node["connected"], true, "{node}");
        assert_eq!(node["up_to_date"], true, "{node}");
    }
    let node_2 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap();
    assert!(
        node_2["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["identity"] == "spiffe://cluster.local/ns/shop/sa/db"
                && c["expires_in_seconds"].as_i64().unwrap() > 0),
        "{node_2}"
    );

    // The workloads: db is meshed and selected by the policy, its
    // certificate known.
    let workloads = api(&mesh, &testbed, "/api/workloads?namespace=shop&q=db");
    let db_pod = &workloads["workloads"][0];
    assert_eq!(db_pod["meshed"], true, "{db_pod}");
    assert_eq!(db_pod["policies"][0], "shop/db-from-web", "{db_pod}");
    assert!(db_pod["certificate"]["not_after"].is_i64(), "{db_pod}");

    // The explain form answers as the CLI.
    for (from, allowed) in [("shop/web", true), ("shop/batch", false)] {
        let answer = api(
            &mesh,
            &testbed,
            &format!("/api/explain?from={from}&to=shop/db-1:5432"),
        );
        let (report, cli_allowed) =
            weft_testbed::explain(&mesh, &["--from", from, "--to", "shop/db-1:5432"]).unwrap();
        assert_eq!(answer["allowed"], allowed, "{answer}");
        assert_eq!(cli_allowed, allowed);
        assert_eq!(answer["report"], report.as_str());
    }

    let overview = api(&mesh, &testbed, "/api/overview");
    assert!(overview["traffic"]["denied"].as_u64().unwrap() >= 1);
    assert_eq!(overview["policies"]["not_accepted"], 0);
}
