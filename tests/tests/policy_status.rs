//! Status conditions of weft's objects on a real kube-apiserver: the control
//! plane (with `--source kubernetes`) reports on each policy, names the
//! problem when there is one, and is the only writer because it holds the
//! Lease.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::{Value, json};
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::kube_cluster::{self, apply_objects, wait_for_condition};
use weft_testbed::{SHOP_DB_SERVICE, Testbed, WeftMesh, shop_pod};

/// Blocking testbed calls off the async test's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// One node with db-1 (meshed, shop) behind Service shop/db.
fn one_db() -> Testbed {
    Testbed::builder()
        .node("node-1")
        .pod(shop_pod("node-1", "db-1", "db", &[("app", "db")]))
        .service(SHOP_DB_SERVICE)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_reports_on_each_policy_in_its_status() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = one_db();
    let _mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    let policy = |kind: &str, name: &str, spec: Value| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": kind,
            "metadata": { "name": name, "namespace": "shop" }, "spec": spec,
        })
    };
    apply_objects(&client, &[
        policy("AuthorizationPolicy", "typo", json!({ "selector": { "matchLabels": { "app": "dbb" } } })),
        policy("AuthorizationPolicy", "db", json!({ "selector": { "matchLabels": { "app": "db" } } })),
        policy("TrafficPolicy", "canary", json!({
            "service": "db",
            "split": [{ "service": "db", "weight": 9 }, { "service": "db-canary", "weight": 1 }],
        })),
    ])
    .await
    .unwrap();
    // Created later, so the older "canary" keeps the Service.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    apply_objects(
        &client,
        &[policy("TrafficPolicy", "late", json!({ "service": "db" }))],
    )
    .await
    .unwrap();

    let expect = [
        (
            "authorizationpolicies",
            "typo",
            "ResolvedRefs",
            "False",
            "NoMatchingWorkloads",
            "app=dbb",
        ),
        (
            "authorizationpolicies",
            "db",
            "ResolvedRefs",
            "True",
            "Resolved",
            "",
        ),
        (
            "authorizationpolicies",
            "db",
            "Accepted",
            "True",
            "Accepted",
            "",
        ),
        (
            "trafficpolicies",
            "canary",
            "ResolvedRefs",
            "False",
            "ServiceNotFound",
            "db-canary",
        ),
        (
            "trafficpolicies",
            "late",
            "Accepted",
            "False",
            "Conflicted",
            "shop/canary",
        ),
    ];
    for (plural, name, type_, status, reason, mentions) in expect {
        wait_for_condition(&client, plural, "shop", name, type_, |c| {
            c.status == status && c.reason == reason && c.message.contains(mentions)
        })
        .await
        .unwrap();
    }

    // Fixing the problem flips the condition.
    apply_objects(
        &client,
        &[json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "db-canary", "namespace": "shop" },
            "spec": { "ports": [{ "port": 5432 }] },
        })],
    )
    .await
    .unwrap();
    wait_for_condition(
        &client,
        "trafficpolicies",
        "shop",
        "canary",
        "ResolvedRefs",
        |c| c.status == "True",
    )
    .await
    .unwrap();

    // One replica holds the Lease that makes it the writer.
    let lease = Api::<Lease>::namespaced(client.clone(), kube_cluster::WEFT_NAMESPACE)
        .get("weft-control-plane")
        .await
        .unwrap();
    assert!(lease.spec.unwrap().holder_identity.is_some());
}

/// An object that an older CRD admitted (here: one without the rule that
/// refuses `baseEjectionTime: 0s`) is still in the cluster after an
/// upgrade. The control plane reports it `Invalid`, naming the field, and
/// keeps it out of every proxy's config; the other policies are accepted.
#[tokio::test(flavor = "multi_thread")]
async fn an_object_an_older_crd_admitted_is_reported_invalid() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = one_db();
    let _mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();

    let mut older = kube_cluster::read_deploy_file("crds/weft.dev.yaml")
        .unwrap()
        .into_iter()
        .find(|crd| crd["spec"]["names"]["kind"] == "TrafficPolicy")
        .unwrap();
    let rules = older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["outlierDetection"]["x-kubernetes-validations"]
        .as_array_mut()
        .unwrap();
    let before = rules.len();
    rules.retain(|rule| rule["message"] != "baseEjectionTime must be longer than 0s");
    assert_eq!(rules.len(), before - 1, "the rule this test removes");
    apply_objects(&client, &[older]).await.unwrap();

    let bad = json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": "eject-now", "namespace": "shop" },
        "spec": { "service": "db", "outlierDetection": { "baseEjectionTime": "0s" } },
    });
    // The API server takes a moment to serve the older schema.
    let deadline = tokio::time::Instant::now() + weft_testbed::CONFIG_WAIT;
    while kube_cluster::apply_object(&client, &bad).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never admitted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    apply_objects(
        &client,
        &[json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "db", "namespace": "shop" },
            "spec": { "selector": { "matchLabels": { "app": "db" } }, "rules": [{}] },
        })],
    )
    .await
    .unwrap();

    wait_for_condition(
        &client,
        "trafficpolicies",
        "shop",
        "eject-now",
        "Accepted",
        |c| {
            c.status == "False"
                && c.reason == "Invalid"
                && c.message
                    .contains("outlierDetection.baseEjectionTime: must be longer than 0s")
        },
    )
    .await
    .unwrap();
    wait_for_condition(
        &client,
        "authorizationpolicies",
        "shop",
        "db",
        "Accepted",
        |c| c.status == "True",
    )
    .await
    .unwrap();
}
