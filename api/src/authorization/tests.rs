#![allow(clippy::unwrap_used)]

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn wire(
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

fn policy(
    name: &str,
    action: v1::AuthorizationAction,
    rules: Vec<v1::AuthorizationRule>,
) -> Policy {
    Policy::compile(&wire(name, action, rules)).unwrap()
}

fn rule_matches(rule: &v1::AuthorizationRule, connection: &Connection<'_>) -> bool {
    let policy = policy("p", v1::AuthorizationAction::Allow, vec![rule.clone()]);
    policy.rules[0].matches(connection)
}

fn principal_matches(pattern: &str, principal: &str) -> bool {
    PrincipalPattern::parse(pattern).unwrap().matches(principal)
}

fn ip_block_contains(block: &str, ip: IpAddr) -> bool {
    IpBlock::parse(block).unwrap().contains(ip)
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
fn an_unknown_action_is_refused_when_compiled() {
    let mut strange = wire(
        "future",
        v1::AuthorizationAction::Allow,
        vec![Default::default()],
    );
    strange.action = 42;
    let error = Policy::compile(&strange).unwrap_err().to_string();
    assert!(
        error.contains("shop/future") && error.contains("action"),
        "{error}"
    );
}

#[test]
fn values_that_do_not_parse_refuse_the_policy_naming_the_field() {
    let cases = [
        (
            v1::AuthorizationRule {
                ip_blocks: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
                ..Default::default()
            },
            "rules[1].from.ipBlocks[1]",
        ),
        (
            v1::AuthorizationRule {
                not_ip_blocks: vec!["not-an-ip".into()],
                ..Default::default()
            },
            "rules[1].from.notIpBlocks[0]",
        ),
        (
            v1::AuthorizationRule {
                principals: vec!["spiffe://cluster.local/*/sa/web".into()],
                ..Default::default()
            },
            "rules[1].from.principals[0]",
        ),
        (
            v1::AuthorizationRule {
                not_ports: vec![70000],
                ..Default::default()
            },
            "rules[1].to.notPorts[0]",
        ),
        (
            v1::AuthorizationRule {
                ports: vec![0],
                ..Default::default()
            },
            "rules[1].to.ports[0]",
        ),
    ];
    for (bad, field) in cases {
        let deny = wire(
            "broken",
            v1::AuthorizationAction::Deny,
            vec![Default::default(), bad],
        );
        let error = Policy::compile(&deny).unwrap_err().to_string();
        assert!(error.contains(field), "{field}: {error}");
        assert!(error.contains("shop/broken"), "{error}");
    }
}

#[test]
fn decide_refuses_plaintext_into_strict_and_policies_not_applied() {
    let allow_all = policy(
        "all",
        v1::AuthorizationAction::Allow,
        vec![Default::default()],
    );
    let keys = vec!["shop/all".to_owned()];
    let lookup = |key: &str| (key == "shop/all").then_some(&allow_all);
    let strict = Destination {
        mtls_strict: true,
        mtls_policy: "shop/strict",
        policies: &keys,
        invalid_policies: &[],
        quarantine: None,
    };
    let plaintext = decide(&strict, lookup, &conn(None, "10.0.0.1", 80));
    assert_eq!(
        plaintext.outcome,
        Outcome::PlaintextRefused("shop/strict".into())
    );
    assert!(decide(&strict, lookup, &conn(Some(WEB), "10.0.0.1", 80)).allowed());

    let missing = vec!["shop/all".to_owned(), "shop/invalid".to_owned()];
    let permissive = Destination {
        mtls_strict: false,
        mtls_policy: "",
        policies: &missing,
        invalid_policies: &[],
        quarantine: None,
    };
    let refused = decide(&permissive, lookup, &conn(Some(WEB), "10.0.0.1", 80));
    assert_eq!(
        refused.outcome,
        Outcome::PolicyNotApplied("shop/invalid".into())
    );
    assert!(!refused.allowed());
    assert_eq!(refused.policy(), "shop/invalid");

    // Invalid (a stand-in is sent under its key) or quarantined: refused,
    // saying why.
    let invalid = vec!["shop/all".to_owned()];
    let listed = Destination {
        invalid_policies: &invalid,
        ..permissive
    };
    let refused = decide(&listed, lookup, &conn(Some(WEB), "10.0.0.1", 80));
    assert_eq!(
        refused.outcome,
        Outcome::PolicyNotApplied("shop/all".into())
    );
    let quarantined = Destination {
        quarantine: Some("IP 10.0.0.9 is claimed by shop/a and shop/b"),
        ..strict
    };
    let refused = decide(&quarantined, lookup, &conn(Some(WEB), "10.0.0.1", 80));
    assert!(!refused.allowed());
    assert!(
        refused.to_string().contains("claimed by shop/a"),
        "{refused}"
    );
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
    // Host bits are ignored.
    assert!(ip_block_contains("10.1.2.3/8", ip("10.200.0.1")));
    // Garbage does not parse: it is refused when the policy is applied,
    // never silently a block that matches nothing.
    for bad in [
        "",
        "10.0.0.0/33",
        "10.0.0/8",
        "x/8",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "fd00::/129",
        "10.0.0.256",
    ] {
        assert!(IpBlock::parse(bad).is_err(), "{bad}");
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
