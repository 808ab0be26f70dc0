#![allow(clippy::unwrap_used)]

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn policy(
    name: &str,
    action: v1::AuthorizationAction,
    rules: Vec<v1::AuthorizationRule>,
) -> v1::AuthorizationPolicy {
    v1::AuthorizationPolicy {
        namespace: "shop".into(),
        name: name.into(),
        action: action as i32,
        rules,
    }
}

fn from_principals(principals: &[&str]) -> v1::AuthorizationRule {
    v1::AuthorizationRule {
        principals: principals.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    }
}

fn conn<'a>(principal: Option<&'a str>, ip: &str, port: u16) -> Connection<'a> {
    Connection {
        source_principal: principal,
        source_ip: ip.parse().unwrap(),
        destination_port: port,
    }
}

#[test]
fn without_policies_everything_is_allowed() {
    let decision = evaluate([], &conn(None, "10.0.0.1", 80));
    assert_eq!(decision.outcome, Outcome::AllowedByDefault);
    assert!(decision.allowed());
}

#[test]
fn an_allow_policy_admits_only_what_it_matches() {
    let allow = policy(
        "web-only",
        v1::AuthorizationAction::Allow,
        vec![from_principals(&[WEB])],
    );
    let ok = evaluate([&allow], &conn(Some(WEB), "10.0.0.1", 80));
    assert_eq!(
        ok.outcome,
        Outcome::Allowed(RuleRef {
            policy: "shop/web-only".into(),
            rule: 0
        })
    );
    let other = evaluate(
        [&allow],
        &conn(
            Some("spiffe://cluster.local/ns/shop/sa/batch"),
            "10.0.0.1",
            80,
        ),
    );
    assert_eq!(
        other.outcome,
        Outcome::NotAllowed(vec!["shop/web-only".into()])
    );
    assert!(!other.allowed());
    // Plaintext has no principal and cannot pass an identity rule.
    assert!(!evaluate([&allow], &conn(None, "10.0.0.1", 80)).allowed());
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    let allow = policy("nothing", v1::AuthorizationAction::Allow, vec![]);
    assert!(!evaluate([&allow], &conn(Some(WEB), "10.0.0.1", 80)).allowed());
}

#[test]
fn an_empty_rule_matches_everything() {
    let allow = policy(
        "all",
        v1::AuthorizationAction::Allow,
        vec![Default::default()],
    );
    assert!(evaluate([&allow], &conn(None, "10.0.0.1", 80)).allowed());
}

#[test]
fn deny_beats_allow() {
    let allow = policy(
        "all",
        v1::AuthorizationAction::Allow,
        vec![Default::default()],
    );
    let deny = policy(
        "no-web",
        v1::AuthorizationAction::Deny,
        vec![from_principals(&[WEB])],
    );
    let decision = evaluate([&allow, &deny], &conn(Some(WEB), "10.0.0.1", 80));
    assert_eq!(
        decision.outcome,
        Outcome::Denied(RuleRef {
            policy: "shop/no-web".into(),
            rule: 0
        })
    );
    assert_eq!(decision.policy(), "shop/no-web");
}

#[test]
fn audit_is_reported_and_never_enforced() {
    let audit = policy(
        "watch-web",
        v1::AuthorizationAction::Audit,
        vec![from_principals(&[WEB])],
    );
    let decision = evaluate([&audit], &conn(Some(WEB), "10.0.0.1", 80));
    assert!(decision.allowed());
    assert_eq!(decision.outcome, Outcome::AllowedByDefault);
    assert_eq!(
        decision.audits,
        vec![RuleRef {
            policy: "shop/watch-web".into(),
            rule: 0
        }]
    );
    // An audit does not count as an ALLOW policy applying.
    let deny = policy(
        "no-web",
        v1::AuthorizationAction::Deny,
        vec![from_principals(&[WEB])],
    );
    let decision = evaluate([&audit, &deny], &conn(Some(WEB), "10.0.0.1", 80));
    assert!(!decision.allowed());
    assert_eq!(decision.audits.len(), 1);
}

#[test]
fn an_unknown_action_refuses() {
    let mut strange = policy(
        "future",
        v1::AuthorizationAction::Allow,
        vec![Default::default()],
    );
    strange.action = 42;
    assert!(!evaluate([&strange], &conn(Some(WEB), "10.0.0.1", 80)).allowed());
}

#[test]
fn principal_patterns() {
    assert!(principal_matches("*", WEB));
    assert!(principal_matches("spiffe://cluster.local/ns/shop/*", WEB));
    assert!(principal_matches("*/sa/web", WEB));
    assert!(principal_matches(WEB, WEB));
    assert!(!principal_matches(
        "spiffe://cluster.local/ns/shop/sa/we",
        WEB
    ));
    // Another trust domain with the same path is another principal.
    assert!(!principal_matches(
        WEB,
        "spiffe://evil.example/ns/shop/sa/web"
    ));
    assert!(!principal_matches(
        "spiffe://cluster.local/ns/shop/*",
        "spiffe://cluster.local/ns/shopping/sa/x/../../shop"
    ));
}

#[test]
fn namespaces_come_from_the_verified_identity_only() {
    let rule = v1::AuthorizationRule {
        namespaces: vec!["shop".into()],
        ..Default::default()
    };
    assert!(rule_matches(&rule, &conn(Some(WEB), "10.0.0.1", 80)));
    assert!(!rule_matches(&rule, &conn(None, "10.0.0.1", 80)));
    assert!(!rule_matches(
        &rule,
        &conn(
            Some("spiffe://cluster.local/ns/shopx/sa/web"),
            "10.0.0.1",
            80
        )
    ));
    // A malformed principal has no namespace.
    assert_eq!(namespace_of("spiffe://cluster.local/shop/sa/web"), None);
    assert_eq!(namespace_of("spiffe://cluster.local/ns//sa/web"), None);
    assert_eq!(namespace_of(WEB), Some("shop"));
}

#[test]
fn negations_exclude() {
    let rule = v1::AuthorizationRule {
        not_principals: vec![WEB.into()],
        not_ports: vec![22],
        not_ip_blocks: vec!["10.9.0.0/16".into()],
        not_namespaces: vec!["legacy".into()],
        ..Default::default()
    };
    assert!(rule_matches(&rule, &conn(None, "10.0.0.1", 80)));
    assert!(!rule_matches(&rule, &conn(Some(WEB), "10.0.0.1", 80)));
    assert!(!rule_matches(&rule, &conn(None, "10.0.0.1", 22)));
    assert!(!rule_matches(&rule, &conn(None, "10.9.3.4", 80)));
    assert!(!rule_matches(
        &rule,
        &conn(
            Some("spiffe://cluster.local/ns/legacy/sa/x"),
            "10.0.0.1",
            80
        )
    ));
}

#[test]
fn ports_and_all_fields_together() {
    let rule = v1::AuthorizationRule {
        principals: vec![WEB.into()],
        ip_blocks: vec!["10.244.1.0/24".into()],
        ports: vec![5432],
        ..Default::default()
    };
    assert!(rule_matches(&rule, &conn(Some(WEB), "10.244.1.7", 5432)));
    assert!(!rule_matches(&rule, &conn(Some(WEB), "10.244.1.7", 5433)));
    assert!(!rule_matches(&rule, &conn(Some(WEB), "10.244.2.7", 5432)));
}

#[test]
fn ip_blocks() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(ip_block_contains("10.0.0.0/8", ip("10.1.2.3")));
    assert!(!ip_block_contains("10.0.0.0/8", ip("11.1.2.3")));
    assert!(ip_block_contains("10.1.2.3", ip("10.1.2.3")));
    assert!(!ip_block_contains("10.1.2.3", ip("10.1.2.4")));
    assert!(ip_block_contains("0.0.0.0/0", ip("192.0.2.1")));
    assert!(ip_block_contains("10.0.0.0/8", ip("::ffff:10.1.2.3")));
    assert!(ip_block_contains("fd00::/8", ip("fd12::1")));
    assert!(!ip_block_contains("fd00::/8", ip("fe80::1")));
    assert!(ip_block_contains("::/0", ip("fe80::1")));
    assert!(!ip_block_contains("10.0.0.0/8", ip("fd12::1")));
    // Garbage contains nothing, so it can never widen a rule.
    for bad in [
        "",
        "10.0.0.0/33",
        "10.0.0/8",
        "x/8",
        "10.0.0.0/-1",
        "fd00::/129",
    ] {
        assert!(!ip_block_contains(bad, ip("10.0.0.1")), "{bad}");
    }
}

#[test]
fn the_decision_reads_as_a_sentence() {
    let deny = policy(
        "no-web",
        v1::AuthorizationAction::Deny,
        vec![Default::default(), from_principals(&[WEB])],
    );
    let audit = policy(
        "watch",
        v1::AuthorizationAction::Audit,
        vec![Default::default()],
    );
    let text = evaluate([&audit, &deny], &conn(Some(WEB), "10.0.0.1", 80)).to_string();
    assert_eq!(
        text,
        "denied by DENY shop/no-web rule 0; audited by AUDIT shop/watch rule 0"
    );
}
