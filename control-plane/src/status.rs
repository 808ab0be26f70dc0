//! What the control plane says about each weft object, as status conditions:
//! `Accepted` (does the mesh use it?) and `ResolvedRefs` (does what it names
//! exist: the pods its selector picks, the Service it configures, the
//! Services it splits to?). Derived from one [`ClusterState`] as a whole;
//! written to the API server by [`crate::kubernetes`] (by one replica).

use std::collections::BTreeMap;

use crate::cluster::ClusterState;
use crate::crd::{
    Action, CONDITION_ACCEPTED, CONDITION_RESOLVED_REFS, REASON_ACCEPTED, REASON_CONFLICTED,
    REASON_INVALID, REASON_NO_MATCHING_WORKLOADS, REASON_RESOLVED, REASON_SERVICE_NOT_FOUND,
    WorkloadSelector,
};
use crate::policy::AuthorizationPolicies;
use crate::traffic;

/// One condition as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The condition type.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What a person needs to know.
    pub message: String,
}

/// The kinds of weft objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `MtlsPolicy`.
    MtlsPolicy,
    /// `TrafficPolicy`.
    TrafficPolicy,
}

/// The conditions of every weft object, by kind and `<namespace>/<name>`.
pub fn verdicts(
    cluster: &ClusterState,
    mesh_namespace: &str,
) -> BTreeMap<(Kind, String), Vec<Verdict>> {
    let mut out = BTreeMap::new();
    let authorization = AuthorizationPolicies::of(cluster, mesh_namespace);
    for (key, policy) in &cluster.authorization_policies {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("");
        let accepted = match authorization.invalid.get(key) {
            Some(problem) => invalid(
                problem,
                if policy.spec.action == Action::Audit {
                    "it is not sent to the node proxies"
                } else {
                    "it is not sent to the node proxies, and the pods it selects refuse every connection until it is fixed"
                },
            ),
            None => accepted(),
        };
        out.insert(
            (Kind::AuthorizationPolicy, key.clone()),
            vec![
                accepted,
                selection(cluster, namespace, policy.spec.selector.as_ref()),
            ],
        );
    }
    for (key, policy) in &cluster.mtls_policies {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("");
        out.insert(
            (Kind::MtlsPolicy, key.clone()),
            vec![
                accepted(),
                selection(cluster, namespace, policy.spec.selector.as_ref()),
            ],
        );
    }
    for (key, policy) in &cluster.traffic_policies {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("");
        let service = format!("{namespace}/{}", policy.spec.service);
        let winner = traffic::winning_policy(cluster, namespace, &policy.spec.service);
        let accepted = match (traffic::to_wire(key, namespace, policy), winner) {
            (Err(problem), _) => invalid(&problem, "it configures nothing"),
            (Ok(_), Some((winner, _, _))) if winner != key => Verdict {
                type_: CONDITION_ACCEPTED,
                status: false,
                reason: REASON_CONFLICTED,
                message: format!(
                    "Service {service} is already configured by TrafficPolicy {winner}, which is older; this one is ignored"
                ),
            },
            _ => accepted(),
        };
        let missing: Vec<String> = std::iter::once(policy.spec.service.clone())
            .chain(policy.spec.split.iter().map(|s| s.service.clone()))
            .filter(|name| {
                !cluster
                    .services
                    .contains_key(&format!("{namespace}/{name}"))
            })
            .collect();
        let resolved = if missing.is_empty() {
            resolved()
        } else {
            Verdict {
                type_: CONDITION_RESOLVED_REFS,
                status: false,
                reason: REASON_SERVICE_NOT_FOUND,
                message: format!("no Service {} in namespace {namespace}", missing.join(", ")),
            }
        };
        out.insert((Kind::TrafficPolicy, key.clone()), vec![accepted, resolved]);
    }
    out
}

/// `Accepted=False`, reason `Invalid`: `problem` names the field, `effect`
/// says what that means for traffic.
fn invalid(problem: &str, effect: &str) -> Verdict {
    Verdict {
        type_: CONDITION_ACCEPTED,
        status: false,
        reason: REASON_INVALID,
        message: format!("invalid: {problem}; {effect}"),
    }
}

fn accepted() -> Verdict {
    Verdict {
        type_: CONDITION_ACCEPTED,
        status: true,
        reason: REASON_ACCEPTED,
        message: "the control plane sends this policy to the node proxies".into(),
    }
}

fn resolved() -> Verdict {
    Verdict {
        type_: CONDITION_RESOLVED_REFS,
        status: true,
        reason: REASON_RESOLVED,
        message: "everything the policy refers to exists".into(),
    }
}

/// Whether a selector picks any pod of its namespace.
fn selection(
    cluster: &ClusterState,
    namespace: &str,
    selector: Option<&WorkloadSelector>,
) -> Verdict {
    let Some(selector) = selector else {
        return resolved();
    };
    // The namespace's pods only (a range of the sorted keys), their labels
    // read in place: a cluster's policies are checked in proportion to
    // their namespaces, not to the cluster times the policies.
    let no_labels = std::collections::BTreeMap::new();
    let matches = crate::cluster::in_namespace(&cluster.pods, namespace)
        .any(|(_, pod)| selector.matches(pod.metadata.labels.as_ref().unwrap_or(&no_labels)));
    if matches {
        return resolved();
    }
    let labels: Vec<String> = selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Verdict {
        type_: CONDITION_RESOLVED_REFS,
        status: false,
        reason: REASON_NO_MATCHING_WORKLOADS,
        message: format!(
            "the selector {} matches no pod in namespace {namespace}; the policy applies to matching pods once they exist",
            labels.join(",")
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cluster(yaml: &str) -> ClusterState {
        ClusterState::from_yaml(yaml)
    }

    #[test]
    fn problems_are_named_in_the_conditions() {
        let c = cluster(
            "apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {ports: [{port: 5432}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec: {selector: {matchLabels: {app: dbb}}}
---
apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: db, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mode: STRICT}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: a-first, namespace: shop}
spec: {service: db, split: [{service: db, weight: 9}, {service: db-canary, weight: 1}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b-second, namespace: shop}
spec: {service: db}
",
        );
        let v = verdicts(&c, "weft-system");
        let typo = &v[&(Kind::AuthorizationPolicy, "shop/typo".into())];
        assert!(typo[0].status);
        assert_eq!(typo[1].reason, REASON_NO_MATCHING_WORKLOADS);
        assert!(typo[1].message.contains("app=dbb"), "{}", typo[1].message);
        assert!(v[&(Kind::MtlsPolicy, "shop/db".into())][1].status);
        let first = &v[&(Kind::TrafficPolicy, "shop/a-first".into())];
        assert!(first[0].status);
        assert_eq!(first[1].reason, REASON_SERVICE_NOT_FOUND);
        assert!(
            first[1].message.contains("db-canary"),
            "{}",
            first[1].message
        );
        let second = &v[&(Kind::TrafficPolicy, "shop/b-second".into())];
        assert_eq!(second[0].reason, REASON_CONFLICTED);
        assert!(
            second[0].message.contains("shop/a-first"),
            "{}",
            second[0].message
        );
        assert!(second[1].status);
    }
}
