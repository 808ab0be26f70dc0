//! The dashboard on the monitoring port (15014): a small web app, embedded
//! in the binary (no internet, nothing else to install), and the read-only
//! JSON it is drawn from. What it shows comes from what this control plane
//! already holds: the node registry (streams, versions, NACKs, and the
//! certificates each proxy reports), the published mesh (workloads, their
//! identity, mTLS mode and policies), the policies' status conditions, and
//! the traffic the proxies report up their config streams
//! ([`crate::reported_traffic`]). The explain form asks the mesh being
//! served, with the same code as `weft-control-plane explain`.
//!
//! Everything shown is escaped by the page (text nodes only): workload,
//! policy and Service names come from the cluster and the proxies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use weft_api::v1 as pb;

use crate::cluster::ClusterState;
use crate::explain::ExplainArgs;
use crate::fanout::Published;
use crate::node_health::{self, NodeHealth, seconds};
use crate::registry::NodeRegistry;
use crate::reported_traffic::ReportedTraffic;

mod peers;
pub use peers::{Peers, merge_nodes};

/// The page and its assets, by path.
const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("index.html")),
    (
        "/dashboard",
        "text/html; charset=utf-8",
        include_str!("index.html"),
    ),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        include_str!("app.js"),
    ),
    (
        "/dashboard/style.css",
        "text/css; charset=utf-8",
        include_str!("style.css"),
    ),
];

/// Workloads listed at most per page of `/api/workloads` (a cluster may
/// hold 50,000 pods; the page narrows by namespace and name).
const MAX_WORKLOADS_LISTED: usize = 500;

/// Pairs listed at most by `/api/traffic` (the busiest; the page narrows
/// by namespace).
const MAX_EDGES_LISTED: usize = 1_000;

/// What the dashboard reads.
pub struct Dashboard {
    /// Node proxies and what they reported.
    pub nodes: Arc<NodeRegistry>,
    /// The mesh being served.
    pub mesh: watch::Receiver<Arc<Published>>,
    /// The cluster as the source holds it, for the policies' conditions.
    pub cluster: watch::Receiver<Arc<ClusterState>>,
    /// The proxies' traffic reports.
    pub traffic: Arc<ReportedTraffic>,
    /// The control plane's namespace (mesh-wide policies live there).
    pub mesh_namespace: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The policies' conditions of the last cluster asked about: they take
    /// a while to make for a large cluster, and change only with it.
    pub verdicts: Mutex<Option<Verdicts>>,
    /// The other replicas, whose views the node and traffic pages merge.
    pub peers: Peers,
}

/// Which other replicas were asked for their view, and which did not
/// answer; for traffic, the pairs all of them hold (a pair whose ends
/// report to two replicas counts twice) and the events they left out.
#[derive(Debug, Default)]
struct Asked {
    asked: usize,
    unanswered: Vec<String>,
    pairs_held: u64,
    left_out: u64,
}

/// The policies' conditions, and the cluster they are of.
pub type Verdicts = (Arc<ClusterState>, Arc<Vec<PolicySummary>>);

/// A dashboard answer: status, content type, body.
pub type Answer = (u16, &'static str, String);

impl Dashboard {
    /// The answer to `GET path?query`, if the path is the dashboard's.
    pub fn answer(&self, path: &str, query: Option<&str>) -> Option<Answer> {
        if let Some((_, content_type, body)) = ASSETS.iter().find(|(p, _, _)| *p == path) {
            return Some((200, content_type, (*body).to_owned()));
        }
        let params: BTreeMap<String, String> = query
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let now = SystemTime::now();
        // A replica asked by another answers for itself alone.
        let own = params.contains_key("own");
        let value = match path {
            "/api/overview" => self.overview(own, now),
            "/api/nodes" => json!(self.merged_nodes(own, now).0),
            "/api/workloads" => self.workloads(&params, now),
            "/api/traffic" => self.traffic_page(&params, own, now),
            "/api/policies" => self.policies(),
            "/api/explain" => match self.explain(&params) {
                Ok(value) => value,
                Err(error) => return Some(json_answer(400, &json!({ "error": error }))),
            },
            _ => return None,
        };
        Some(json_answer(200, &value))
    }

    fn overview(&self, own: bool, now: SystemTime) -> Value {
        let (nodes, asked_nodes) = self.merged_nodes(own, now);
        let (edges, asked_traffic) = self.merged_edges(&BTreeMap::new(), own, now);
        let published = self.mesh.borrow().clone();
        let mesh = &published.mesh;
        let meshed = mesh
            .workloads
            .values()
            .filter(|w| w.workload.meshed)
            .count();
        let policies = self.policy_list();
        let not_accepted = policies
            .iter()
            .filter(|p| !p.conditions.first().is_some_and(|c| c.status))
            .count();
        let soonest = nodes
            .iter()
            .flat_map(|n| {
                n["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |c| {
                        (
                            c["not_after"].as_i64().unwrap_or(i64::MAX),
                            &n["name"],
                            &c["identity"],
                        )
                    })
            })
            .min_by_key(|(not_after, _, _)| *not_after);
        let count = |f: &dyn Fn(&Value) -> bool| nodes.iter().filter(|n| f(n)).count();
        let sum = |field: &str| {
            edges
                .iter()
                .map(|e| e[field].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let denied: u64 = edges
            .iter()
            .filter_map(|e| e["denied"].as_object())
            .flat_map(|d| d.values())
            .map(|n| n.as_u64().unwrap_or(0))
            .sum();
        let mut unanswered = asked_nodes.unanswered;
        unanswered.extend(asked_traffic.unanswered);
        unanswered.sort_unstable();
        unanswered.dedup();
        json!({
            "mesh_version": published.version,
            "replicas": {
                "asked": asked_nodes.asked,
                "unanswered": unanswered,
            },
            "nodes": {
                "known": nodes.len(),
                "connected": count(&|n| n["connected"] == true),
                "up_to_date": count(&|n| n["up_to_date"] == true),
                "with_nack": count(&|n| !n["last_nack"].is_null()),
            },
            "workloads": { "total": mesh.workloads.len(), "meshed": meshed },
            "policies": { "total": policies.len(), "not_accepted": not_accepted },
            "soonest_certificate_expiry": soonest.map(|(not_after, node, identity)| json!({
                "node": node, "identity": identity, "not_after": not_after,
                "expires_in_seconds": not_after.saturating_sub(seconds(now)),
            })),
            "traffic": {
                "window_seconds": self.traffic.window_seconds(),
                "edges": edges.len(),
                "connections": sum("opened"),
                "denied": denied,
            },
        })
    }

    /// This replica's nodes, merged with the other replicas' unless `own`.
    fn merged_nodes(&self, own: bool, now: SystemTime) -> (Vec<Value>, Asked) {
        let local = json!(self.nodes_list(now));
        if own {
            return (peers::merge_nodes([local]), Asked::default());
        }
        let (views, asked) = self.ask_peers("/api/nodes");
        (
            peers::merge_nodes(std::iter::once(local).chain(views)),
            asked,
        )
    }

    /// This replica's traffic pairs with an end in `namespace` (if given),
    /// merged with the other replicas' unless `own`.
    fn merged_edges(
        &self,
        params: &BTreeMap<String, String>,
        own: bool,
        now: SystemTime,
    ) -> (Vec<Value>, Asked) {
        let namespace = params.get("namespace").filter(|n| !n.is_empty());
        let mut summary = self.traffic.summary(now);
        let (own_held, own_left_out) = (summary.edges.len() as u64, summary.left_out);
        if let Some(namespace) = namespace {
            let prefix = format!("{namespace}/");
            summary
                .edges
                .retain(|e| e.source.starts_with(&prefix) || e.destination.starts_with(&prefix));
        }
        // One replica's summary counts each pair once already: only other
        // replicas' views need merging in.
        let local: Vec<Value> = summary.edges.iter().map(|e| json!(e)).collect();
        if own {
            let asked = Asked {
                pairs_held: own_held,
                left_out: own_left_out,
                ..Asked::default()
            };
            return (local, asked);
        }
        let path = match namespace {
            Some(namespace) => format!(
                "/api/traffic?limit={MAX_EDGES_LISTED}&namespace={}",
                form_urlencoded::byte_serialize(namespace.as_bytes()).collect::<String>()
            ),
            None => format!("/api/traffic?limit={MAX_EDGES_LISTED}"),
        };
        let (views, mut asked) = self.ask_peers(&path);
        asked.pairs_held = own_held
            + views
                .iter()
                .map(|v| v["total"].as_u64().unwrap_or(0))
                .sum::<u64>();
        asked.left_out = own_left_out
            + views
                .iter()
                .map(|v| v["left_out"].as_u64().unwrap_or(0))
                .sum::<u64>();
        if views.is_empty() {
            return (local, asked);
        }
        let edges = views.into_iter().map(|mut view| view["edges"].take());
        (
            peers::merge_edges(std::iter::once(Value::Array(local)).chain(edges)),
            asked,
        )
    }

    /// The other replicas' answers to `path`.
    fn ask_peers(&self, path: &str) -> (Vec<Value>, Asked) {
        let addresses = self.peers.addresses(&self.cluster.borrow());
        let views = self.peers.fetch(&addresses, path);
        let asked = Asked {
            asked: addresses.len(),
            unanswered: views.unanswered,
            ..Asked::default()
        };
        (views.views, asked)
    }

    fn nodes_list(&self, now: SystemTime) -> Vec<NodeHealth> {
        let mesh = self.mesh.borrow().mesh.clone();
        node_health::nodes(&self.nodes, &mesh, now)
    }

    /// The traffic of the window, narrowed to the pairs with an end in
    /// `namespace` if asked, the busiest `limit` pairs (refused ones
    /// first): 20,000 pairs are 8 MiB of JSON.
    fn traffic_page(&self, params: &BTreeMap<String, String>, own: bool, now: SystemTime) -> Value {
        let window_seconds = self.traffic.window_seconds();
        let (mut edges, asked) = self.merged_edges(params, own, now);
        let limit = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(MAX_EDGES_LISTED)
            .min(MAX_EDGES_LISTED);
        edges.sort_by_key(|e| {
            let refused: u64 = e["denied"]
                .as_object()
                .into_iter()
                .flat_map(|d| d.values())
                .map(|n| n.as_u64().unwrap_or(0))
                .sum();
            std::cmp::Reverse((refused, e["opened"].as_u64().unwrap_or(0)))
        });
        let matching = edges.len();
        edges.truncate(limit);
        json!({
            "window_seconds": window_seconds,
            "edges": edges,
            "matching": matching,
            "total": asked.pairs_held,
            "left_out": asked.left_out,
            "replicas": {"asked": asked.asked, "unanswered": asked.unanswered},
        })
    }

    fn workloads(&self, params: &BTreeMap<String, String>, now: SystemTime) -> Value {
        let namespace = params.get("namespace").filter(|n| !n.is_empty());
        let needle = params.get("q").map(|q| q.to_lowercase());
        let limit = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(MAX_WORKLOADS_LISTED)
            .min(MAX_WORKLOADS_LISTED);
        let statuses = self.nodes.snapshot();
        let mesh = self.mesh.borrow().mesh.clone();
        let matching = mesh.workloads.values().filter(|w| {
            let pod = &w.workload;
            namespace.is_none_or(|n| &pod.namespace == n)
                && needle
                    .as_ref()
                    .is_none_or(|q| pod.uid.to_lowercase().contains(q.as_str()))
        });
        let mut total = 0;
        let mut listed = Vec::new();
        for workload in matching {
            total += 1;
            if listed.len() >= limit {
                continue;
            }
            let pod = &workload.workload;
            let certificate = statuses
                .get(&pod.node)
                .and_then(|s| s.certificates.get(&pod.identity))
                .map(|not_after| json!({
                    "not_after": not_after, "expires_in_seconds": not_after.saturating_sub(seconds(now)),
                }));
            listed.push(json!({
                "uid": pod.uid,
                "namespace": pod.namespace,
                "name": pod.name,
                "workload": pod.workload_name,
                "node": pod.node,
                "ips": pod.ips,
                "meshed": pod.meshed,
                "identity": pod.identity,
                "mtls": if pod.mtls_mode == pb::MtlsMode::Strict as i32 { "STRICT" } else { "PERMISSIVE" },
                "mtls_policy": pod.mtls_policy,
                "policies": pod.authorization_policies,
                "invalid_policies": pod.invalid_authorization_policies,
                "quarantine": pod.quarantine,
                "certificate": certificate,
            }));
        }
        let namespaces: BTreeSet<&str> = mesh
            .workloads
            .values()
            .map(|w| w.workload.namespace.as_str())
            .collect();
        json!({
            "total": total,
            "limit": limit,
            "workloads": listed,
            "namespaces": namespaces,
        })
    }

    fn policy_list(&self) -> Arc<Vec<PolicySummary>> {
        let cluster = self.cluster.borrow().clone();
        let mut cached = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((of, verdicts)) = &*cached
            && Arc::ptr_eq(of, &cluster)
        {
            return verdicts.clone();
        }
        let verdicts: Arc<Vec<PolicySummary>> = Arc::new(
            crate::status::verdicts(&cluster, &self.mesh_namespace)
                .into_iter()
                .map(|((kind, key), conditions)| PolicySummary {
                    kind: format!("{kind:?}"),
                    object: key,
                    conditions: conditions
                        .iter()
                        .map(|c| ConditionSummary {
                            type_: c.type_,
                            status: c.status,
                            reason: c.reason,
                            message: c.message.clone(),
                        })
                        .collect(),
                })
                .collect(),
        );
        *cached = Some((cluster, verdicts.clone()));
        verdicts
    }

    /// The policies and their status conditions (also `/debug/policies`).
    pub fn policies(&self) -> Value {
        json!(*self.policy_list())
    }

    fn explain(&self, params: &BTreeMap<String, String>) -> Result<Value, String> {
        let field = |name: &str| {
            params
                .get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{name} is missing"))
        };
        let args = ExplainArgs {
            from: field("from")?,
            to: field("to")?,
            plaintext: params.get("plaintext").is_some_and(|v| v == "true"),
            from_ip: match params.get("from_ip").filter(|v| !v.is_empty()) {
                Some(ip) => ip
                    .parse()
                    .map_err(|_| format!("from_ip {ip:?} is not an IP"))?,
                None => std::net::IpAddr::from([0, 0, 0, 0]),
            },
        };
        let mesh = self.mesh.borrow().mesh.clone();
        let explanation = crate::explain::explain_in(&mesh, &self.trust_domain, &args)?;
        Ok(json!({ "allowed": explanation.allowed, "report": explanation.report }))
    }
}

/// A policy and its status conditions.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySummary {
    kind: String,
    object: String,
    conditions: Vec<ConditionSummary>,
}

#[derive(Clone, Debug, Serialize)]
struct ConditionSummary {
    #[serde(rename = "type")]
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn json_answer(status: u16, value: &Value) -> Answer {
    let body = serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()));
    (status, "application/json", body)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
