//! `TrafficPolicy`: how connections to one Service behave.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DNS1035_LABEL_PATTERN, DURATION_PATTERN, PolicyStatus};

/// How connections to one Service behave: load balancing, timeouts,
/// connection limits, retries of failed connects, outlier ejection and a
/// weighted split across other Services.
///
/// The settings act in the node proxy of the client, on TCP connections
/// addressed to `service` (its cluster IP and ports) in the policy's
/// namespace. At most one policy configures a Service: when several name the
/// same one, the oldest (by creation time, then name) is used and the others
/// report `Accepted=False` with reason `Conflicted`.
///
/// Durations use the Gateway API syntax: `10s`, `250ms`, `1h30m`.
// Clippy reads the printcolumns' repeated `type_ = "string"` as duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "traffic",
    category = "weft",
    doc = "How connections to a Service behave: load balancing, timeouts, connection limits, connect retries, outlier ejection and weighted splits to other Services.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.split) || self.split.size() == 0 || self.split.exists(s, s.weight > 0)")
        .message("split needs at least one entry with a weight above 0")
        .field_path(".split"),
    validation = kube::core::Rule::new("!has(self.connectTimeout) || !self.connectTimeout.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$') || duration(self.connectTimeout) > duration('0s')")
        .message("connectTimeout must be longer than 0s")
        .field_path(".connectTimeout")
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service in this namespace that the policy configures.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1035_LABEL_PATTERN))]
    pub service: String,
    /// How an endpoint is picked for each new connection; absent:
    /// `ROUND_ROBIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancing>,
    /// How long establishing a connection to an endpoint may take before it
    /// counts as failed; absent: the proxy's default (10s). Must be above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub connect_timeout: Option<String>,
    /// How long a connection may carry no bytes in either direction before
    /// the proxy closes it; absent or `0s`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub idle_timeout: Option<String>,
    /// The most connections one node proxy keeps open to this Service at a
    /// time (a limit per client node, not cluster-wide); further connections
    /// are refused. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Retrying a connect that failed (refused, reset or timed out) on
    /// another endpoint. Absent: no retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Taking endpoints that keep failing out of rotation for a while.
    /// Absent: no ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Sends this Service's connections to other Services in this namespace
    /// in proportion to the weights (an entry may name `service` itself,
    /// meaning its own endpoints). Each Service at most once, up to 16;
    /// weights need not add up to anything, but one must be above 0. The
    /// rest of this policy applies to the connections wherever they go, and a
    /// split is not followed further (no chains). Empty: no split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["service"]))]
    pub split: Vec<WeightedService>,
}

/// How an endpoint is picked.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    /// The algorithm; default `ROUND_ROBIN`.
    #[serde(default)]
    pub mode: LoadBalancingMode,
}

/// The load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancingMode {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections from this proxy.
    LeastConnections,
    /// Of two endpoints picked at random, the one with fewer open
    /// connections from this proxy.
    PowerOfTwoChoices,
}

/// Retries of failed connects.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// How many more endpoints to try after the first connect fails, 0–5.
    /// Each attempt goes to an endpoint not tried yet for this connection.
    #[schemars(range(max = 5))]
    pub attempts: u32,
}

/// Ejection of endpoints that keep failing.
///
/// After `consecutiveFailures` failed connects in a row, an endpoint is left
/// out of load balancing for `baseEjectionTime` times the number of times it
/// has been ejected, at most `maxEjectionTime`. The last endpoint left is
/// never ejected.
#[derive(Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("!self.baseEjectionTime.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$') || !self.maxEjectionTime.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$') || duration(self.maxEjectionTime) >= duration(self.baseEjectionTime)")
        .message("maxEjectionTime must not be shorter than baseEjectionTime")
        .field_path(".maxEjectionTime"),
    validation = kube::core::Rule::new("!self.baseEjectionTime.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$') || duration(self.baseEjectionTime) > duration('0s')")
        .message("baseEjectionTime must be longer than 0s")
        .field_path(".baseEjectionTime")
)]
pub struct OutlierDetection {
    /// Failed connects in a row that eject an endpoint, 1–100; default 5.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 100))]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts, above `0s`; default `30s`.
    #[serde(default = "default_base_ejection_time")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub base_ejection_time: String,
    /// The longest an ejection lasts; default `5m`.
    #[serde(default = "default_max_ejection_time")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_ejection_time: String,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_time: default_max_ejection_time(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}

fn default_base_ejection_time() -> String {
    "30s".to_owned()
}

fn default_max_ejection_time() -> String {
    "5m".to_owned()
}

/// One destination of a split.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WeightedService {
    /// A Service in the policy's namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1035_LABEL_PATTERN))]
    pub service: String,
    /// Its share relative to the other entries, 0–1000 (0: none).
    #[schemars(range(max = 1000))]
    pub weight: u32,
}
