//! End to end on the testbed, with local manifests (which no API server
//! validates): a policy that does not convert is reported and left out,
//! and the rest of the config keeps flowing to every proxy. Before, one
//! such TrafficPolicy made every proxy refuse every later update.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;

use serde_json::Value;
use weft_testbed::{
    CONFIG_WAIT, DENY_BATCH_TO_DB, SHOP_DB_SERVICE, Testbed, WeftMesh, echoes, shop_pod, wait_until,
};

/// node-1: web-1 and batch-1 (meshed, shop); node-2: db-1 (meshed, shop,
/// behind Service shop/db), which echoes on 5432.
fn start() -> (Testbed, WeftMesh, weft_testbed::EchoServer) {
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-1", "batch-1", "batch", &[("app", "batch")]))
        .pod(shop_pod("node-2", "db-1", "db", &[("app", "db")]))
        .service(SHOP_DB_SERVICE)
        .build()
        .unwrap();
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    (testbed, mesh, server)
}

fn db(testbed: &Testbed) -> SocketAddr {
    SocketAddr::from((testbed.pod_ip("db-1").unwrap(), 5432))
}

/// The `Accepted` condition of `object` on `/debug/policies`.
fn accepted(mesh: &WeftMesh, testbed: &Testbed, object: &str) -> Option<Value> {
    let page = mesh.control_plane_page(testbed, "/debug/policies").ok()?;
    let listed: Vec<Value> = serde_json::from_str(&page).ok()?;
    let entry = listed.into_iter().find(|e| e["object"] == object)?;
    entry["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

const BAD_TRAFFIC: &str = "apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: eject-now, namespace: shop}
spec:
  service: db
  outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 0s}
";

const DENY_BATCH: &str = DENY_BATCH_TO_DB;

/// A mesh-wide DENY: it reaches every proxy (each has a pod it applies to).
const MESH_DENY_BATCH: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: weft-system}
spec:
  action: DENY
  rules:
  - from: {principals: [\"*/sa/batch\"]}
";

#[test]
fn a_bad_traffic_policy_is_reported_and_the_rest_of_the_config_flows_on() {
    let (testbed, mesh, _server) = start();
    let db = db(&testbed);
    assert!(echoes(&testbed, "batch-1", db));

    // The bad policy first, then a good change while it is there.
    mesh.write_manifest("bad-traffic.yaml", BAD_TRAFFIC)
        .unwrap();
    wait_until(CONFIG_WAIT, || {
        Ok(accepted(&mesh, &testbed, "shop/eject-now").is_some())
    })
    .unwrap();
    mesh.write_manifest("deny.yaml", MESH_DENY_BATCH).unwrap();
    wait_until(CONFIG_WAIT, || Ok(!echoes(&testbed, "batch-1", db))).unwrap();
    assert!(echoes(&testbed, "web-1", db));

    let condition = accepted(&mesh, &testbed, "shop/eject-now").unwrap();
    assert_eq!(condition["status"], false, "{condition}");
    assert_eq!(condition["reason"], "Invalid", "{condition}");
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("outlierDetection.baseEjectionTime: must be longer than 0s"),
        "{message}"
    );

    // Every proxy follows the newest config, refused nothing, and the
    // Service carries no TrafficPolicy.
    for node in ["node-1", "node-2"] {
        mesh.wait_for_dump(&testbed, node, "the DENY policy", |dump| {
            dump["authorization_policies"]
                .get("weft-system/no-batch")
                .is_some()
        })
        .unwrap();
        let dump = mesh.config_dump(&testbed, node).unwrap();
        assert_eq!(dump["last_nack"], Value::Null, "{node}: {dump}");
        let db_service = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "db")
            .cloned()
            .unwrap();
        assert_eq!(db_service["traffic"], Value::Null, "{node}: {db_service}");
    }
    let logged =
        |log: &str| log.contains("TrafficPolicy is invalid") && log.contains("shop/eject-now");
    let log = mesh.control_plane().unwrap().stdout_once(logged).unwrap();
    assert!(logged(&log), "{log}");

    // Fixed, it is accepted and sent.
    mesh.write_manifest(
        "bad-traffic.yaml",
        &BAD_TRAFFIC.replace("baseEjectionTime: 0s", "baseEjectionTime: 1s"),
    )
    .unwrap();
    wait_until(CONFIG_WAIT, || {
        Ok(accepted(&mesh, &testbed, "shop/eject-now").is_some_and(|c| c["status"] == true))
    })
    .unwrap();
}

#[test]
fn a_broken_deny_policy_fails_closed_for_the_pods_it_selects() {
    let (testbed, mesh, _server) = start();
    let db = db(&testbed);
    // An address block no API server would have admitted (CEL isCIDR),
    // but a manifests directory does not check: the DENY it belongs to
    // cannot be enforced as written, so db refuses everyone, and says so.
    let broken = DENY_BATCH.replace(
        "- from: {principals: [\"spiffe://cluster.local/ns/shop/sa/batch\"]}",
        "- from: {ipBlocks: [\"10.244.1.0/24\", \"10.244.1.300\"]}",
    );
    mesh.write_manifest("deny.yaml", &broken).unwrap();
    wait_until(CONFIG_WAIT, || Ok(!echoes(&testbed, "web-1", db))).unwrap();
    assert!(!echoes(&testbed, "batch-1", db));

    let condition = accepted(&mesh, &testbed, "shop/no-batch").unwrap();
    assert_eq!(condition["reason"], "Invalid", "{condition}");
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("rules[0].from.ipBlocks[1]")
            && message.contains("refuse every connection"),
        "{message}"
    );
    let logged =
        |log: &str| log.contains("shop/no-batch") && log.contains("is not applied (invalid)");
    let log = mesh.proxy("node-2").unwrap().stdout_once(logged).unwrap();
    assert!(logged(&log), "{log}");
    let dump = mesh.config_dump(&testbed, "node-2").unwrap();
    assert_eq!(dump["last_nack"], Value::Null, "{dump}");

    // Fixed, the DENY does what it says: batch refused, web admitted.
    mesh.write_manifest("deny.yaml", DENY_BATCH).unwrap();
    wait_until(CONFIG_WAIT, || Ok(echoes(&testbed, "web-1", db))).unwrap();
    assert!(!echoes(&testbed, "batch-1", db));
}
