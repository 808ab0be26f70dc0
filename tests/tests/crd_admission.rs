//! CRD admission on a real kube-apiserver: weft's policies, as generated
//! from the Rust types, are accepted with their defaults filled in when
//! valid and refused with a message naming the field when not.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use serde_json::{Value, json};
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::kube_cluster::{apply_object, apply_objects, install_crds};

/// Valid policies are accepted, with the schema's defaults filled in; bad
/// ones are refused with a message that names the field.
#[tokio::test(flavor = "multi_thread")]
async fn policies_are_validated_by_the_api_server() {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    install_crds(&client).await.unwrap();
    apply_objects(
        &client,
        &[json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})],
    )
    .await
    .unwrap();

    for object in [
        authz(json!({})),
        mtls(json!({"mode": "STRICT"})),
        traffic(json!({})),
    ] {
        apply_objects(&client, &[object]).await.unwrap();
    }
    let stored = apply_object(
        &client,
        &authz(json!({"rules": [{"from": {"principals": ["*"]}}]})),
    )
    .await
    .unwrap();
    assert_eq!(stored.data["spec"]["action"], "ALLOW", "the default action");
    let stored = apply_object(
        &client,
        &traffic(json!({"loadBalancing": {}, "outlierDetection": {}})),
    )
    .await
    .unwrap();
    assert_eq!(stored.data["spec"]["loadBalancing"]["mode"], "ROUND_ROBIN");
    assert_eq!(
        stored.data["spec"]["outlierDetection"],
        json!({"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionTime": "5m"})
    );
    let good = [
        authz(json!({"action": "DENY", "rules": [{
            "from": {
                "principals": ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/*", "*/sa/prober"],
                "notNamespaces": ["kube-system"],
                "ipBlocks": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "fd00::7"],
            },
            "to": {"ports": [1, 65535], "notPorts": [22]},
        }]})),
        traffic(json!({
            "connectTimeout": "250ms", "idleTimeout": "1h30m", "maxConnections": 1,
            "retries": {"attempts": 5},
            "outlierDetection": {"consecutiveFailures": 100, "baseEjectionTime": "1s", "maxEjectionTime": "1s"},
            "split": (0..16).map(|i| json!({"service": format!("web-{i}"), "weight": i * 10})).collect::<Vec<_>>(),
        })),
    ];
    for object in good {
        apply_objects(&client, &[object]).await.unwrap();
    }

    let seventeen: Vec<Value> = (0..17)
        .map(|i| json!({"service": format!("web-{i}"), "weight": 1}))
        .collect();
    let bad = [
        (
            authz(json!({"action": "MAYBE"})),
            vec!["spec.action", "\"ALLOW\", \"DENY\", \"AUDIT\""],
        ),
        (
            authz(json!({"rules": [{"to": {"ports": [70000]}}]})),
            vec!["spec.rules[0].to.ports[0]", "65535"],
        ),
        (
            authz(json!({"rules": [{"to": {"notPorts": [0]}}]})),
            vec!["spec.rules[0].to.notPorts[0]", "greater than or equal to 1"],
        ),
        (
            authz(json!({"rules": [{"from": {"principals": ["spiffe://cluster.local/*/sa/x"]}}]})),
            vec!["spec.rules[0].from.principals[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"principals": ["cluster.local/ns/a/sa/b"]}}]})),
            vec!["spec.rules[0].from.principals[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"namespaces": ["Not_A_Namespace"]}}]})),
            vec!["spec.rules[0].from.namespaces[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"ipBlocks": ["10.0.0.0/33"]}}]})),
            vec!["spec.rules[0].from.ipBlocks[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"notIpBlocks": ["999.1.1.1"]}}]})),
            vec![
                "spec.rules[0].from.notIpBlocks",
                "must be IP addresses or CIDRs",
            ],
        ),
        (
            authz(json!({"selector": {"matchLabels": {}}})),
            vec!["spec.selector.matchLabels"],
        ),
        (
            authz(json!({"acton": "DENY"})),
            vec![".spec.acton", "not declared in schema"],
        ),
        (
            mtls(json!({"mode": "LOOSE"})),
            vec!["spec.mode", "\"STRICT\", \"PERMISSIVE\""],
        ),
        (
            mtls(json!({"selector": {"matchLabels": {"app": "web"}}})),
            vec!["spec.mode", "Required value"],
        ),
        (
            traffic(json!({"split": [{"service": "web", "weight": -1}]})),
            vec!["spec.split[0].weight", "greater than or equal to 0"],
        ),
        (
            traffic(json!({"split": [{"service": "web", "weight": 1001}]})),
            vec!["spec.split[0].weight", "1000"],
        ),
        (
            traffic(json!({"split": seventeen})),
            vec!["spec.split", "16"],
        ),
        (
            traffic(
                json!({"split": [{"service": "a", "weight": 1}, {"service": "a", "weight": 2}]}),
            ),
            vec!["spec.split", "duplicate entries for key [service=\"a\"]"],
        ),
        (
            traffic(json!({"split": [{"service": "a", "weight": 0}]})),
            vec!["spec.split", "at least one entry with a weight above 0"],
        ),
        (
            traffic(json!({"connectTimeout": "5 minutes"})),
            vec!["spec.connectTimeout", "should match"],
        ),
        (
            traffic(json!({"connectTimeout": "0s"})),
            vec!["spec.connectTimeout", "longer than 0s"],
        ),
        (
            traffic(json!({"idleTimeout": "1d"})),
            vec!["spec.idleTimeout"],
        ),
        (
            traffic(json!({"maxConnections": 0})),
            vec!["spec.maxConnections"],
        ),
        (
            traffic(json!({"retries": {"attempts": 6}})),
            vec!["spec.retries.attempts", "less than or equal to 5"],
        ),
        (
            traffic(json!({"outlierDetection": {"consecutiveFailures": 0}})),
            vec!["spec.outlierDetection.consecutiveFailures"],
        ),
        (
            traffic(
                json!({"outlierDetection": {"baseEjectionTime": "1m", "maxEjectionTime": "30s"}}),
            ),
            vec![
                "spec.outlierDetection.maxEjectionTime",
                "must not be shorter than baseEjectionTime",
            ],
        ),
        (
            traffic(json!({"service": "Bad_Name"})),
            vec!["spec.service"],
        ),
    ];
    let mut failures = Vec::new();
    for (object, wanted) in bad {
        match apply_object(&client, &object).await {
            Ok(_) => failures.push(format!("accepted: {}", object["spec"])),
            Err(kube::Error::Api(status)) => {
                let message = &status.message;
                eprintln!("refused {}: {message}", object["spec"]);
                // 422 from validation; a field the schema lacks or a duplicate list
                // key fails earlier, in server-side apply (500).
                if !wanted.iter().all(|w| message.contains(w)) {
                    failures.push(format!(
                        "{}: got {} {message:?}, wanted {wanted:?}",
                        object["spec"], status.code
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", object["spec"])),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn authz(spec: Value) -> Value {
    policy("AuthorizationPolicy", "authz", spec)
}

fn mtls(spec: Value) -> Value {
    policy("MtlsPolicy", "mtls", spec)
}

fn traffic(mut spec: Value) -> Value {
    if spec.get("service").is_none() {
        spec["service"] = json!("web");
    }
    policy("TrafficPolicy", "traffic", spec)
}

fn policy(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}
