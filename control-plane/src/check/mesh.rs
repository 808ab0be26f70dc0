//! The post-install checks from what the control plane's replicas report
//! on their monitoring port (the dashboard's JSON): a replica is asked
//! directly (`--url`) or through the API server's pod proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::body::Bytes;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::{CheckArgs, CheckResult, Installation};

/// The control plane's monitoring port.
const MONITORING_PORT: u16 = 15014;
/// The label the chart gives the control plane's pods.
pub(super) const CONTROL_PLANE_SELECTOR: &str = "app.kubernetes.io/name=weft-control-plane";

/// One control-plane replica and how to reach its monitoring port.
pub(super) enum Replica {
    /// At `http://<authority>`.
    Direct { url: String, authority: String },
    /// Through the API server: `pods/<name>:15014/proxy`.
    Proxied {
        client: kube::Client,
        namespace: String,
        pod: String,
    },
}

impl Replica {
    fn name(&self) -> String {
        match self {
            Replica::Direct { url, .. } => url.clone(),
            Replica::Proxied { namespace, pod, .. } => format!("pod {namespace}/{pod}"),
        }
    }

    /// GETs `path`: the body of a 200 answer.
    pub(super) async fn get(&self, path: &str, timeout: Duration) -> Result<Bytes, String> {
        match self {
            Replica::Direct { authority, .. } => {
                crate::http_get::get(authority, path, timeout).await
            }
            Replica::Proxied {
                client,
                namespace,
                pod,
            } => {
                let uri = format!(
                    "/api/v1/namespaces/{namespace}/pods/{pod}:{MONITORING_PORT}/proxy{path}"
                );
                let request = http::Request::get(uri)
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                match tokio::time::timeout(timeout, client.request_text(request)).await {
                    Ok(Ok(text)) => Ok(Bytes::from(text)),
                    Ok(Err(error)) => Err(format!(
                        "GET {path} through the API server: {}",
                        super::said(&error)
                    )),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                }
            }
        }
    }

    pub(super) async fn get_json(&self, path: &str, timeout: Duration) -> Result<Value, String> {
        let body = self.get(path, timeout).await?;
        serde_json::from_slice(&body).map_err(|e| format!("{path}: not JSON: {e}"))
    }
}

/// The replicas to ask: those given with `--url`, else every control-plane
/// pod in weft's namespace, through the API server.
pub(super) async fn replicas(
    args: &CheckArgs,
    client: Option<&kube::Client>,
    installation: &Installation,
) -> Result<Vec<Replica>, CheckResult> {
    const CHECK: &str = "control plane ready";
    if !args.urls.is_empty() {
        return args
            .urls
            .iter()
            .map(|url| {
                let authority = url
                    .strip_prefix("http://")
                    .ok_or_else(|| {
                        CheckResult::fail(
                            CHECK,
                            format!("{url}: only http:// addresses (the monitoring port)"),
                            "pass e.g. --url http://127.0.0.1:15014",
                        )
                    })?
                    .trim_end_matches('/')
                    .to_owned();
                Ok(Replica::Direct {
                    url: url.clone(),
                    authority,
                })
            })
            .collect();
    }
    let Some(client) = client else {
        return Err(CheckResult::fail(
            CHECK,
            "no --url and no API server to find the control plane through".into(),
            "set KUBECONFIG, or pass --url (e.g. after kubectl -n weft-system port-forward deploy/weft-control-plane 15014)",
        ));
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &installation.namespace);
    let listed = pods
        .list(&ListParams::default().labels(CONTROL_PLANE_SELECTOR))
        .await
        .map_err(|error| {
            CheckResult::fail(
                CHECK,
                format!(
                    "listing the control plane's pods in {}: {}",
                    installation.namespace,
                    super::said(&error)
                ),
                "is weft installed in this namespace (--namespace)? can you list its pods?",
            )
        })?;
    let replicas: Vec<Replica> = listed
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| pod.metadata.name)
        .map(|pod| Replica::Proxied {
            client: client.clone(),
            namespace: installation.namespace.clone(),
            pod,
        })
        .collect();
    if replicas.is_empty() {
        return Err(CheckResult::fail(
            CHECK,
            format!(
                "no control-plane pod ({CONTROL_PLANE_SELECTOR}) in {}",
                installation.namespace
            ),
            "install weft (helm install weft deploy/helm/weft -n weft-system --create-namespace), or name its namespace with --namespace",
        ));
    }
    Ok(replicas)
}

/// The node proxies' DaemonSet has a ready proxy on every node it should
/// run on (a node without meshed pods yet included).
pub(super) async fn proxies_scheduled(client: &kube::Client, namespace: &str) -> CheckResult {
    const CHECK: &str = "node proxies ready";
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let status = match daemonsets.get(crate::mesh::NODE_PROXY_DAEMONSET).await {
        Ok(daemonset) => daemonset.status.unwrap_or_default(),
        Err(error) => {
            return CheckResult::fail(
                CHECK,
                format!(
                    "reading DaemonSet {namespace}/{}: {}",
                    crate::mesh::NODE_PROXY_DAEMONSET,
                    super::said(&error)
                ),
                "is weft installed in this namespace (--namespace)?",
            );
        }
    };
    let (desired, ready) = (status.desired_number_scheduled, status.number_ready);
    if ready >= desired && desired > 0 {
        CheckResult::pass(CHECK, format!("{ready} of {desired} ready"))
    } else {
        CheckResult::fail(
            CHECK,
            format!("{ready} of {desired} ready"),
            &format!(
                "kubectl -n {namespace} get pods -l app.kubernetes.io/name=weft-node-proxy -o wide, and the log of those not ready"
            ),
        )
    }
}

/// The checks of the installed mesh, and the nodes whose proxy is
/// connected (where the test connection can run).
pub(super) async fn run(
    replicas: &[Replica],
    args: &CheckArgs,
    namespace: &str,
) -> (Vec<CheckResult>, Vec<String>) {
    let timeout = Duration::from_secs(args.timeout_seconds);
    let mut results = Vec::new();
    let mut nodes: Vec<Value> = Vec::new();
    let mut policies: Option<Value> = None;
    let mut manifests: Option<Value> = None;
    let mut reached = 0;
    for replica in replicas {
        let name = replica.name();
        let ready = replica.get("/ready", timeout).await;
        match &ready {
            Ok(_) => results.push(CheckResult::pass(
                "control plane ready",
                format!("{name} is ready"),
            )),
            Err(error) => results.push(CheckResult::fail(
                "control plane ready",
                format!("{name}: {error}"),
                &format!("check the control plane's pods and log (kubectl -n {namespace} logs deploy/weft-control-plane)"),
            )),
        }
        if ready.is_err() {
            continue;
        }
        reached += 1;
        match replica.get_json("/api/nodes", timeout).await {
            Ok(Value::Array(listed)) => nodes.extend(listed),
            Ok(_) => results.push(CheckResult::fail(
                "control plane ready",
                format!("{name}: /api/nodes is not a list"),
                "is this weft's monitoring port (15014)?",
            )),
            Err(error) => results.push(CheckResult::fail(
                "control plane ready",
                format!("{name}: {error}"),
                "is this weft's monitoring port (15014)?",
            )),
        }
        if policies.is_none() {
            policies = replica.get_json("/api/policies", timeout).await.ok();
        }
        if manifests.is_none() {
            manifests = replica.get_json("/debug/manifests", timeout).await.ok();
        }
    }
    if reached == 0 {
        return (results, Vec::new());
    }
    let nodes = merge_replicas(nodes);
    let connected = nodes
        .iter()
        .filter(|(_, n)| n["connected"] == true)
        .map(|(name, _)| name.clone())
        .collect();
    results.extend(node_checks(
        &nodes,
        args.min_certificate_validity_seconds,
        namespace,
    ));
    results.push(manifest_check(manifests.as_ref()));
    results.push(policy_check(policies.as_ref()));
    (results, connected)
}

/// Local manifests the control plane refused (on Kubernetes the API server
/// refuses them instead, and the list is empty).
fn manifest_check(problems: Option<&Value>) -> CheckResult {
    let Some(problems) = problems else {
        return CheckResult::fail(
            "manifests read",
            "the control plane did not list the manifests it refused (/debug/manifests)".into(),
            "is this weft's monitoring port (15014)?",
        );
    };
    let problems: Vec<&str> = Some(problems)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if problems.is_empty() {
        CheckResult::pass("manifests read", "no manifest refused".into())
    } else {
        CheckResult::fail(
            "manifests read",
            problems.join("; "),
            "fix each file as its problem says; the control plane keeps its last good objects meanwhile",
        )
    }
}

/// The nodes as every replica listed them, one entry per node, by name
/// (see [`crate::dashboard::merge_nodes`]).
fn merge_replicas(listed: Vec<Value>) -> BTreeMap<String, Value> {
    crate::dashboard::merge_nodes([Value::Array(listed)])
        .into_iter()
        .filter_map(|node| Some((node["name"].as_str()?.to_owned(), node)))
        .collect()
}

fn node_checks(
    nodes: &BTreeMap<String, Value>,
    min_validity: i64,
    namespace: &str,
) -> Vec<CheckResult> {
    let names = |f: &dyn Fn(&Value) -> bool| -> Vec<String> {
        nodes
            .iter()
            .filter(|(_, n)| f(n))
            .map(|(name, _)| name.clone())
            .collect()
    };
    let mut results = Vec::new();
    let unserved = names(&|n| n["pods"].as_u64().unwrap_or(0) > 0 && n["connected"] != true);
    results.push(if unserved.is_empty() {
        CheckResult::pass(
            "a proxy on every node",
            format!("{} nodes, each with a connected proxy", nodes.len()),
        )
    } else {
        CheckResult::fail(
            "a proxy on every node",
            format!(
                "no proxy is connected on {} (their meshed pods' traffic is held)",
                unserved.join(", ")
            ),
            &format!("check the weft-node-proxy pod on those nodes (kubectl -n {namespace} get pods -o wide) and its log; with --url, give every control-plane replica's monitoring address (a proxy may hold its stream on another replica)"),
        )
    });
    let behind: Vec<String> = nodes
        .iter()
        .filter(|(_, n)| n["connected"] == true && n["up_to_date"] != true)
        .map(|(name, n)| {
            format!(
                "{name} (applied v{} of v{})",
                n["acked_version"], n["sent_version"]
            )
        })
        .collect();
    let refused: Vec<String> = nodes
        .iter()
        .filter_map(|(name, n)| {
            let nack = &n["last_nack"];
            let version = nack["version"].as_u64()?;
            (version >= n["acked_version"].as_u64().unwrap_or(0)).then(|| {
                format!(
                    "{name} refused v{version}: {}",
                    nack["reason"].as_str().unwrap_or("")
                )
            })
        })
        .collect();
    results.push(if behind.is_empty() && refused.is_empty() {
        CheckResult::pass(
            "every proxy on its latest config",
            "no proxy is behind or refused its config".into(),
        )
    } else {
        CheckResult::fail(
            "every proxy on its latest config",
            behind.into_iter().chain(refused).collect::<Vec<_>>().join("; "),
            "a refusal names the entry the proxy could not apply: fix that object (kubectl get authz,mtls,tp -A); a proxy behind may be overloaded or its stream stuck",
        )
    });
    let mut certificates = 0;
    let mut short: Vec<String> = Vec::new();
    for (name, node) in nodes {
        for certificate in node["certificates"].as_array().into_iter().flatten() {
            certificates += 1;
            let left = certificate["expires_in_seconds"]
                .as_i64()
                .unwrap_or(i64::MIN);
            if left < min_validity {
                short.push(format!(
                    "{} on {name}: {}",
                    certificate["identity"].as_str().unwrap_or("?"),
                    if left <= 0 {
                        "expired".to_owned()
                    } else {
                        format!("{left} s left")
                    }
                ));
            }
        }
    }
    // A proxy reports a certificate half a second after it gets it, so a
    // node can run meshed pods whose certificates are still being signed:
    // said, not failed.
    let unreported = names(&|n| {
        n["connected"] == true
            && n["pods"].as_u64().unwrap_or(0) > 0
            && n["certificates"].as_array().is_none_or(Vec::is_empty)
    });
    results.push(if short.is_empty() {
        let mut detail =
            format!("{certificates} certificates, each valid for at least {min_validity} s");
        if !unreported.is_empty() {
            detail += &format!(
                "; none reported yet by {} (a proxy reports its certificates as it gets them: run check again in a few seconds)",
                unreported.join(", ")
            );
        }
        CheckResult::pass("certificates valid", detail)
    } else {
        CheckResult::fail(
            "certificates valid",
            short.join("; "),
            "certificates are renewed at half their lifetime: look for refused signing requests (weft_control_plane_certificates_total) and the proxy's log",
        )
    });
    results
}

fn policy_check(policies: Option<&Value>) -> CheckResult {
    let Some(Value::Array(policies)) = policies else {
        return CheckResult::fail(
            "policies accepted",
            "the control plane did not list its policies".into(),
            "is this weft's monitoring port (15014)?",
        );
    };
    let refused: Vec<String> = policies
        .iter()
        .filter_map(|policy| {
            let accepted = policy["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Accepted");
            let Some(accepted) = accepted else {
                return Some(format!(
                    "{} {}: no Accepted condition yet",
                    policy["kind"].as_str().unwrap_or("?"),
                    policy["object"].as_str().unwrap_or("?"),
                ));
            };
            (accepted["status"] != true).then(|| {
                format!(
                    "{} {}: {}",
                    policy["kind"].as_str().unwrap_or("?"),
                    policy["object"].as_str().unwrap_or("?"),
                    accepted["message"].as_str().unwrap_or("")
                )
            })
        })
        .collect();
    if refused.is_empty() {
        CheckResult::pass(
            "policies accepted",
            format!("{} policies, all Accepted", policies.len()),
        )
    } else {
        CheckResult::fail(
            "policies accepted",
            refused.join("; "),
            "fix the policy as its message says (kubectl describe authz <name>); while an AuthorizationPolicy is invalid, the pods it selects refuse every connection",
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::check::render;
    use serde_json::json;

    #[test]
    fn a_node_served_by_either_replica_is_served() {
        let merged = merge_replicas(vec![
            json!({"name": "node-1", "pods": 3, "connected": true, "up_to_date": true}),
            json!({"name": "node-2", "pods": 3, "connected": false}),
            json!({"name": "node-1", "pods": 3, "connected": false}),
            json!({"name": "node-2", "pods": 3, "connected": true, "up_to_date": true}),
            json!({"name": "node-3", "pods": 1, "connected": false}),
        ]);
        let results = node_checks(&merged, 3600, "weft-system");
        assert!(!results[0].passed);
        assert!(results[0].detail.contains("node-3") && !results[0].detail.contains("node-1"));
        assert!(results[1].passed, "{results:?}");
    }

    #[test]
    fn refusals_stale_configs_short_certificates_and_bad_policies_fail_naming_them() {
        let merged = merge_replicas(vec![
            json!({"name": "node-1", "pods": 1, "connected": true, "up_to_date": false,
                   "acked_version": 3, "sent_version": 4,
                   "last_nack": {"version": 4, "reason": "policy shop/x: bad port"},
                   "certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "expires_in_seconds": 60}]}),
        ]);
        let results = node_checks(&merged, 3600, "weft-system");
        assert!(
            results[1]
                .detail
                .contains("refused v4: policy shop/x: bad port"),
            "{results:?}"
        );
        assert!(
            results[2]
                .detail
                .contains("spiffe://cluster.local/ns/a/sa/b on node-1: 60 s left")
        );
        let policies = json!([{"kind": "AuthorizationPolicy", "object": "shop/broken",
            "conditions": [{"type": "Accepted", "status": false, "message": "empty principal pattern"}]}]);
        let result = policy_check(Some(&policies));
        assert!(
            !result.passed
                && result
                    .detail
                    .contains("shop/broken: empty principal pattern")
        );
        assert!(render(&[result]).starts_with("✗ policies accepted: "));
    }
}
