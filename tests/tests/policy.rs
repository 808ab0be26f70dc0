//! End to end on the testbed: AuthorizationPolicy and MtlsPolicy objects,
//! written as manifests, enforced by the destination node's proxy. Each test
//! checks the attack (the connection that must be refused) as well as the
//! connection that must still work, and what the proxy reports.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::SocketAddr;

use weft_testbed::{
    ALLOW_WEB_TO_DB, CONFIG_WAIT, DENY_BATCH_TO_DB, Target, Testbed, WeftMesh, wait_until,
};

/// node-1: web-1 and batch-1 (meshed, shop) and old-1 (an unmeshed
/// namespace); node-2: db-1 (meshed, shop), which echoes on 5432.
fn cluster() -> Testbed {
    weft_testbed::shop_testbed().unwrap()
}

fn db(testbed: &Testbed) -> SocketAddr {
    weft_testbed::shop_db(testbed).unwrap()
}

/// Whether an echo round trip from `from` to db-1:5432 works.
fn echoes(testbed: &Testbed, from: &str) -> bool {
    weft_testbed::echoes(testbed, from, db(testbed))
}

/// Waits until `from` reaches db-1 (or is refused), as a policy change
/// takes effect.
fn wait_for_reach(testbed: &Testbed, from: &str, reachable: bool) {
    weft_testbed::wait_for_reach(testbed, from, db(testbed), reachable);
}

fn start() -> (Testbed, WeftMesh, weft_testbed::EchoServer) {
    let testbed = cluster();
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    (testbed, mesh, server)
}

fn metric(mesh: &WeftMesh, testbed: &Testbed, node: &str, needle: &str) -> u64 {
    weft_testbed::metric_sum(mesh, testbed, node, needle).unwrap()
}

const ALLOW_WEB: &str = ALLOW_WEB_TO_DB;

#[test]
fn an_allow_policy_admits_its_principal_and_refuses_every_other_source() {
    let (testbed, mesh, server) = start();
    assert!(
        echoes(&testbed, "batch-1"),
        "before any policy, batch reaches db"
    );
    assert!(
        echoes(&testbed, "old-1"),
        "and so does plaintext (PERMISSIVE)"
    );

    mesh.write_manifest("policy.yaml", ALLOW_WEB).unwrap();
    wait_for_reach(&testbed, "batch-1", false);
    // A refused client's first bytes travel with its CONNECT (early data),
    // before the destination proxy has decided: they must not reach db.
    let batch_ip = testbed.pod_ip("batch-1").unwrap();
    let from_batch = || server.peers().iter().filter(|p| p.ip() == batch_ip).count();
    // The server records a connection when it accepts it, maybe after its
    // client gave up (one opened before the policy landed and closed by
    // it); web's round trip, allowed, drains that queue: accepts come in
    // order.
    assert!(echoes(&testbed, "web-1"));
    let reached_before = from_batch();
    for _ in 0..3 {
        assert!(!echoes(&testbed, "batch-1"));
    }
    assert_eq!(
        from_batch(),
        reached_before,
        "a refused connection reached db"
    );
    // The attack: a meshed pod of another identity, and plaintext that has
    // no identity at all; both refused. web still gets through.
    assert!(!echoes(&testbed, "old-1"));
    assert!(echoes(&testbed, "web-1"));

    let denied = metric(
        &mesh,
        &testbed,
        "node-2",
        "weft_authorization_decisions_total{decision=\"deny\",policy=\"shop/db-from-web\"",
    );
    assert!(denied >= 2, "denials are counted by policy");
    let logged =
        |log: &str| log.contains("inbound connection denied") && log.contains("shop/db-from-web");
    let log = mesh.proxy("node-2").unwrap().stdout_once(logged).unwrap();
    assert!(log.contains("inbound connection denied"), "{log}");
    assert!(
        log.contains("shop/db-from-web"),
        "the denial names the policy: {log}"
    );

    // Without an API server, the conditions are on the monitoring page.
    let page = mesh
        .control_plane_page(&testbed, "/debug/policies")
        .unwrap();
    assert!(
        page.contains("shop/db-from-web") && page.contains("Resolved"),
        "{page}"
    );

    // Removing the policy opens the door again.
    std::fs::remove_file(mesh.manifests_dir().join("policy.yaml")).unwrap();
    wait_for_reach(&testbed, "batch-1", true);
}

#[test]
fn deny_wins_over_allow_and_a_mesh_wide_deny_reaches_every_namespace() {
    let (testbed, mesh, _server) = start();
    let deny_web = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-web, namespace: weft-system}
spec:
  action: DENY
  rules:
  - from: {principals: [\"*/sa/web\"]}
";
    mesh.write_manifest("allow.yaml", ALLOW_WEB).unwrap();
    wait_for_reach(&testbed, "batch-1", false);
    assert!(echoes(&testbed, "web-1"));
    mesh.write_manifest("deny.yaml", deny_web).unwrap();
    wait_for_reach(&testbed, "web-1", false);
    assert!(
        !echoes(&testbed, "web-1"),
        "a new connection is refused too"
    );
    let denied = metric(
        &mesh,
        &testbed,
        "node-2",
        "weft_authorization_decisions_total{decision=\"deny\",policy=\"weft-system/no-web\"",
    );
    assert!(denied >= 1);
}

#[test]
fn an_audit_policy_reports_and_never_blocks() {
    let (testbed, mesh, _server) = start();
    let audit = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: watch-batch, namespace: shop}
spec:
  action: AUDIT
  rules:
  - from: {namespaces: [shop]}
    to: {notPorts: [22]}
";
    mesh.write_manifest("audit.yaml", audit).unwrap();
    let audited = || {
        metric(
            &mesh,
            &testbed,
            "node-2",
            "weft_authorization_decisions_total{decision=\"audit\",policy=\"shop/watch-batch\"",
        )
    };
    wait_until(CONFIG_WAIT, || {
        Ok(echoes(&testbed, "batch-1") && audited() >= 1)
    })
    .unwrap();
    let log = mesh.proxy("node-2").unwrap();
    let log = log
        .stdout_once(|log| log.contains("authorization audit"))
        .unwrap();
    assert!(log.contains("authorization audit"), "{log}");
    // Plaintext has no namespace: not audited, and not blocked either.
    let before = audited();
    assert!(echoes(&testbed, "old-1"));
    assert_eq!(audited(), before);
}

#[test]
fn strict_mtls_refuses_plaintext_and_permissive_accepts_it() {
    let (testbed, mesh, _server) = start();
    let strict = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";
    mesh.write_manifest("mtls.yaml", strict).unwrap();
    wait_for_reach(&testbed, "old-1", false);
    // Meshed clients are unaffected.
    assert!(echoes(&testbed, "web-1"));
    assert!(
        metric(
            &mesh,
            &testbed,
            "node-2",
            "reason=\"plaintext_refused_strict\""
        ) >= 1,
        "the refusal is counted"
    );
    let dump = mesh.config_dump(&testbed, "node-2").unwrap();
    let db = dump["local_workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["uid"] == "shop/db-1")
        .unwrap()
        .clone();
    assert_eq!(db["mtls_strict"], true, "{db}");
    assert_eq!(db["mtls_policy"], "shop/strict", "{db}");

    // A workload-level PERMISSIVE beats the namespace's STRICT.
    let permissive_db = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: db-permissive, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mode: PERMISSIVE}
";
    mesh.write_manifest("mtls-db.yaml", permissive_db).unwrap();
    wait_for_reach(&testbed, "old-1", true);
}

#[test]
fn an_open_connection_is_closed_when_a_deny_appears() {
    let (testbed, mesh, _server) = start();
    let to = SocketAddr::from((testbed.pod_ip("db-1").unwrap(), 5432));
    let mut tunnelled = testbed.connect(Target::Pod("batch-1"), to).unwrap();
    let mut plaintext = testbed.connect(Target::Pod("old-1"), to).unwrap();
    let mut unaffected = testbed.connect(Target::Pod("web-1"), to).unwrap();
    let round_trip = |stream: &mut std::net::TcpStream| {
        let mut echoed = [0u8; 4];
        stream.write_all(b"ping").is_ok()
            && stream.read_exact(&mut echoed).is_ok()
            && &echoed == b"ping"
    };
    for stream in [&mut tunnelled, &mut plaintext, &mut unaffected] {
        assert!(round_trip(stream));
    }

    let deny = DENY_BATCH_TO_DB;
    let strict = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";
    mesh.write_manifest("deny.yaml", deny).unwrap();
    mesh.write_manifest("strict.yaml", strict).unwrap();
    wait_until(CONFIG_WAIT, || Ok(!round_trip(&mut tunnelled))).unwrap();
    wait_until(CONFIG_WAIT, || Ok(!round_trip(&mut plaintext))).unwrap();
    assert!(
        round_trip(&mut unaffected),
        "web's open connection is still allowed"
    );
    let closing = |log: &str| log.contains("closing an open connection after a policy change");
    let log = mesh.proxy("node-2").unwrap().stdout_once(closing).unwrap();
    assert!(closing(&log), "{log}");
}

fn explain(mesh: &WeftMesh, args: &[&str]) -> (String, bool) {
    weft_testbed::explain(mesh, args).unwrap()
}

#[test]
fn explain_agrees_with_what_the_proxy_enforces() {
    let (testbed, mesh, _server) = start();
    let policies = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: {principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: watch-shop, namespace: shop}
spec:
  action: AUDIT
  rules:
  - from: {namespaces: [shop]}
---
apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";
    mesh.write_manifest("policies.yaml", policies).unwrap();
    wait_for_reach(&testbed, "old-1", false);

    // (client pod, explain's view of it, target, what explain must say)
    let cases: [(&str, &[&str], &str, &[&str]); 4] = [
        (
            "web-1",
            &["--from", "shop/web"],
            "shop/db-1:5432",
            &[
                "allowed by ALLOW shop/db-from-web rule 0",
                "audited by AUDIT shop/watch-shop rule 0",
            ],
        ),
        (
            "web-1",
            &["--from", "shop/web"],
            "db.shop:5432",
            &["pod shop/db-1 port 5432: allowed"],
        ),
        (
            "batch-1",
            &["--from", "shop/batch"],
            "shop/db:5432",
            &["denied: no rule of the ALLOW policies shop/db-from-web matches"],
        ),
        (
            "old-1",
            &["--from", "legacy/default", "--plaintext"],
            "shop/db-1:5432",
            &["plaintext is refused, mTLS mode STRICT set by MtlsPolicy shop/strict"],
        ),
    ];
    for (pod, from, to, expected) in cases {
        let mut args = from.to_vec();
        args.extend(["--to", to]);
        let (report, allowed) = explain(&mesh, &args);
        for text in expected {
            assert!(report.contains(text), "{pod} -> {to}: {report}");
        }
        assert_eq!(
            allowed,
            echoes(&testbed, pod),
            "{pod} -> {to}: explain said {report}"
        );
    }
}

#[test]
fn ip_blocks_and_negated_principals_select_sources() {
    let (testbed, mesh, _server) = start();
    let batch_ip = testbed.pod_ip("batch-1").unwrap();
    // DENY whatever comes from batch-1's address, except the web identity
    // (which does not live there): batch is refused, web is not.
    let deny = format!(
        "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-batch-address, namespace: shop}}
spec:
  action: DENY
  rules:
  - from:
      ipBlocks: [\"{batch_ip}/32\"]
      notPrincipals: [\"spiffe://cluster.local/ns/shop/sa/web\"]
"
    );
    mesh.write_manifest("deny.yaml", &deny).unwrap();
    wait_for_reach(&testbed, "batch-1", false);
    assert!(echoes(&testbed, "web-1"));
    assert!(
        echoes(&testbed, "old-1"),
        "another address is not in the block"
    );
    let (report, allowed) = explain(
        &mesh,
        &[
            "--from",
            "shop/batch",
            "--from-ip",
            &batch_ip.to_string(),
            "--to",
            "shop/db-1:5432",
        ],
    );
    assert!(
        !allowed && report.contains("denied by DENY shop/no-batch-address rule 0"),
        "{report}"
    );
}
