//! End to end on the testbed: a client on the same node as the server is
//! held to the same policy as one on another node. The same-node path never
//! leaves the node and has no tunnel to refuse at the destination, so the
//! node proxy's outbound side runs the one authorization gate itself; these
//! tests attack that path (through the pod IP and through the Service VIP)
//! and check the connections that must still work.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;

use weft_testbed::{
    ALLOW_WEB_TO_DB, CONFIG_WAIT, DENY_BATCH_TO_DB, EchoServer, SHOP_DB_SERVICE, Target, Testbed,
    WeftMesh, echo_round_trip, echoes, explain, metric_sum, shop_pod, wait_for_reach, wait_until,
};

/// node-1: web-1, batch-1 and db-1 (meshed, shop) and old-1 (an unmeshed
/// namespace); node-2: db-2 (meshed, shop). db-1 and db-2 echo on 5432 and
/// are the endpoints of Service shop/db.
fn start() -> (Testbed, WeftMesh, Vec<EchoServer>) {
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-1", "batch-1", "batch", &[("app", "batch")]))
        .pod(shop_pod("node-1", "db-1", "db", &[("app", "db")]))
        .pod(weft_testbed::legacy_pod("node-1", "old-1"))
        .pod(shop_pod("node-2", "db-2", "db", &[("app", "db")]))
        .service(SHOP_DB_SERVICE)
        .build()
        .unwrap();
    let servers = ["db-1", "db-2"]
        .into_iter()
        .map(|db| testbed.start_echo_server(Target::Pod(db), 5432).unwrap())
        .collect();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    (testbed, mesh, servers)
}

fn pod_addr(testbed: &Testbed, pod: &str) -> SocketAddr {
    SocketAddr::from((testbed.pod_ip(pod).unwrap(), 5432))
}

fn vip(testbed: &Testbed) -> SocketAddr {
    SocketAddr::from((testbed.service_vip("shop", "db").unwrap(), 5432))
}

fn metric(mesh: &WeftMesh, testbed: &Testbed, needle: &str) -> u64 {
    metric_sum(mesh, testbed, "node-1", needle).unwrap()
}

#[test]
fn an_allow_policy_holds_for_a_neighbour_on_the_same_node() {
    let (testbed, mesh, servers) = start();
    let db1 = pod_addr(&testbed, "db-1");
    assert!(echoes(&testbed, "batch-1", db1), "no policy yet");

    mesh.write_manifest("policy.yaml", ALLOW_WEB_TO_DB).unwrap();
    // The attack: batch on db-1's own node, by pod IP and by the Service
    // (whose endpoints are db-1 here and db-2 on node-2): every attempt is
    // refused, and none of its bytes reach a db.
    wait_for_reach(&testbed, "batch-1", db1, false);
    // The Service's other endpoint is refused by node-2, which applies the
    // policy in its own time.
    wait_for_reach(&testbed, "batch-1", pod_addr(&testbed, "db-2"), false);
    let batch_ip = testbed.pod_ip("batch-1").unwrap();
    let from_batch = || {
        servers
            .iter()
            .flat_map(EchoServer::peers)
            .filter(|p| p.ip() == batch_ip)
            .count()
    };
    // The echo servers record a connection when they accept it, which may
    // be after its client gave up (one opened before the policy landed and
    // closed by it). web's round trips through both, allowed, drain what
    // was queued before: accepts come in order.
    for db in ["db-1", "db-2"] {
        assert!(echoes(&testbed, "web-1", pod_addr(&testbed, db)));
    }
    let reached_before = from_batch();
    for _ in 0..4 {
        assert!(!echoes(&testbed, "batch-1", db1));
        assert!(!echoes(&testbed, "batch-1", vip(&testbed)));
    }
    assert_eq!(
        from_batch(),
        reached_before,
        "a refused connection reached db"
    );
    // Plaintext from an unmeshed neighbour has no identity: refused too.
    assert!(!echoes(&testbed, "old-1", db1));
    // web still gets through, on the same node and across nodes.
    assert!(echoes(&testbed, "web-1", db1));
    for _ in 0..4 {
        assert!(echoes(&testbed, "web-1", vip(&testbed)));
    }
    assert!(echoes(&testbed, "web-1", pod_addr(&testbed, "db-2")));

    // Counted and logged by node-1's proxy like any other denial, naming
    // the policy and the path.
    let denied = metric(
        &mesh,
        &testbed,
        "weft_authorization_decisions_total{decision=\"deny\",policy=\"shop/db-from-web\"",
    );
    assert!(denied >= 4, "denials are counted by policy: {denied}");
    let denied = |log: &str| {
        log.lines().any(|l| {
            l.contains("inbound connection denied")
                && l.contains("shop/db-from-web")
                && l.contains("node_local")
        })
    };
    let log = mesh.proxy("node-1").unwrap().stdout_once(denied).unwrap();
    assert!(denied(&log), "{log}");
    // The admitted same-node connections are labelled as such.
    assert!(metric(&mesh, &testbed, "connection_security_policy=\"node_local\"") >= 1);
}

#[test]
fn deny_and_audit_apply_on_the_same_node() {
    let (testbed, mesh, _servers) = start();
    let db1 = pod_addr(&testbed, "db-1");
    let policies = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: weft-system}
spec:
  action: DENY
  rules:
  - from: {principals: [\"*/sa/batch\"]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: watch-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: AUDIT
  rules:
  - from: {namespaces: [shop]}
";
    mesh.write_manifest("policies.yaml", policies).unwrap();
    wait_for_reach(&testbed, "batch-1", db1, false);
    // The Service may pick db-2, which node-2 guards once it has the change.
    wait_for_reach(&testbed, "batch-1", pod_addr(&testbed, "db-2"), false);
    assert!(!echoes(&testbed, "batch-1", vip(&testbed)));
    assert!(echoes(&testbed, "web-1", db1));
    let audited = metric(
        &mesh,
        &testbed,
        "weft_authorization_decisions_total{decision=\"audit\",policy=\"shop/watch-shop\"",
    );
    assert!(audited >= 1, "the audit of web's connection is counted");
    assert!(
        metric(
            &mesh,
            &testbed,
            "weft_authorization_decisions_total{decision=\"deny\",policy=\"weft-system/no-batch\""
        ) >= 1
    );
    let log = mesh.proxy("node-1").unwrap();
    let log = log
        .stdout_once(|log| log.contains("authorization audit"))
        .unwrap();
    assert!(log.contains("authorization audit"), "{log}");
}

#[test]
fn strict_refuses_plaintext_from_a_neighbour_and_admits_meshed_ones() {
    let (testbed, mesh, _servers) = start();
    let db1 = pod_addr(&testbed, "db-1");
    assert!(echoes(&testbed, "old-1", db1), "PERMISSIVE by default");
    let strict = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";
    mesh.write_manifest("mtls.yaml", strict).unwrap();
    wait_for_reach(&testbed, "old-1", db1, false);
    // A meshed neighbour's identity is known to the node: not plaintext.
    assert!(echoes(&testbed, "batch-1", db1));
    assert!(echoes(&testbed, "web-1", vip(&testbed)));
    assert!(metric(&mesh, &testbed, "reason=\"plaintext_refused_strict\"") >= 1);
}

#[test]
fn an_open_same_node_connection_is_closed_when_a_deny_appears() {
    let (testbed, mesh, _servers) = start();
    let db1 = pod_addr(&testbed, "db-1");
    let mut batch = testbed.connect(Target::Pod("batch-1"), db1).unwrap();
    let mut web = testbed.connect(Target::Pod("web-1"), db1).unwrap();
    for stream in [&mut batch, &mut web] {
        assert_eq!(echo_round_trip(stream, b"ping").unwrap(), b"ping");
    }
    let deny = DENY_BATCH_TO_DB;
    mesh.write_manifest("deny.yaml", deny).unwrap();
    wait_until(CONFIG_WAIT, || {
        Ok(echo_round_trip(&mut batch, b"ping").is_err())
    })
    .unwrap();
    assert_eq!(
        echo_round_trip(&mut web, b"ping").unwrap(),
        b"ping",
        "web's open connection is still allowed"
    );
    let closing = |log: &str| log.contains("closing an open connection after a policy change");
    let log = mesh.proxy("node-1").unwrap().stdout_once(closing).unwrap();
    assert!(closing(&log), "{log}");
}

#[test]
fn explain_agrees_with_the_proxy_on_the_same_node_path() {
    let (testbed, mesh, _servers) = start();
    let strict = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";
    mesh.write_manifest("policies.yaml", &format!("{ALLOW_WEB_TO_DB}---\n{strict}"))
        .unwrap();
    let db1 = pod_addr(&testbed, "db-1");
    wait_for_reach(&testbed, "old-1", db1, false);
    wait_for_reach(&testbed, "batch-1", db1, false);

    // (client pod, explain's view of it, what explain must say)
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "web-1",
            &["--from", "shop/web"],
            "allowed by ALLOW shop/db-from-web rule 0",
        ),
        (
            "batch-1",
            &["--from", "shop/batch"],
            "denied: no rule of the ALLOW policies shop/db-from-web matches",
        ),
        (
            "old-1",
            &["--from", "legacy/default", "--plaintext"],
            "plaintext is refused, mTLS mode STRICT set by MtlsPolicy shop/strict",
        ),
    ];
    for (pod, from, expected) in cases {
        let mut args = from.to_vec();
        args.extend(["--to", "shop/db-1:5432"]);
        let (report, allowed) = explain(&mesh, &args).unwrap();
        assert!(report.contains(expected), "{pod}: {report}");
        assert_eq!(
            allowed,
            echoes(&testbed, pod, db1),
            "{pod} -> db-1 (same node): explain said {report}"
        );
    }
}
