//! The other replicas' views. Each proxy holds its config stream, and so
//! reports its health and traffic, on one replica: a replica alone knows
//! only its own proxies. So the node and traffic pages ask the other
//! replicas for their own views (`?own=1`, which never asks further) and
//! merge them: a node is connected if any replica holds its stream, and a
//! pair's connections are counted once, from the destination's report
//! where there is one (as one replica counts them).
//!
//! On Kubernetes the other replicas are the control plane's other running
//! pods in its namespace, from the cluster the control plane watches
//! anyway; `--dashboard-peers` names them elsewhere. A replica that does
//! not answer within `--dashboard-peer-timeout-ms` is left out, and the
//! overview says which.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{ClusterState, in_namespace};

/// The label of the control plane's pods.
const CONTROL_PLANE_APP: &str = "weft-control-plane";

/// Where the other replicas are.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// Named by `--dashboard-peers`.
    pub fixed: Vec<SocketAddr>,
    /// The control plane's namespace, where its pods run.
    pub namespace: String,
    /// This replica's pod name (`HOSTNAME` on Kubernetes), not asked.
    pub own_pod: Option<String>,
    /// The monitoring port of every replica.
    pub port: u16,
    /// How long a replica's answer may take.
    pub timeout: Duration,
}

/// The other replicas' answers to one path: those that answered, and why
/// the others did not.
#[derive(Debug, Default)]
pub struct PeerViews {
    /// Each answering replica's JSON.
    pub views: Vec<Value>,
    /// `address: why` of each replica that did not answer.
    pub unanswered: Vec<String>,
}

impl Peers {
    /// The other replicas' monitoring addresses.
    pub fn addresses(&self, cluster: &ClusterState) -> Vec<SocketAddr> {
        let mut addresses = self.fixed.clone();
        let prefix = format!("{}/", self.namespace);
        for (key, pod) in in_namespace(&cluster.pods, &self.namespace) {
            let key = key.to_string();
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            let labels = pod.metadata.labels.as_ref();
            let ours = labels
                .and_then(|l| l.get("app.kubernetes.io/name"))
                .is_some_and(|app| app == CONTROL_PLANE_APP);
            if !ours || self.own_pod.as_deref() == Some(name) {
                continue;
            }
            let status = pod.status.as_ref();
            let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
            let ip = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            if let (true, Some(ip)) = (running, ip) {
                addresses.push(SocketAddr::new(ip, self.port));
            }
        }
        addresses.sort_unstable();
        addresses.dedup();
        addresses
    }

    /// Asks every address for `path` (with `own=1`), at once. Blocks: call
    /// it off the async workers, inside a runtime (the pages are made on
    /// blocking threads); without one, nothing is asked.
    pub fn fetch(&self, addresses: &[SocketAddr], path: &str) -> PeerViews {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return PeerViews::default();
        };
        if addresses.is_empty() {
            return PeerViews::default();
        }
        let separator = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{separator}own=1");
        let asks = addresses.iter().map(|address| {
            let path = path.clone();
            async move {
                let authority = address.to_string();
                let answer = crate::http_get::get(&authority, &path, self.timeout)
                    .await
                    .and_then(|body| {
                        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
                    });
                answer.map_err(|error| format!("{authority}: {error}"))
            }
        });
        let answers = runtime.block_on(futures::future::join_all(asks));
        let mut views = PeerViews::default();
        for answer in answers {
            match answer {
                Ok(view) => views.views.push(view),
                Err(error) => views.unanswered.push(error),
            }
        }
        views
    }
}

/// The nodes as every replica listed them, one entry per node: a node is
/// connected if any replica holds its proxy's stream, and that replica's
/// entry is the node's. Sorted by name.
pub fn merge_nodes(lists: impl IntoIterator<Item = Value>) -> Vec<Value> {
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    for node in lists.into_iter().flat_map(|list| match list {
        Value::Array(nodes) => nodes,
        _ => Vec::new(),
    }) {
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
    nodes.into_values().collect()
}

/// The traffic pairs as every replica summed them, each counted once: where
/// some replica has the destination's report of a pair, the source's
/// reports of it are left out (each proxy reports to one replica, so the
/// two ends of one connection may report to two).
pub fn merge_edges(lists: impl IntoIterator<Item = Value>) -> Vec<Value> {
    let key = |edge: &Value| {
        [
            "source",
            "destination",
            "source_principal",
            "service",
            "security",
        ]
        .map(|field| edge[field].as_str().unwrap_or("").to_owned())
    };
    let mut pairs: BTreeMap<[String; 5], (bool, Value)> = BTreeMap::new();
    for edge in lists.into_iter().flat_map(|list| match list {
        Value::Array(edges) => edges,
        _ => Vec::new(),
    }) {
        let by_destination = edge["reported_by"] == "destination";
        match pairs.get_mut(&key(&edge)) {
            None => {
                pairs.insert(key(&edge), (by_destination, edge));
            }
            Some((held_by_destination, held)) => {
                if by_destination && !*held_by_destination {
                    *held_by_destination = true;
                    *held = edge;
                } else if by_destination == *held_by_destination {
                    add(held, &edge);
                }
            }
        }
    }
    pairs.into_values().map(|(_, edge)| edge).collect()
}

/// Adds `more`'s counts to `held`'s.
fn add(held: &mut Value, more: &Value) {
    for field in ["opened", "closed", "bytes_received", "bytes_sent"] {
        let sum = held[field]
            .as_u64()
            .unwrap_or(0)
            .saturating_add(more[field].as_u64().unwrap_or(0));
        held[field] = json!(sum);
    }
    for field in ["denied", "audited"] {
        let Some(counts) = more[field].as_object() else {
            continue;
        };
        for (policy, n) in counts {
            let sum = held[field][policy]
                .as_u64()
                .unwrap_or(0)
                .saturating_add(n.as_u64().unwrap_or(0));
            held[field][policy] = json!(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_node_is_connected_if_any_replica_holds_its_stream() {
        let merged = merge_nodes([
            json!([{"name": "node-1", "connected": true, "acked_version": 3},
                   {"name": "node-2", "connected": false}]),
            json!([{"name": "node-1", "connected": false},
                   {"name": "node-2", "connected": true, "acked_version": 7}]),
            json!({"not": "a list"}),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0]["acked_version"], 3);
        assert_eq!(merged[1]["acked_version"], 7);
    }

    #[test]
    fn a_pair_is_counted_once_from_its_destination() {
        let edge = |by: &str, opened: u64, denied: u64| {
            json!({"source": "shop/web", "destination": "shop/db", "source_principal": "p",
                   "service": "", "security": "mutual_tls", "reported_by": by,
                   "opened": opened, "closed": opened, "bytes_received": 1, "bytes_sent": 2,
                   "denied": {"shop/deny": denied}, "audited": {}})
        };
        // The source's proxy reported to one replica, the destination's
        // proxies (two pods of db) to two others.
        let merged = merge_edges([
            json!([edge("source", 5, 0)]),
            json!([edge("destination", 3, 1)]),
            json!([edge("destination", 2, 2)]),
        ]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0]["opened"], 5);
        assert_eq!(merged[0]["denied"]["shop/deny"], 3);
        assert_eq!(merged[0]["reported_by"], "destination");
    }

    #[test]
    fn the_other_running_replicas_are_found_in_the_cluster() {
        let cluster = ClusterState::from_yaml(
            "apiVersion: v1
kind: Pod
metadata: {name: cp-a, namespace: weft-system, labels: {app.kubernetes.io/name: weft-control-plane}}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cp-b, namespace: weft-system, labels: {app.kubernetes.io/name: weft-control-plane}}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: cp-c, namespace: weft-system, labels: {app.kubernetes.io/name: weft-control-plane}}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app.kubernetes.io/name: weft-control-plane}}
status: {phase: Running, podIP: 10.0.0.9}
",
        );
        let peers = Peers {
            fixed: vec!["192.0.2.1:15014".parse().unwrap()],
            namespace: "weft-system".into(),
            own_pod: Some("cp-a".into()),
            port: 15014,
            timeout: Duration::from_secs(1),
        };
        let found: Vec<String> = peers
            .addresses(&cluster)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["10.0.0.2:15014", "192.0.2.1:15014"]);
    }
}
