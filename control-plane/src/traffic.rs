//! TrafficPolicies: which one configures a Service, and its wire form.
//!
//! Every policy is converted with the proxy's own conversion
//! ([`weft_api::traffic::TrafficPolicy::from_wire`]) before anything is
//! sent: one that fails is invalid, configures nothing and says why in its
//! status, so an object the API server admitted can never make a proxy
//! refuse its config.
//!
//! At most one valid policy configures a Service: of those in the Service's
//! namespace that name it, the oldest (by creation time, then name) wins. A
//! policy without a creation time (a local manifest) counts as newer than
//! any with one.

use weft_api::v1 as pb;

use crate::cluster::{ClusterState, in_namespace};
use crate::crd::{LoadBalancingMode, TrafficPolicy, parse_duration};

/// The key (`<namespace>/<name>`), object and wire form of the valid policy
/// that configures the Service `namespace/name`, if any.
pub fn winning_policy<'a>(
    cluster: &'a ClusterState,
    namespace: &str,
    name: &str,
) -> Option<(&'a str, &'a TrafficPolicy, pb::TrafficPolicy)> {
    in_namespace(&cluster.traffic_policies, namespace)
        .filter(|(_, policy)| policy.spec.service == name)
        .filter_map(|(key, policy)| {
            Some((key, policy.as_ref(), to_wire(key, namespace, policy).ok()?))
        })
        .min_by(|(a_key, a, _), (b_key, b, _)| {
            let created = |p: &TrafficPolicy| {
                let time = p.metadata.creation_timestamp.as_ref();
                (time.is_none(), time.cloned())
            };
            created(a).cmp(&created(b)).then_with(|| a_key.cmp(b_key))
        })
        .map(|(key, policy, wire)| (key.as_str(), policy, wire))
}

/// The wire form of the policy that configures the Service `namespace/name`.
pub fn traffic_policy_of(
    cluster: &ClusterState,
    namespace: &str,
    name: &str,
) -> Option<pb::TrafficPolicy> {
    winning_policy(cluster, namespace, name).map(|(_, _, wire)| wire)
}

/// Converts a policy to its wire form and checks that form with the
/// proxy's conversion. `Err` names the field and the problem: a duration
/// that does not parse (the API server refuses those; a local manifest may
/// still carry one) or a value the proxy would refuse.
pub fn to_wire(
    key: &str,
    namespace: &str,
    policy: &TrafficPolicy,
) -> Result<pb::TrafficPolicy, String> {
    let spec = &policy.spec;
    let millis = |field: &str, text: Option<&str>| -> Result<u64, String> {
        let Some(text) = text else { return Ok(0) };
        let duration = parse_duration(text).map_err(|error| format!("{field}: {error}"))?;
        Ok(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    };
    let mode = match spec.load_balancing.as_ref().map(|lb| lb.mode) {
        None | Some(LoadBalancingMode::RoundRobin) => pb::LoadBalancing::RoundRobin,
        Some(LoadBalancingMode::LeastConnections) => pb::LoadBalancing::LeastConnections,
        Some(LoadBalancingMode::PowerOfTwoChoices) => pb::LoadBalancing::PowerOfTwoChoices,
    };
    let outlier = spec.outlier_detection.as_ref();
    let base = match outlier {
        Some(o) => millis(
            "outlierDetection.baseEjectionTime",
            Some(&o.base_ejection_time),
        )?,
        None => 0,
    };
    let max = match outlier {
        Some(o) => millis(
            "outlierDetection.maxEjectionTime",
            Some(&o.max_ejection_time),
        )?,
        None => 0,
    };
    let wire = pb::TrafficPolicy {
        mode: mode as i32,
        connect_timeout_ms: millis("connectTimeout", spec.connect_timeout.as_deref())?,
        idle_timeout_ms: millis("idleTimeout", spec.idle_timeout.as_deref())?,
        max_connections: spec.max_connections.unwrap_or(0),
        retry_attempts: spec.retries.as_ref().map_or(0, |r| r.attempts),
        outlier_consecutive_failures: outlier.map_or(0, |o| o.consecutive_failures),
        outlier_base_ejection_ms: base,
        outlier_max_ejection_ms: max,
        split: spec
            .split
            .iter()
            .map(|s| pb::WeightedService {
                service: format!("{namespace}/{}", s.service),
                weight: s.weight,
            })
            .collect(),
        policy: key.to_owned(),
    };
    if spec.connect_timeout.is_some() && wire.connect_timeout_ms == 0 {
        // On the wire 0 means "the proxy's default": the CRD refuses 0s
        // (a connect that may take no time at all), and so does this.
        return Err("connectTimeout: must be longer than 0s".to_owned());
    }
    if outlier.is_some_and(|o| o.consecutive_failures == 0) {
        // On the wire 0 means "no outlier detection": the proxy would not
        // refuse it, it would silently ignore what the operator asked for.
        return Err("outlierDetection.consecutiveFailures: must be at least 1".to_owned());
    }
    weft_api::traffic::TrafficPolicy::from_wire(namespace, &wire).map_err(|e| e.field_problem())?;
    Ok(wire)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crd::{
        LoadBalancing, OutlierDetection, Retries, TrafficPolicySpec, WeightedService,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn policy(namespace: &str, name: &str, service: &str, created: Option<&str>) -> TrafficPolicy {
        let mut policy = TrafficPolicy::new(
            name,
            TrafficPolicySpec {
                service: service.to_owned(),
                load_balancing: None,
                connect_timeout: None,
                idle_timeout: None,
                max_connections: None,
                retries: None,
                outlier_detection: None,
                split: Vec::new(),
            },
        );
        policy.metadata.namespace = Some(namespace.to_owned());
        policy.metadata.creation_timestamp =
            created.map(|t| serde_json::from_value::<Time>(serde_json::json!(t)).unwrap());
        policy
    }

    fn cluster(policies: Vec<TrafficPolicy>) -> ClusterState {
        let mut cluster = ClusterState::default();
        for p in policies {
            let key = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap(),
                p.metadata.name.as_deref().unwrap()
            );
            cluster.traffic_policies.insert(key, std::sync::Arc::new(p));
        }
        cluster
    }

    #[test]
    fn no_policy_names_the_service() {
        let c = cluster(vec![
            policy("shop", "a", "other", None),
            policy("elsewhere", "b", "db", None),
        ]);
        assert!(traffic_policy_of(&c, "shop", "db").is_none());
    }

    #[test]
    fn the_oldest_policy_wins_then_the_first_name() {
        let c = cluster(vec![
            policy("shop", "a-new", "db", Some("2024-05-01T00:00:00Z")),
            policy("shop", "z-old", "db", Some("2024-01-01T00:00:00Z")),
            policy("shop", "no-time", "db", None),
        ]);
        assert_eq!(winning_policy(&c, "shop", "db").unwrap().0, "shop/z-old");

        let c = cluster(vec![
            policy("shop", "b", "db", None),
            policy("shop", "a", "db", None),
        ]);
        assert_eq!(winning_policy(&c, "shop", "db").unwrap().0, "shop/a");
    }

    #[test]
    fn converts_every_field() {
        let mut p = policy("shop", "tp", "db", None);
        p.spec.load_balancing = Some(LoadBalancing {
            mode: LoadBalancingMode::LeastConnections,
        });
        p.spec.connect_timeout = Some("1s500ms".to_owned());
        p.spec.idle_timeout = Some("1m".to_owned());
        p.spec.max_connections = Some(3);
        p.spec.retries = Some(Retries { attempts: 2 });
        p.spec.outlier_detection = Some(OutlierDetection {
            consecutive_failures: 4,
            base_ejection_time: "10s".to_owned(),
            max_ejection_time: "1m".to_owned(),
        });
        p.spec.split = vec![
            WeightedService {
                service: "db".to_owned(),
                weight: 80,
            },
            WeightedService {
                service: "db-v2".to_owned(),
                weight: 20,
            },
        ];
        let c = cluster(vec![p]);
        let wire = traffic_policy_of(&c, "shop", "db").unwrap();
        assert_eq!(wire.mode, pb::LoadBalancing::LeastConnections as i32);
        assert_eq!(wire.connect_timeout_ms, 1500);
        assert_eq!(wire.idle_timeout_ms, 60_000);
        assert_eq!(wire.max_connections, 3);
        assert_eq!(wire.retry_attempts, 2);
        assert_eq!(wire.outlier_consecutive_failures, 4);
        assert_eq!(wire.outlier_base_ejection_ms, 10_000);
        assert_eq!(wire.outlier_max_ejection_ms, 60_000);
        assert_eq!(wire.split.len(), 2);
        assert_eq!(wire.split[1].service, "shop/db-v2");
        assert_eq!(wire.split[1].weight, 20);
        assert_eq!(wire.policy, "shop/tp");
    }

    #[test]
    fn an_invalid_policy_configures_nothing_and_says_why() {
        let mut bad = policy("shop", "a-bad", "db", Some("2024-01-01T00:00:00Z"));
        bad.spec.connect_timeout = Some("soon".to_owned());
        let error = to_wire("shop/a-bad", "shop", &bad).unwrap_err();
        assert!(
            error.starts_with("connectTimeout: invalid duration"),
            "{error}"
        );

        let mut zero = policy("shop", "b-zero", "db", Some("2024-01-02T00:00:00Z"));
        zero.spec.outlier_detection = Some(OutlierDetection {
            consecutive_failures: 1,
            base_ejection_time: "0s".to_owned(),
            max_ejection_time: "1m".to_owned(),
        });
        let error = to_wire("shop/b-zero", "shop", &zero).unwrap_err();
        assert_eq!(
            error,
            "outlierDetection.baseEjectionTime: must be longer than 0s"
        );

        // The invalid ones are passed over: the next valid one wins.
        let good = policy("shop", "c-good", "db", Some("2024-01-03T00:00:00Z"));
        let mut instant = policy("shop", "b-instant", "db", None);
        instant.spec.connect_timeout = Some("0ms".to_owned());
        let error = to_wire("shop/b-instant", "shop", &instant).unwrap_err();
        assert_eq!(error, "connectTimeout: must be longer than 0s");

        let c = cluster(vec![bad, zero, good]);
        assert_eq!(winning_policy(&c, "shop", "db").unwrap().0, "shop/c-good");
    }
}
