//! Policies as the mesh applies them: which weft policies apply to a
//! workload, an AuthorizationPolicy in its wire form, and the mTLS mode that
//! wins for a workload. The rules themselves are evaluated by
//! [`weft_api::authorization`], in the proxy and in `explain` alike.
//!
//! Every AuthorizationPolicy is compiled with the proxy's own compiler
//! ([`weft_api::authorization::Policy::compile`]) before it is sent. One
//! that fails is not sent and reports `Invalid` in its status; an ALLOW or
//! DENY among them still applies to the pods it selects, which then refuse
//! every connection (fail closed: a DENY that is broken must not let
//! through what it was written to stop). An invalid AUDIT policy is only
//! left out: it never decided anything.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use weft_api::v1 as pb;

use crate::cluster::{ClusterState, in_namespace};
use crate::crd::{Action, AuthorizationPolicy, MtlsMode, MtlsPolicy, WorkloadSelector};

/// Whether a policy in `policy_namespace` with `selector` applies to a pod in
/// `namespace` with `labels`: a policy reaches its own namespace (all pods,
/// or those its selector matches), and a policy without a selector in
/// `mesh_namespace` (the control plane's) reaches every pod in the mesh.
pub fn applies(
    mesh_namespace: &str,
    policy_namespace: &str,
    selector: Option<&WorkloadSelector>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match selector {
        None => policy_namespace == namespace || policy_namespace == mesh_namespace,
        Some(selector) => policy_namespace == namespace && selector.matches(labels),
    }
}

/// The cluster's AuthorizationPolicies, each converted and compiled once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthorizationPolicies {
    /// The control plane's namespace, whose policies without a selector
    /// reach the whole mesh.
    pub mesh_namespace: String,
    /// What is sent, by `<namespace>/<name>`: the valid ones in their wire
    /// form, and for each invalid ALLOW or DENY a stand-in that refuses
    /// every connection (a DENY with one empty rule), so that a proxy
    /// that does not know `Workload.invalid_authorization_policies` fails
    /// closed too.
    pub valid: imbl::OrdMap<String, pb::AuthorizationPolicy>,
    /// The invalid ones: why, by `<namespace>/<name>`.
    pub invalid: imbl::OrdMap<String, String>,
}

/// The AuthorizationPolicies that apply to one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applicable {
    /// Their keys, sorted (invalid ALLOW and DENY policies included).
    pub keys: Vec<String>,
    /// Those of `keys` that are invalid and not sent.
    pub invalid: Vec<String>,
}

impl AuthorizationPolicies {
    /// Converts and compiles every policy of `cluster`, where
    /// `mesh_namespace` is the control plane's namespace.
    pub fn of(cluster: &ClusterState, mesh_namespace: &str) -> AuthorizationPolicies {
        let mut out = AuthorizationPolicies {
            mesh_namespace: mesh_namespace.to_owned(),
            ..AuthorizationPolicies::default()
        };
        for (key, policy) in &cluster.authorization_policies {
            out.set(key, Some(policy));
        }
        out
    }

    /// Converts and compiles the policy at `key` again (`None`: it is
    /// gone); whether it is invalid.
    pub fn set(&mut self, key: &str, policy: Option<&AuthorizationPolicy>) -> bool {
        self.valid.remove(key);
        self.invalid.remove(key);
        let Some(policy) = policy else {
            return false;
        };
        match to_checked_wire(policy) {
            Ok(wire) => {
                self.valid.insert(key.to_owned(), wire);
                false
            }
            Err(why) => {
                if policy.spec.action != Action::Audit {
                    self.valid.insert(key.to_owned(), refuse_everything(policy));
                }
                self.invalid.insert(key.to_owned(), why);
                true
            }
        }
    }

    /// The policies that apply to a pod in `namespace` with `labels`.
    pub fn applying_to(
        &self,
        cluster: &ClusterState,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Applicable {
        let mut applicable = Applicable::default();
        // Only its own namespace's policies and the mesh-wide ones can reach a pod.
        let own = in_namespace(&cluster.authorization_policies, namespace);
        let mesh_wide = (namespace != self.mesh_namespace)
            .then(|| in_namespace(&cluster.authorization_policies, &self.mesh_namespace));
        for (key, policy) in own.chain(mesh_wide.into_iter().flatten()) {
            let reaches = applies(
                &self.mesh_namespace,
                policy.metadata.namespace.as_deref().unwrap_or(""),
                policy.spec.selector.as_ref(),
                namespace,
                labels,
            );
            if !reaches {
                continue;
            }
            if self.invalid.contains_key(key) {
                if policy.spec.action == Action::Audit {
                    continue;
                }
                applicable.invalid.push(key.clone());
            }
            applicable.keys.push(key.clone());
        }
        applicable.keys.sort();
        applicable.invalid.sort();
        applicable
    }
}

/// The mTLS mode of a pod and the policy that set it (empty for the
/// default, PERMISSIVE). The most specific policy wins: one selecting the
/// workload, then its namespace's, then the mesh-wide one; between policies
/// of the same rank the stricter mode wins, so adding a policy can never
/// loosen another one by accident.
pub fn mtls_mode_of(
    cluster: &ClusterState,
    mesh_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (pb::MtlsMode, String) {
    let rank = |policy: &MtlsPolicy| -> Option<u8> {
        let policy_namespace = policy.metadata.namespace.as_deref().unwrap_or("");
        let selector = policy.spec.selector.as_ref();
        if !applies(
            mesh_namespace,
            policy_namespace,
            selector,
            namespace,
            labels,
        ) {
            return None;
        }
        Some(match (selector, policy_namespace == namespace) {
            (Some(_), _) => 3,
            (None, true) => 2,
            (None, false) => 1,
        })
    };
    // Highest rank first, then STRICT, then the first name.
    let own = in_namespace(&cluster.mtls_policies, namespace);
    let mesh_wide =
        (namespace != mesh_namespace).then(|| in_namespace(&cluster.mtls_policies, mesh_namespace));
    let best = own
        .chain(mesh_wide.into_iter().flatten())
        .filter_map(|(key, policy)| Some((rank(policy)?, policy.spec.mode, key)))
        .min_by_key(|(rank, mode, key)| (Reverse(*rank), Reverse(*mode == MtlsMode::Strict), *key));
    match best {
        Some((_, MtlsMode::Strict, key)) => (pb::MtlsMode::Strict, key.clone()),
        Some((_, MtlsMode::Permissive, key)) => (pb::MtlsMode::Permissive, key.clone()),
        None => (pb::MtlsMode::Permissive, String::new()),
    }
}

/// Converts a policy to its wire form and compiles that with the proxy's
/// compiler; `Err` names the field (`rules[0].from.ipBlocks[1]`) and the
/// problem.
pub fn to_checked_wire(policy: &AuthorizationPolicy) -> Result<pb::AuthorizationPolicy, String> {
    let wire = to_wire(policy);
    weft_api::authorization::Policy::compile(&wire).map_err(|e| e.field_problem())?;
    Ok(wire)
}

/// The stand-in for an invalid ALLOW or DENY: a DENY that matches every
/// connection.
fn refuse_everything(policy: &AuthorizationPolicy) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        namespace: policy.metadata.namespace.clone().unwrap_or_default(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        action: pb::AuthorizationAction::Deny as i32,
        rules: vec![pb::AuthorizationRule::default()],
    }
}

fn to_wire(policy: &AuthorizationPolicy) -> pb::AuthorizationPolicy {
    let action = match policy.spec.action {
        Action::Allow => pb::AuthorizationAction::Allow,
        Action::Deny => pb::AuthorizationAction::Deny,
        Action::Audit => pb::AuthorizationAction::Audit,
    };
    let rules = policy
        .spec
        .rules
        .iter()
        .map(|rule| {
            let from = rule.from.clone().unwrap_or_default();
            let to = rule.to.clone().unwrap_or_default();
            pb::AuthorizationRule {
                principals: from.principals,
                not_principals: from.not_principals,
                namespaces: from.namespaces,
                not_namespaces: from.not_namespaces,
                ip_blocks: from.ip_blocks,
                not_ip_blocks: from.not_ip_blocks,
                ports: to.ports.into_iter().map(u32::from).collect(),
                not_ports: to.not_ports.into_iter().map(u32::from).collect(),
            }
        })
        .collect();
    pb::AuthorizationPolicy {
        namespace: policy.metadata.namespace.clone().unwrap_or_default(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        action: action as i32,
        rules,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cluster(yaml: &str) -> ClusterState {
        ClusterState::from_yaml(yaml)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const POLICIES: &str = "
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-only, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whole-shop, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: weft-system}
spec: {action: DENY, rules: [{from: {principals: ['*/sa/evil']}, to: {ports: [22]}}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: other-team, namespace: other}
spec: {rules: []}
";

    #[test]
    fn policies_reach_their_namespace_their_selection_and_mesh_wide() {
        let cluster = cluster(POLICIES);
        let policies = AuthorizationPolicies::of(&cluster, "weft-system");
        let of = |namespace: &str, l: &[(&str, &str)]| {
            policies.applying_to(&cluster, namespace, &labels(l)).keys
        };
        assert_eq!(
            of("shop", &[("app", "db")]),
            ["shop/db-only", "shop/whole-shop", "weft-system/mesh-wide"]
        );
        assert_eq!(
            of("shop", &[("app", "web")]),
            ["shop/whole-shop", "weft-system/mesh-wide"]
        );
        // A selector never reaches across namespaces, even with matching labels.
        assert_eq!(of("billing", &[("app", "db")]), ["weft-system/mesh-wide"]);
        let wire = &policies.valid;
        let mesh_wide = &wire["weft-system/mesh-wide"];
        assert_eq!(mesh_wide.action, pb::AuthorizationAction::Deny as i32);
        assert_eq!(mesh_wide.rules[0].principals, ["*/sa/evil"]);
        assert_eq!(mesh_wide.rules[0].ports, [22]);
        assert_eq!(
            wire["shop/db-only"].action,
            pb::AuthorizationAction::Allow as i32
        );
    }

    #[test]
    fn an_invalid_policy_is_not_sent_and_fails_closed_unless_it_only_audits() {
        let cluster = cluster(
            "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad-deny, namespace: shop}
spec: {action: DENY, rules: [{from: {ipBlocks: ['10.0.0.0/8', '10.1.2.300']}}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad-audit, namespace: shop}
spec: {action: AUDIT, rules: [{from: {notIpBlocks: ['nope']}}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: good, namespace: shop}
spec: {rules: [{}]}
",
        );
        let policies = AuthorizationPolicies::of(&cluster, "weft-system");
        // The broken DENY is sent as a stand-in that refuses everything.
        assert_eq!(
            policies.valid.keys().collect::<Vec<_>>(),
            ["shop/bad-deny", "shop/good"]
        );
        let stand_in = &policies.valid["shop/bad-deny"];
        assert_eq!(stand_in.action, pb::AuthorizationAction::Deny as i32);
        assert_eq!(stand_in.rules, [pb::AuthorizationRule::default()]);
        assert_eq!(
            policies.invalid["shop/bad-deny"],
            "rules[0].from.ipBlocks[1]: \"10.1.2.300\" is not an IP address or CIDR"
        );
        let applicable = policies.applying_to(&cluster, "shop", &labels(&[]));
        assert_eq!(applicable.keys, ["shop/bad-deny", "shop/good"]);
        assert_eq!(applicable.invalid, ["shop/bad-deny"]);
    }

    #[test]
    fn the_most_specific_mtls_policy_wins_and_ties_go_to_strict() {
        let mtls = |name: &str, namespace: &str, selector: &str, mode: &str| {
            format!(
                "apiVersion: weft.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{{selector} mode: {mode}}}\n---\n"
            )
        };
        let db = labels(&[("app", "db")]);
        let none = ClusterState::default();
        assert_eq!(
            mtls_mode_of(&none, "weft-system", "shop", &db),
            (pb::MtlsMode::Permissive, String::new())
        );

        let mesh_strict = mtls("all", "weft-system", "", "STRICT");
        let c = cluster(&mesh_strict);
        assert_eq!(
            mtls_mode_of(&c, "weft-system", "shop", &db).0,
            pb::MtlsMode::Strict
        );

        let ns_permissive = mesh_strict.clone() + &mtls("relaxed", "shop", "", "PERMISSIVE");
        let c = cluster(&ns_permissive);
        assert_eq!(
            mtls_mode_of(&c, "weft-system", "shop", &db),
            (pb::MtlsMode::Permissive, "shop/relaxed".into())
        );

        let workload_strict = ns_permissive
            + &mtls(
                "db",
                "shop",
                "selector: {matchLabels: {app: db}},",
                "STRICT",
            );
        let c = cluster(&workload_strict);
        assert_eq!(
            mtls_mode_of(&c, "weft-system", "shop", &db),
            (pb::MtlsMode::Strict, "shop/db".into())
        );
        assert_eq!(
            mtls_mode_of(&c, "weft-system", "shop", &labels(&[])).0,
            pb::MtlsMode::Permissive
        );

        // Two namespace-wide policies disagree: the stricter one holds,
        // whichever name sorts first.
        let tie =
            mtls("a-loose", "shop", "", "PERMISSIVE") + &mtls("b-strict", "shop", "", "STRICT");
        let c = cluster(&tie);
        assert_eq!(
            mtls_mode_of(&c, "weft-system", "shop", &db),
            (pb::MtlsMode::Strict, "shop/b-strict".into())
        );
    }
}
