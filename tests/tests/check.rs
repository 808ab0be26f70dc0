//! `weft-control-plane check` end to end. On the testbed: it passes on a
//! healthy mesh and fails, naming the problem, when a policy is invalid or
//! a node's proxy is gone (the test connection through a throwaway
//! namespace needs Kubernetes: `tests/tests/real_nodes.rs` runs it). On a
//! real API server: the pre-install checks pass for an admin and name an
//! outdated CRD, an old kernel and missing permissions.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::Duration;

use weft_testbed::{Target, Testbed, WeftMesh, wait_until, weft_binary};

/// Runs `check` in the control plane's node (where its monitoring port is):
/// whether it passed, and what it printed.
fn check(testbed: &Testbed, mesh: &WeftMesh, more: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(weft_binary("weft-control-plane").unwrap());
    command.args([
        "check",
        "--skip-connection-test",
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

/// Runs `check --pre` with `kubeconfig`: whether it passed, and what it
/// printed.
fn pre_check(kubeconfig: &std::path::Path) -> (bool, String) {
    let mut command = std::process::Command::new(weft_binary("weft-control-plane").unwrap());
    command
        .args(["check", "--pre"])
        .env("KUBECONFIG", kubeconfig);
    let output = tokio::task::block_in_place(|| command.output()).unwrap();
    weft_testbed::check_outcome(&output).unwrap()
}

/// A node of the API server alone (no kubelet) that says it runs `kernel`.
async fn add_node(client: &kube::Client, name: &str, kernel: &str) {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = serde_json::json!({"status": {"nodeInfo": {
        "kernelVersion": kernel, "operatingSystem": "linux", "architecture": "amd64",
        "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "", "kubeProxyVersion": "",
        "machineID": "", "systemUUID": "", "bootID": ""}}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_install_checks_name_what_would_stop_an_install() {
    use weft_testbed::apiserver::KubeApiServer;
    use weft_testbed::kube_cluster;
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    add_node(&client, "current", "6.1.0-28-cloud-amd64").await;

    // A cluster ready for weft, as its admin sees it.
    let (passed, output) = pre_check(api.kubeconfig_path());
    assert!(passed, "{output}");
    for line in [
        "✓ Kubernetes version: v1.",
        "✓ CRDs: none installed yet: the install creates them",
        "✓ permissions to install: you may create the",
        "✓ node kernels: 1 Linux nodes, each on Linux 5.2 or newer",
    ] {
        assert!(output.contains(line), "{line:?} missing from:\n{output}");
    }

    // The CRDs this version ships, as the API server stores them, pass.
    kube_cluster::install_crds(&client).await.unwrap();
    let (passed, output) = pre_check(api.kubeconfig_path());
    assert!(passed, "{output}");
    assert!(
        output.contains("✓ CRDs: 3 installed as this version ships them"),
        "{output}"
    );

    // An older CRD (helm would keep it) and a node too old for the capture.
    let mut crds = kube_cluster::read_deploy_file("crds/weft.dev.yaml").unwrap();
    let authz = crds
        .iter_mut()
        .find(|crd| crd["spec"]["names"]["kind"] == "AuthorizationPolicy")
        .unwrap();
    authz["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] =
        serde_json::json!("an older release");
    kube_cluster::apply_object(&client, authz).await.unwrap();
    add_node(&client, "old", "4.19.0-25-amd64").await;
    let (passed, output) = pre_check(api.kubeconfig_path());
    assert!(!passed, "{output}");
    assert!(
        output.contains(
            "✗ CRDs: authorizationpolicies.weft.dev: its v1alpha1 schema is not the one this version ships"
        ),
        "{output}"
    );
    assert!(
        output.contains(
            "✗ node kernels: too old for the capture (Linux 5.2 or newer): old (4.19.0-25-amd64)"
        ),
        "{output}"
    );
    assert!(output.contains("✓ permissions to install"), "{output}");

    // A user without rights is told what they lack.
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Api, PostParams};
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "viewer"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let token = kube_cluster::service_account_token(
        &client,
        "default",
        "viewer",
        &[weft_testbed::apiserver::SERVICE_ACCOUNT_ISSUER],
        None,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("viewer.kubeconfig");
    api.write_kubeconfig_for(&kubeconfig, &token).unwrap();
    let (passed, output) = pre_check(&kubeconfig);
    assert!(!passed, "{output}");
    for line in [
        "✓ Kubernetes version: v1.",
        "✗ permissions to install: you may not ",
        "create namespaces (cluster-wide)",
        "create clusterroles.rbac.authorization.k8s.io (cluster-wide)",
        "create deployments.apps in weft-system",
        "get secrets weft-ca in weft-system",
        "✗ node kernels: listing the nodes: ",
    ] {
        assert!(output.contains(line), "{line:?} missing from:\n{output}");
    }
}
