//! Is every node served, and is every proxy current? One answer for the
//! dashboard's node page and for the metrics that alerts are written on
//! (a proxy behind its config, a node with pods and no proxy, the next
//! certificate to expire, whether this replica leads): both read
//! [`nodes`]. Each replica knows the streams it holds; a proxy holds one
//! stream, on one replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;
use tokio::sync::watch;

use crate::fanout::Published;
use crate::mesh::Mesh;
use crate::registry::NodeRegistry;

/// A node and its proxy.
#[derive(Clone, Debug, Serialize)]
pub struct NodeHealth {
    /// The node's name.
    pub name: String,
    /// The mesh's pods on it.
    pub pods: usize,
    /// Whether its proxy holds a config stream.
    pub connected: bool,
    /// Since when (seconds since the epoch).
    pub connected_since: Option<u64>,
    /// The proxy's build.
    pub proxy_version: String,
    /// The last version sent to it, and the last it applied.
    pub sent_version: u64,
    #[allow(missing_docs)]
    pub acked_version: u64,
    /// Connected, and the last version sent is applied.
    pub up_to_date: bool,
    /// The last version it refused, and why.
    pub last_nack: Option<Nack>,
    /// When it last reported its traffic (seconds since the epoch).
    pub last_report: Option<u64>,
    /// The certificates it reported holding.
    pub certificates: Vec<Certificate>,
}

/// A refused version.
#[derive(Clone, Debug, Serialize)]
pub struct Nack {
    /// The version.
    pub version: u64,
    /// The proxy's reason.
    pub reason: String,
}

/// A certificate a proxy holds.
#[derive(Clone, Debug, Serialize)]
pub struct Certificate {
    /// Its SPIFFE identity.
    pub identity: String,
    /// When it expires (seconds since the epoch), and in how long.
    pub not_after: i64,
    #[allow(missing_docs)]
    pub expires_in_seconds: i64,
}

/// Every node a proxy spoke from or a pod of `mesh` runs on, by name: a
/// node with pods and no proxy is one the mesh does not serve.
pub fn nodes(registry: &NodeRegistry, mesh: &Mesh, now: SystemTime) -> Vec<NodeHealth> {
    let statuses = registry.snapshot();
    let mut pods_by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for workload in mesh.workloads.values() {
        *pods_by_node.entry(&workload.workload.node).or_default() += 1;
    }
    let names: BTreeSet<&str> = statuses
        .keys()
        .map(String::as_str)
        .chain(pods_by_node.keys().copied())
        .filter(|name| !name.is_empty())
        .collect();
    let now = seconds(now);
    names
        .into_iter()
        .map(|name| {
            let status = statuses.get(name).cloned().unwrap_or_default();
            let connected = status.streams > 0;
            NodeHealth {
                name: name.to_owned(),
                pods: pods_by_node.get(name).copied().unwrap_or(0),
                connected,
                connected_since: status.connected_since,
                proxy_version: status.proxy_version,
                sent_version: status.sent_version,
                acked_version: status.acked_version,
                up_to_date: connected && status.acked_version == status.sent_version,
                last_nack: status
                    .last_nack
                    .map(|(version, reason)| Nack { version, reason }),
                last_report: status.last_report,
                certificates: status
                    .certificates
                    .into_iter()
                    .map(|(identity, not_after)| Certificate {
                        identity,
                        not_after,
                        expires_in_seconds: not_after.saturating_sub(now),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Seconds since the epoch.
pub fn seconds(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The gauges alerts are written on, computed at each scrape from the node
/// registry and the mesh (a scrape costs one pass over the nodes and the
/// mesh's pods).
#[derive(Debug)]
pub struct HealthMetrics {
    /// Node proxies and what they reported.
    pub registry: Arc<NodeRegistry>,
    /// The mesh being served.
    pub mesh: watch::Receiver<Arc<Published>>,
    /// Whether this replica writes status (holds the Lease); always with
    /// local manifests.
    pub leader: watch::Receiver<bool>,
}

/// A node's value of a gauge by node, if it has one.
type ValueOf = dyn Fn(&NodeHealth) -> Option<i64>;

impl prometheus_client::collector::Collector for HealthMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mesh = self.mesh.borrow().mesh.clone();
        let nodes = nodes(&self.registry, &mesh, SystemTime::now());
        let count = |f: &dyn Fn(&NodeHealth) -> bool| nodes.iter().filter(|n| f(n)).count() as i64;
        let soonest = nodes
            .iter()
            .flat_map(|n| n.certificates.iter().map(|c| c.not_after))
            .min();
        let gauges = [
            (
                "weft_control_plane_proxies_behind",
                "Node proxies on this replica that have not applied the last config version sent to them",
                count(&|n| n.connected && !n.up_to_date),
            ),
            (
                "weft_control_plane_proxies_with_nack",
                "Node proxies on this replica whose last refusal (NACK) is still their latest word",
                count(&|n| {
                    n.last_nack
                        .as_ref()
                        .is_some_and(|nack| nack.version >= n.acked_version)
                }),
            ),
            (
                "weft_control_plane_leader",
                "1 when this replica holds the Lease and writes status, else 0",
                i64::from(*self.leader.borrow()),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        if let Some(soonest) = soonest {
            let gauge = ConstGauge::new(soonest);
            let metric = encoder.encode_descriptor(
                "weft_control_plane_certificate_expiry_soonest_timestamp_seconds",
                "When the first of the workload certificates this replica's proxies hold expires (seconds since the epoch)",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        // By node: a proxy's stream is held by one replica, so whether a
        // node is served is the union over replicas (the alert's
        // `unless on (node)`), which no single replica can count.
        let by_node: [(&str, &str, &ValueOf); 2] = [
            (
                "weft_control_plane_node_pods",
                "Pods of the mesh on each node that runs any (every replica reports every node)",
                &|n| (n.pods > 0).then_some(n.pods as i64),
            ),
            (
                "weft_control_plane_node_proxy_connected",
                "1 for each node whose proxy holds a config stream on this replica",
                &|n| n.connected.then_some(1),
            ),
        ];
        for (name, help, value) in by_node {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for node in &nodes {
                if let Some(value) = value(node) {
                    let labels = [("node", node.name.as_str())];
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use prometheus_client::registry::Registry;
    use weft_api::v1 as pb;

    #[test]
    fn the_gauges_count_what_the_node_list_shows() {
        let mut metrics = Registry::default();
        let registry = NodeRegistry::new(&mut metrics);
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {weft.dev/mesh: enabled}}\n",
        );
        for n in 1..=3 {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p-{n}, namespace: a}}\n\
                 spec: {{nodeName: node-{n}, serviceAccountName: b, containers: []}}\n\
                 status: {{phase: Running, podIP: 10.0.0.{n}}}\n"
            );
        }
        let trust = pb::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: String::new(),
        };
        let mesh = Mesh::derive(
            &crate::cluster::ClusterState::from_yaml(&yaml),
            trust,
            "weft-system",
        );
        registry.connected("node-1", "v", 4);
        registry.sent("node-1", 2);
        registry.acked("node-1", 2);
        registry.connected("node-2", "v", 4);
        registry.sent("node-2", 3);
        registry.nacked("node-2", 3, "bad", false);
        registry.reported(
            "node-1",
            &[pb::HeldCertificate {
                identity: "spiffe://cluster.local/ns/a/sa/b".into(),
                not_after: 2_000_000_000,
            }],
        );
        let (_, mesh_rx) = watch::channel(Arc::new(Published::first(mesh)));
        let (_, leader) = watch::channel(true);
        metrics.register_collector(Box::new(HealthMetrics {
            registry,
            mesh: mesh_rx,
            leader,
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
        for line in [
            "weft_control_plane_proxies_behind 1",
            "weft_control_plane_node_pods{node=\"node-3\"} 1",
            "weft_control_plane_node_proxy_connected{node=\"node-2\"} 1",
            "weft_control_plane_proxies_with_nack 1",
            "weft_control_plane_leader 1",
            "weft_control_plane_certificate_expiry_soonest_timestamp_seconds 2000000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // node-3 runs a pod and has no proxy here: it is not counted as connected.
        assert!(!text.contains("weft_control_plane_node_proxy_connected{node=\"node-3\"}"));
    }
}
