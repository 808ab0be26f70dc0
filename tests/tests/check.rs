//! End to end on the testbed: `weft-control-plane check` passes on a
//! healthy mesh and fails, naming the problem, when a policy is invalid or
//! a node's proxy is gone.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::Duration;

use weft_testbed::{Target, Testbed, WeftMesh, wait_until, weft_binary};

/// Runs `check` in the control plane's node (where its monitoring port is):
/// whether it passed, and what it printed.
fn check(testbed: &Testbed, mesh: &WeftMesh, more: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(weft_binary("weft-control-plane").unwrap());
    command.args([
        "check",
        "--url",
        &format!(
            "http://127.0.0.1:{}",
            weft_testbed::CONTROL_PLANE_MONITORING_PORT
        ),
    ]);
    command.args(more);
    let process = testbed
        .spawn(Target::Node(mesh.control_plane_node()), command)
        .unwrap();
    let status = process.wait(Duration::from_secs(60)).unwrap();
    let output = process.stdout().unwrap();
    match status.code() {
        Some(0) => (true, output),
        Some(1) => (false, output),
        other => panic!(
            "check exited with {other:?}: {output}{}",
            process.stderr().unwrap()
        ),
    }
}

/// Admitted by the CRD's schema, refused by the control plane.
const BROKEN_POLICY: &str = "apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: broken, namespace: shop}
spec:
  service: db
  outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 0s}
";

#[test]
fn check_passes_on_a_healthy_mesh_and_names_what_is_wrong() {
    let testbed = weft_testbed::shop_testbed().unwrap();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    // Healthy once every proxy has reported its certificates.
    let mut last = String::new();
    wait_until(Duration::from_secs(30), || {
        let (passed, output) = check(&testbed, &mesh, &[]);
        last = output;
        Ok(passed)
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    for line in [
        "✓ control plane ready",
        "✓ a proxy on every node",
        "✓ every proxy on its latest config",
        "✓ certificates valid",
        "✓ manifests read",
        "✓ policies accepted",
    ] {
        assert!(last.contains(line), "{line} in {last}");
    }
    let (_, json) = check(&testbed, &mesh, &["-o", "json"]);
    let results: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        results
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["passed"] == true),
        "{json}"
    );

    // An invalid policy: named, with its reason.
    mesh.write_manifest("broken.yaml", BROKEN_POLICY).unwrap();
    wait_until(Duration::from_secs(30), || {
        let (passed, output) = check(&testbed, &mesh, &[]);
        last = output;
        Ok(!passed && last.contains("✗ policies accepted"))
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    assert!(last.contains("shop/broken"), "{last}");
    assert!(
        last.contains("baseEjectionTime: must be longer than 0s"),
        "{last}"
    );
    std::fs::remove_file(mesh.manifests_dir().join("broken.yaml")).unwrap();

    // A manifest the CRD's schema refuses: named with the schema's words.
    mesh.write_manifest(
        "typo.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\n\
         spec: {rules: [{from: {principals: ['']}}]}\n",
    )
    .unwrap();
    wait_until(Duration::from_secs(30), || {
        let (passed, output) = check(&testbed, &mesh, &[]);
        last = output;
        Ok(!passed && last.contains("✗ manifests read"))
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    assert!(
        last.contains("typo.yaml") && last.contains("principals[0]"),
        "{last}"
    );
    std::fs::remove_file(mesh.manifests_dir().join("typo.yaml")).unwrap();

    // node-2's proxy stops: its node is named.
    mesh.stop_proxy("node-2").unwrap();
    wait_until(Duration::from_secs(30), || {
        let (passed, output) = check(&testbed, &mesh, &[]);
        last = output;
        Ok(!passed && last.contains("✗ a proxy on every node"))
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    assert!(last.contains("no proxy is connected on node-2"), "{last}");
    assert!(last.contains("✓ policies accepted"), "{last}");
}
