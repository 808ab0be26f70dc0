//! NodeView tests of the policies an update carries: AuthorizationPolicies
//! compiled when applied, the references local workloads make to them, and
//! TrafficPolicies converted with the Services that carry them.

use weft_api::v1;

use super::tests::*;

fn deny_all(name: &str) -> v1::AuthorizationPolicy {
    v1::AuthorizationPolicy {
        namespace: "shop".into(),
        name: name.into(),
        action: v1::AuthorizationAction::Deny as i32,
        rules: vec![Default::default()],
    }
}

#[test]
fn a_workload_whose_policy_is_not_sent_is_kept_and_reported() {
    let mut web = workload("shop", "web-1", "web", "10.244.1.2", true);
    web.authorization_policies = vec!["shop/deny-batch".into()];
    let mut update = v1::ConfigUpdate {
        version: 1,
        full_state: true,
        local_workloads: vec![web],
        trust: Some(trust()),
        ..Default::default()
    };
    // The workload stays (its connections are refused by the gate, fail
    // closed), and the update says why.
    let (view, problem) = refused_entry(None, &update);
    assert!(problem.to_string().contains("shop/deny-batch"), "{problem}");
    assert_eq!(uids(view.local_workloads()), ["shop/web-1"]);

    update.authorization_policies = vec![deny_all("deny-batch")];
    let view = applied(&update);
    assert_eq!(view.authorization_policies().len(), 1);

    // A delta that removes the policy while web still refers to it: said.
    let removal = v1::ConfigUpdate {
        version: 2,
        removed_authorization_policies: vec!["shop/deny-batch".into()],
        ..Default::default()
    };
    let (_, problem) = refused_entry(Some(&view), &removal);
    assert!(problem.to_string().contains("shop/web-1"), "{problem}");

    // An invalid policy comes with a stand-in under its key: nothing to say.
    update.local_workloads[0].invalid_authorization_policies = vec!["shop/deny-batch".into()];
    let view = applied(&update);
    let web = &view.local_workloads()["shop/web-1"];
    assert_eq!(
        web.local().invalid_authorization_policies,
        ["shop/deny-batch"]
    );
}

#[test]
fn an_authorization_policy_is_compiled_when_applied() {
    let update = v1::ConfigUpdate {
        version: 1,
        full_state: true,
        trust: Some(trust()),
        authorization_policies: vec![v1::AuthorizationPolicy {
            namespace: "shop".into(),
            name: "deny".into(),
            action: v1::AuthorizationAction::Deny as i32,
            rules: vec![v1::AuthorizationRule {
                ip_blocks: vec!["10.0.0.0/8".into(), "10.0.0.0/40".into()],
                ..Default::default()
            }],
        }],
        ..Default::default()
    };
    let (view, problem) = refused_entry(None, &update);
    assert_eq!(
        problem.to_string(),
        "authorization policy shop/deny: AuthorizationPolicy shop/deny: rules[0].from.ipBlocks[1]: \"10.0.0.0/40\": the prefix length must be a number from 0 to 32"
    );
    assert!(view.authorization_policies().is_empty());
}

#[test]
fn unknown_policy_actions_and_mtls_modes_are_refused() {
    let mut update = v1::ConfigUpdate {
        version: 1,
        full_state: true,
        trust: Some(trust()),
        authorization_policies: vec![v1::AuthorizationPolicy {
            namespace: "shop".into(),
            name: "future".into(),
            action: 9,
            rules: vec![],
        }],
        ..Default::default()
    };
    assert!(
        refused_entry(None, &update)
            .1
            .to_string()
            .contains("unknown action")
    );
    update.authorization_policies.clear();
    let mut web = workload("shop", "web-1", "web", "10.244.1.2", true);
    web.mtls_mode = 7;
    update.local_workloads = vec![web];
    assert!(
        refused_entry(None, &update)
            .1
            .to_string()
            .contains("mtls_mode")
    );
}

fn with_policy(policy: v1::TrafficPolicy) -> v1::ConfigUpdate {
    let mut update = full(1);
    update.services[0].traffic_policy = Some(policy);
    update
}

#[test]
fn a_traffic_policy_is_converted() {
    let update = with_policy(v1::TrafficPolicy {
        mode: v1::LoadBalancing::PowerOfTwoChoices as i32,
        connect_timeout_ms: 250,
        max_connections: 2,
        retry_attempts: 1,
        outlier_consecutive_failures: 3,
        outlier_base_ejection_ms: 1000,
        outlier_max_ejection_ms: 5000,
        split: vec![v1::WeightedService {
            service: "default/web-v2".into(),
            weight: 5,
        }],
        policy: "default/tp".into(),
        ..v1::TrafficPolicy::default()
    });
    let view = applied(&update);
    let traffic = view.services()["default/web"].traffic.clone().unwrap();
    assert_eq!(traffic.mode, super::LoadBalancing::PowerOfTwoChoices);
    assert_eq!(
        traffic.connect_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(traffic.idle_timeout, None);
    assert_eq!(traffic.max_connections, Some(2));
    assert_eq!(traffic.retry_attempts, 1);
    assert_eq!(traffic.outlier.unwrap().consecutive_failures, 3);
    // A split target that is not in the view is fine: it gets nothing.
    assert_eq!(traffic.split, vec![("default/web-v2".to_owned(), 5)]);
}

#[test]
fn a_nonsensical_traffic_policy_is_refused() {
    let nonsense = [
        v1::TrafficPolicy {
            mode: 7,
            ..v1::TrafficPolicy::default()
        },
        v1::TrafficPolicy {
            idle_timeout_ms: u64::MAX,
            ..v1::TrafficPolicy::default()
        },
        v1::TrafficPolicy {
            outlier_consecutive_failures: 1,
            outlier_base_ejection_ms: 1,
            outlier_max_ejection_ms: u64::MAX,
            ..v1::TrafficPolicy::default()
        },
        v1::TrafficPolicy {
            outlier_consecutive_failures: 1,
            outlier_base_ejection_ms: 0,
            ..v1::TrafficPolicy::default()
        },
        v1::TrafficPolicy {
            split: vec![v1::WeightedService {
                service: "other-namespace/web".into(),
                weight: 1,
            }],
            ..v1::TrafficPolicy::default()
        },
        v1::TrafficPolicy {
            split: vec![v1::WeightedService {
                service: "default/web".into(),
                weight: 0,
            }],
            ..v1::TrafficPolicy::default()
        },
    ];
    for policy in nonsense {
        let (view, problem) = refused_entry(None, &with_policy(policy.clone()));
        assert!(
            problem
                .to_string()
                .starts_with("service default/web: TrafficPolicy"),
            "{policy:?}: {problem}"
        );
        assert!(!view.services().contains_key("default/web"));
    }
}
