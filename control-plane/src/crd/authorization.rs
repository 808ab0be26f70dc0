//! `AuthorizationPolicy`: who may connect to a workload.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DNS1123_LABEL_PATTERN, PolicyStatus, WorkloadSelector};

/// A principal pattern: `*`, `*<suffix>`, or a SPIFFE ID that is exact or
/// ends in `*` (a prefix).
pub const PRINCIPAL_PATTERN: &str = r"^(\*|\*[^*\s]+|spiffe://[^*\s]+|spiffe://[^*\s]*\*)$";
/// The shape of an IPv4 or IPv6 address, with or without a `/prefix`; the
/// API server checks the exact syntax with CEL `isIP`/`isCIDR`.
pub const IP_BLOCK_PATTERN: &str = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}(/([0-9]|[12][0-9]|3[0-2]))?|[0-9a-fA-F.]*:[0-9a-fA-F:.]*(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?)$";

/// Who may open connections to the selected workloads.
///
/// **Where it applies.** A policy applies to the pods its `selector`
/// selects in its own namespace, or to every pod of the namespace when it has
/// no selector. A policy without a selector in the control plane's namespace,
/// `weft-system`, applies to every workload in the mesh.
///
/// **When it matches a connection.** A rule matches when every field it sets
/// matches: within a list any entry may match, and a `not…` list must match
/// none. A rule that sets nothing (`{}`) matches every connection. A policy
/// matches when any of its rules matches; a policy with no rules matches
/// nothing, so an `ALLOW` policy with no rules allows nothing.
///
/// **The decision** for a connection to a workload, over all the policies
/// that apply to it:
/// 1. any matching `DENY` policy refuses it;
/// 2. otherwise, if any `ALLOW` policy applies to the workload, one of them
///    must match, or the connection is refused;
/// 3. otherwise it is allowed.
///
/// `AUDIT` policies are evaluated and their matches logged; they never change
/// the decision. Policies act at the destination's node proxy, on the
/// identity proven by mutual TLS, so `principals` only ever match
/// connections that arrived through the mesh.
// Clippy reads the printcolumns' repeated `type_ = "string"` as duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "authz",
    category = "weft",
    doc = "Who may connect to the selected workloads: ALLOW, DENY and AUDIT rules over source identities, namespaces, addresses and destination ports.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
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
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods of this namespace the policy applies to; absent: all of them
    /// (in `weft-system`: every pod in the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// What a match means: `ALLOW` (the default), `DENY` or `AUDIT`.
    #[serde(default)]
    pub action: Action,
    /// The connections this policy is about; it matches when any rule does.
    /// No rules: it matches nothing.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub rules: Vec<Rule>,
}

/// What an [`AuthorizationPolicy`] does when it matches.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// The connection may proceed; once any ALLOW policy applies to a
    /// workload, only connections some ALLOW policy matches may.
    #[default]
    Allow,
    /// The connection is refused, whatever else matches.
    Deny,
    /// The match is logged; the decision is unchanged.
    Audit,
}

/// One description of connections: all the fields it sets must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Where the connection comes from; absent: from anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    /// What it is addressed to; absent: any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Destination>,
}

/// The origin of a connection. Each list that is set must have an entry that
/// matches; each `not…` list must have none.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// The client's SPIFFE identities (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`):
    /// exact, a prefix ending in `*` (`spiffe://cluster.local/ns/prod/*`), a
    /// suffix after `*` (`*/sa/frontend`), or `*` for any authenticated client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = PRINCIPAL_PATTERN), length(max = 2048)))]
    pub principals: Vec<String>,
    /// Identities that must not match, with the same patterns as `principals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = PRINCIPAL_PATTERN), length(max = 2048)))]
    pub not_principals: Vec<String>,
    /// The client's namespaces (from its proven identity), exact names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = DNS1123_LABEL_PATTERN), length(max = 63)))]
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = DNS1123_LABEL_PATTERN), length(max = 63)))]
    pub not_namespaces: Vec<String>,
    /// The client's address: IP addresses (`10.1.2.3`, `fd00::7`) or CIDRs
    /// (`10.0.0.0/8`, `2001:db8::/32`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = IP_BLOCK_PATTERN), length(max = 49)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(b, isIP(b) || isCIDR(b))")
        .message("ipBlocks entries must be IP addresses or CIDRs, e.g. 10.0.0.0/8, 2001:db8::/32, 192.0.2.7"))]
    pub ip_blocks: Vec<String>,
    /// Addresses that must not match, as in `ipBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = IP_BLOCK_PATTERN), length(max = 49)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(b, isIP(b) || isCIDR(b))")
        .message("notIpBlocks entries must be IP addresses or CIDRs, e.g. 10.0.0.0/8, 2001:db8::/32, 192.0.2.7"))]
    pub not_ip_blocks: Vec<String>,
}

/// What a connection is addressed to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The destination (pod) ports, 1–65535; any of them matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// Ports that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(range(min = 1, max = 65535)))]
    pub not_ports: Vec<u16>,
}
