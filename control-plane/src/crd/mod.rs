//! weft's custom resources: how operators write mesh policy.
//!
//! Three namespaced kinds in API group `weft.dev`, version `v1alpha1`:
//!
//! - [`AuthorizationPolicy`]: who may connect to a workload (ALLOW, DENY,
//!   AUDIT over identities, namespaces, addresses and ports);
//! - [`MtlsPolicy`]: whether a workload still accepts plaintext (STRICT or
//!   PERMISSIVE);
//! - [`TrafficPolicy`]: how connections to a Service behave (load balancing,
//!   timeouts, limits, connect retries, outlier ejection, weighted splits).
//!
//! The Rust types are the source of truth: the CustomResourceDefinitions
//! (with their OpenAPI schemas and CEL rules, so that the API server refuses
//! bad objects with a message naming the field) are generated from them by
//! [`crds`] and written to `deploy/crds/weft.dev.yaml` by [`crds_yaml`]. A
//! policy without a selector in the control plane's namespace
//! ([`DEFAULT_MESH_NAMESPACE`] unless configured) applies mesh-wide. Every
//! kind reports in its status whether the control plane took it
//! ([`CONDITION_ACCEPTED`]).

mod authorization;
mod common;
mod mtls;
mod schema_check;
mod traffic;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use authorization::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Destination, IP_BLOCK_PATTERN,
    PRINCIPAL_PATTERN, Rule, Source,
};
pub use common::{
    CONDITION_ACCEPTED, CONDITION_RESOLVED_REFS, DEFAULT_MESH_NAMESPACE, DNS1035_LABEL_PATTERN,
    DNS1123_LABEL_PATTERN, DURATION_PATTERN, GROUP, PolicyStatus, REASON_ACCEPTED,
    REASON_CONFLICTED, REASON_INVALID, REASON_NO_MATCHING_WORKLOADS, REASON_RESOLVED,
    REASON_SERVICE_NOT_FOUND, VERSION, WorkloadSelector, parse_duration,
};
pub use mtls::{MtlsMode, MtlsPolicy, MtlsPolicySpec};
pub use schema_check::check_against_crd;
pub use traffic::{
    LoadBalancing, LoadBalancingMode, OutlierDetection, Retries, TrafficPolicy, TrafficPolicySpec,
    WeightedService,
};

/// The command that regenerates `deploy/crds/weft.dev.yaml`.
pub const REGENERATE_COMMAND: &str =
    "cargo run -p weft-control-plane -- crds > deploy/crds/weft.dev.yaml";

/// The CustomResourceDefinitions of all weft kinds, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        AuthorizationPolicy::crd(),
        MtlsPolicy::crd(),
        TrafficPolicy::crd(),
    ]
}

/// All weft CRDs as one multi-document YAML file, with a header saying that
/// it is generated and how: the content of `deploy/crds/weft.dev.yaml`.
pub fn crds_yaml() -> String {
    let mut out = format!(
        "# weft's CustomResourceDefinitions (group {GROUP}, version {VERSION}).\n\
         # Generated from the Rust types in control-plane/src/crd/; do not edit.\n\
         # Regenerate with: {REGENERATE_COMMAND}\n"
    );
    for crd in crds() {
        out.push_str("---\n");
        // A CRD is plain strings, numbers, lists and string-keyed maps: it
        // always has a YAML form.
        let yaml =
            serde_saphyr::to_string(&crd).expect("a CustomResourceDefinition serializes to YAML");
        out.push_str(&yaml);
    }
    out
}
