//! `weft-control-plane check`: is the installed mesh healthy? It asks the
//! control plane's monitoring port (the dashboard's JSON, the same answers
//! the dashboard draws) and prints one line per check, ✓ or ✗ with the
//! reason and what to do; the exit code says whether all passed, `-o json`
//! prints the same for machines.
//!
//! The checks: the control plane answers and is ready; every node that
//! runs pods of the mesh has a proxy; every proxy applied its latest config
//! and its last word is not a refusal; every certificate a proxy holds is
//! valid for longer than `--min-certificate-validity-seconds`; no local
//! manifest was refused; every policy is Accepted. A proxy holds its stream on one replica: give every
//! replica's address (`--url` again), and the nodes are the union.
//!
//! Not here yet: the pre-install checks against the API server (version,
//! CRDs, RBAC, node kernels) and the test connection through a throwaway
//! namespace.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::body::Bytes;
use serde::Serialize;
use serde_json::Value;

/// What to check, and where.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// A control-plane replica's monitoring address, e.g.
    /// `http://127.0.0.1:15014` (a `kubectl port-forward`); once per replica.
    #[arg(long = "url", default_value = "http://127.0.0.1:15014")]
    pub urls: Vec<String>,
    /// A certificate valid for less than this long fails the check, in
    /// seconds (they are renewed at half their lifetime, 12 h by default).
    #[arg(long, default_value_t = 3600)]
    pub min_certificate_validity_seconds: i64,
    /// How long one request may take, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_seconds: u64,
    /// `text` (✓/✗ lines) or `json`.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = CheckOutput::Text)]
    pub output: CheckOutput,
}

/// How the results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckOutput {
    /// One line per check.
    Text,
    /// One JSON document.
    Json,
}

/// One check's result.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    /// What was checked.
    pub check: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why it failed (or what it found).
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl CheckResult {
    fn pass(check: &str, detail: String) -> CheckResult {
        CheckResult {
            check: check.to_owned(),
            passed: true,
            detail,
            fix: String::new(),
        }
    }

    fn fail(check: &str, detail: String, fix: &str) -> CheckResult {
        CheckResult {
            check: check.to_owned(),
            passed: false,
            detail,
            fix: fix.to_owned(),
        }
    }
}

/// Runs every check; the results in order.
pub async fn run(args: &CheckArgs) -> Vec<CheckResult> {
    let timeout = Duration::from_secs(args.timeout_seconds);
    let mut results = Vec::new();
    let mut nodes: Vec<Value> = Vec::new();
    let mut policies: Option<Value> = None;
    let mut manifests: Option<Value> = None;
    let mut reached = 0;
    for url in &args.urls {
        let ready = get(url, "/ready", timeout).await;
        match &ready {
            Ok(_) => results.push(CheckResult::pass(
                "control plane ready",
                format!("{url} is ready"),
            )),
            Err(error) => results.push(CheckResult::fail(
                "control plane ready",
                format!("{url}: {error}"),
                "check the control plane's pods and log (kubectl -n weft-system logs deploy/weft-control-plane)",
            )),
        }
        if ready.is_err() {
            continue;
        }
        reached += 1;
        match get_json(url, "/api/nodes", timeout).await {
            Ok(Value::Array(listed)) => nodes.extend(listed),
            Ok(_) => {}
            Err(error) => results.push(CheckResult::fail(
                "control plane ready",
                format!("{url}/api/nodes: {error}"),
                "is this weft's monitoring port (15014)?",
            )),
        }
        if policies.is_none() {
            policies = get_json(url, "/api/policies", timeout).await.ok();
            manifests = get_json(url, "/debug/manifests", timeout).await.ok();
        }
    }
    if reached == 0 {
        return results;
    }
    results.extend(node_checks(
        &merge_replicas(nodes),
        args.min_certificate_validity_seconds,
    ));
    results.push(manifest_check(manifests.as_ref()));
    results.push(policy_check(policies.as_ref()));
    results
}

/// Local manifests the control plane refused (on Kubernetes the API server
/// refuses them instead, and the list is empty).
fn manifest_check(problems: Option<&Value>) -> CheckResult {
    let problems: Vec<&str> = problems
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

/// The nodes as every replica listed them, one entry per node: a node is
/// connected if any replica holds its proxy's stream, and that replica's
/// entry is the node's.
fn merge_replicas(listed: Vec<Value>) -> BTreeMap<String, Value> {
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    for node in listed {
        let Some(name) = node["name"].as_str().map(str::to_owned) else {
            continue;
        };
        let connected = node["connected"] == true;
        match nodes.get(&name) {
            Some(held) if held["connected"] == true || !connected => {}
            _ => {
                nodes.insert(name, node);
            }
        }
    }
    nodes
}

fn node_checks(nodes: &BTreeMap<String, Value>, min_validity: i64) -> Vec<CheckResult> {
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
            "check the weft-node-proxy pod on those nodes (kubectl -n weft-system get pods -o wide) and its log; with several control-plane replicas, pass every replica's --url",
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
    results.push(if short.is_empty() {
        CheckResult::pass(
            "certificates valid",
            format!("{certificates} certificates, each valid for at least {min_validity} s"),
        )
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
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Accepted")?;
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

/// The results as the user reads them.
pub fn render(results: &[CheckResult]) -> String {
    let mut out = String::new();
    for result in results {
        let mark = if result.passed { "✓" } else { "✗" };
        out += &format!("{mark} {}: {}\n", result.check, result.detail);
        if !result.fix.is_empty() {
            out += &format!("    → {}\n", result.fix);
        }
    }
    out
}

async fn get_json(url: &str, path: &str, timeout: Duration) -> Result<Value, String> {
    let body = get(url, path, timeout).await?;
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

/// GETs `path` from the control plane at `url` (`http://host:port`): the
/// body of a 200 answer.
async fn get(url: &str, path: &str, timeout: Duration) -> Result<Bytes, String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// addresses (the monitoring port)"))?
        .trim_end_matches('/');
    match crate::http_get::get(authority, path, timeout).await? {
        (hyper::StatusCode::OK, body) => Ok(body),
        (status, _) => Err(format!("GET {path} answered {status}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
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
        let results = node_checks(&merged, 3600);
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
        let results = node_checks(&merged, 3600);
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
