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
use weft_testbed::{PodSpec, ServiceSpec, Testbed, WeftMesh};

/// Blocking testbed calls off the async test's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_reports_on_each_policy_in_its_status() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = Testbed::builder()
        .node("node-1")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "db-1",
            service_account: "db",
            labels: &[("app", "db")],
            meshed: true,
        })
        .service(ServiceSpec {
            namespace: "shop",
            name: "db",
            port: 5432,
            target_port: 5432,
            selector: &[("app", "db")],
        })
        .build()
        .unwrap();
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
