//! `MtlsPolicy`: whether a workload still accepts plaintext.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{PolicyStatus, WorkloadSelector};

/// How strictly the selected workloads require mutual TLS on inbound
/// connections.
///
/// Connections between meshed pods always travel in mutual-TLS (HBONE)
/// tunnels; this policy decides what happens to plaintext arriving at a
/// meshed pod from outside the mesh: `PERMISSIVE` lets it through, `STRICT`
/// refuses it.
///
/// **Which policy wins** for a pod: a policy whose `selector` selects the
/// pod beats one without a selector in the pod's namespace, which beats one
/// without a selector in `weft-system` (mesh-wide). When several policies of
/// the same level apply, `STRICT` wins. With no policy at all the mode is
/// `PERMISSIVE`.
// Clippy reads the printcolumns' repeated `type_ = "string"` as duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MtlsPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "mtls",
    category = "weft",
    doc = "How strictly the selected workloads require mutual TLS: STRICT refuses plaintext from outside the mesh, PERMISSIVE accepts it.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
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
pub struct MtlsPolicySpec {
    /// The pods of this namespace the policy applies to; absent: all of them
    /// (in `weft-system`: every pod in the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `STRICT` or `PERMISSIVE`.
    pub mode: MtlsMode,
}

/// Whether plaintext is accepted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mutual-TLS connections from the mesh; plaintext is refused.
    Strict,
    /// Mutual TLS from the mesh, plaintext from anywhere else. The mode when
    /// no policy applies.
    #[default]
    Permissive,
}
