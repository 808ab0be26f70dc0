//! End to end on the testbed: pods that cannot prove an identity never get
//! one, and an address two pods claim vouches for neither. Each is what a
//! compromised node (which writes its pods' status and may create mirror
//! pods) could try in order to get another workload's certificate or
//! traffic.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::Value;
use weft_testbed::{
    CONFIG_WAIT, SHOP_DB_SERVICE, Testbed, WeftMesh, echoes, shop_pod, wait_for_reach, wait_until,
};

/// node-1: web-1 (shop/web); node-2: db-1 (shop/db), echoing on 5432.
fn start() -> (Testbed, WeftMesh, weft_testbed::EchoServer) {
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-2", "db-1", "db", &[("app", "db")]))
        .service(SHOP_DB_SERVICE)
        .build()
        .unwrap();
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    (testbed, mesh, server)
}

fn cert_identities(mesh: &WeftMesh, testbed: &Testbed, node: &str) -> BTreeSet<String> {
    let Ok(text) = mesh.proxy_admin(testbed, node, "/certs") else {
        return BTreeSet::new();
    };
    let certs: Value = serde_json::from_str(&text).unwrap_or_default();
    certs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["identity"].as_str().map(str::to_owned))
        .collect()
}

/// A running pod of namespace shop on `node`, as manifests.
fn pod(name: &str, node: &str, ip: &str, extra_metadata: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop{extra_metadata}}}
spec: {{nodeName: {node}, containers: [{{name: c, image: x}}]{extra_spec}}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
"
    )
}

#[test]
fn mirror_and_host_network_pods_get_no_identity() {
    let (testbed, mesh, _server) = start();
    let node_1 = testbed.node_ip("node-1").unwrap();
    // node-1 claims to run pods as shop/db: a static pod's mirror and a
    // hostNetwork pod.
    let claims = [
        pod(
            "mirror",
            "node-1",
            "10.244.1.200",
            ", annotations: {kubernetes.io/config.mirror: x}",
            ", serviceAccountName: db",
        ),
        pod(
            "host",
            "node-1",
            &node_1.to_string(),
            "",
            ", serviceAccountName: db, hostNetwork: true",
        ),
    ]
    .join("---\n");
    mesh.write_manifest("claims.yaml", &claims).unwrap();
    // A pod the control plane does accept, so that we know the change has
    // been derived and sent before looking at what node-1 holds.
    mesh.write_manifest(
        "marker.yaml",
        &pod(
            "marker",
            "node-1",
            "10.244.1.201",
            "",
            ", serviceAccountName: marker",
        ),
    )
    .unwrap();
    let marker = "spiffe://cluster.local/ns/shop/sa/marker".to_owned();
    wait_until(CONFIG_WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-1").contains(&marker))
    })
    .unwrap();
    let held = cert_identities(&mesh, &testbed, "node-1");
    assert!(
        !held.contains("spiffe://cluster.local/ns/shop/sa/db"),
        "node-1 got db's identity: {held:?}"
    );
    let dump = mesh.config_dump(&testbed, "node-1").unwrap();
    let local: Vec<&str> = dump["local_workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["uid"].as_str())
        .collect();
    assert!(
        !local.contains(&"shop/mirror") && !local.contains(&"shop/host"),
        "{local:?}"
    );
    // The node's own address is not a workload's: traffic still flows.
    assert!(echoes(&testbed, "web-1", db(&testbed)));
}

fn db(testbed: &Testbed) -> SocketAddr {
    SocketAddr::from((testbed.pod_ip("db-1").unwrap(), 5432))
}

#[test]
fn an_address_two_pods_claim_vouches_for_neither() {
    let (testbed, mesh, _server) = start();
    let db = db(&testbed);
    assert!(echoes(&testbed, "web-1", db));
    // node-1 reports a pod of its own with db-1's address.
    let impostor = pod(
        "impostor",
        "node-1",
        &db.ip().to_string(),
        "",
        ", serviceAccountName: evil",
    );
    mesh.write_manifest("impostor.yaml", &impostor).unwrap();
    // db-1 is quarantined on its node, not released: it keeps its address
    // (still captured) and refuses every connection, saying why. web-1's
    // own node believes the address is local, to a quarantined pod: it
    // refuses too, once it has the change.
    wait_for_reach(&testbed, "web-1", db, false);
    // web-1's node may have the change before db-1's does: wait for
    // node-2's config to quarantine db-1.
    let db_1 = |dump: &Value| {
        dump["local_workloads"]
            .as_array()
            .and_then(|workloads| workloads.iter().find(|w| w["uid"] == "shop/db-1"))
            .cloned()
            .unwrap_or_default()
    };
    mesh.wait_for_dump(&testbed, "node-2", "db-1 quarantined", |dump| {
        db_1(dump)["quarantine"]
            .as_str()
            .is_some_and(|q| q.contains("is claimed by pods shop/db-1, shop/impostor"))
    })
    .unwrap();
    let db_1 = db_1(&mesh.config_dump(&testbed, "node-2").unwrap());
    assert_eq!(db_1["ips"][0], db.ip().to_string(), "{db_1}");
    // Whichever proxy learned of the claim first refused the connection.
    // (Logs are written by a thread of their own: wait for the line.)
    let refusal = "the workload refuses every connection: IP";
    let logs = || -> String {
        ["node-1", "node-2"]
            .iter()
            .map(|node| mesh.proxy(node).unwrap().stdout().unwrap())
            .collect()
    };
    wait_until(CONFIG_WAIT, || Ok(logs().contains(refusal))).unwrap_or_else(|_| {
        panic!("no proxy logged the refusal: {}", logs());
    });
    let claimed = |log: &str| log.contains("an IP is claimed by more than one pod");
    let control_plane = mesh.control_plane().unwrap().stdout_once(claimed).unwrap();
    assert!(
        control_plane.contains("an IP is claimed by more than one pod"),
        "{control_plane}"
    );
    // Once the claim is gone, db-1 is itself again.
    std::fs::remove_file(mesh.manifests_dir().join("impostor.yaml")).unwrap();
    wait_for_reach(&testbed, "web-1", db, true);
}
