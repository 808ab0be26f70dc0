//! What the control plane knows about the proxies talking to it: which nodes
//! are connected, which version each was sent and acknowledged, and what each
//! refused. Shown on the monitoring port and counted in metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// One node proxy's conversation, as last seen.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeStatus {
    /// Open config streams from this node (normally 0 or 1).
    pub streams: u32,
    /// When the current stream opened (seconds since the epoch).
    pub connected_since: Option<u64>,
    /// The proxy's build as it reported it.
    pub proxy_version: String,
    /// The last version sent.
    pub sent_version: u64,
    /// The last version the proxy acknowledged.
    pub acked_version: u64,
    /// The last refused version and the proxy's reason.
    pub last_nack: Option<(u64, String)>,
    /// When the proxy last sent a traffic report (seconds since the epoch).
    pub last_report: Option<u64>,
    /// The workload certificates the proxy said it holds in its last
    /// report, by identity: when each expires (seconds since the epoch).
    pub certificates: BTreeMap<String, i64>,
}

/// Certificates kept per node: a node holds one per identity of its pods,
/// far fewer than this; a proxy that says more is cut off here.
const MAX_CERTIFICATES_PER_NODE: usize = 4_096;
/// The longest identity kept (a SPIFFE URI of Kubernetes names is shorter).
const MAX_IDENTITY_BYTES: usize = 512;

/// Labels of per-outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened, e.g. "ack", "nack", "issued", "denied".
    pub outcome: String,
}

/// Node statuses plus the control plane's metrics.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    connected: Gauge,
    config_updates: Family<OutcomeLabels, Counter>,
    certificates: Family<OutcomeLabels, Counter>,
    waiting_for_pods: Gauge,
}

impl NodeRegistry {
    /// A registry whose metrics are registered in `metrics`.
    pub fn new(metrics: &mut Registry) -> Arc<NodeRegistry> {
        let registry = NodeRegistry::default();
        metrics.register(
            "weft_control_plane_connected_proxies",
            "Open config streams from node proxies",
            registry.connected.clone(),
        );
        metrics.register(
            "weft_control_plane_config_updates",
            "Config updates by outcome (sent, ack, nack)",
            registry.config_updates.clone(),
        );
        metrics.register(
            "weft_control_plane_certificates",
            "Certificate signing requests by outcome",
            registry.certificates.clone(),
        );
        metrics.register(
            "weft_control_plane_certificate_requests_waiting",
            "Certificate requests waiting for their pod to show up with an IP",
            registry.waiting_for_pods.clone(),
        );
        Arc::new(registry)
    }

    fn with_node<T>(&self, node: &str, f: impl FnOnce(&mut NodeStatus) -> T) -> T {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        f(nodes.entry(node.to_owned()).or_default())
    }

    /// A stream from `node` opened, unless the node holds `max` already:
    /// whether it was counted.
    pub fn connected(&self, node: &str, proxy_version: &str, max: u32) -> bool {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let counted = self.with_node(node, |status| {
            if status.streams >= max {
                return false;
            }
            status.streams += 1;
            status.connected_since = since;
            status.proxy_version = proxy_version.to_owned();
            true
        });
        if counted {
            self.connected.inc();
        }
        counted
    }

    /// A stream from `node` closed.
    pub fn disconnected(&self, node: &str) {
        self.connected.dec();
        self.with_node(node, |status| {
            status.streams = status.streams.saturating_sub(1);
            if status.streams == 0 {
                status.connected_since = None;
            }
        });
    }

    /// `version` was sent to `node`.
    pub fn sent(&self, node: &str, version: u64) {
        self.count_update("sent");
        self.with_node(node, |status| status.sent_version = version);
    }

    /// `node` applied `version`.
    pub fn acked(&self, node: &str, version: u64) {
        self.count_update("ack");
        self.with_node(node, |status| status.acked_version = version);
    }

    /// `node` refused `version`: whole, or (`applied`) only the entries
    /// `reason` names, having applied the rest.
    pub fn nacked(&self, node: &str, version: u64, reason: &str, applied: bool) {
        self.count_update(if applied { "partial" } else { "nack" });
        self.with_node(node, |status| {
            status.last_nack = Some((version, reason.to_owned()));
            if applied {
                status.acked_version = version;
            }
        });
    }

    /// `node`'s proxy reported; it holds `certificates`.
    pub fn reported(&self, node: &str, certificates: &[weft_api::v1::HeldCertificate]) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let held = certificates
            .iter()
            .filter(|c| c.identity.len() <= MAX_IDENTITY_BYTES)
            .take(MAX_CERTIFICATES_PER_NODE)
            .map(|c| (c.identity.clone(), c.not_after))
            .collect();
        self.with_node(node, |status| {
            status.last_report = now;
            status.certificates = held;
        });
    }

    /// Counts a signing request's outcome.
    pub fn certificate(&self, outcome: &str) {
        self.certificates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A certificate request waits for its pod (until the result is
    /// dropped).
    pub fn waiting_for_pod(&self) -> impl Drop + use<> {
        struct Waiting(Gauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.waiting_for_pods.inc();
        Waiting(self.waiting_for_pods.clone())
    }

    fn count_update(&self, outcome: &str) {
        self.config_updates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A copy of every node's status.
    pub fn snapshot(&self) -> BTreeMap<String, NodeStatus> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
