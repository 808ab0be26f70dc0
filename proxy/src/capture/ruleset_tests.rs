//! The rule sets `ruleset.rs` writes, read without root.

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a literal IP address")
}

/// The rules of `chain` in `script`, in order, as written by [`table`].
fn chain_rules<'a>(script: &'a str, chain: &str) -> Vec<&'a str> {
    let start = script
        .find(&format!("\tchain {chain} {{\n"))
        .unwrap_or_else(|| panic!("no chain {chain}:\n{script}"));
    script[start..]
        .lines()
        .skip(1)
        .take_while(|line| *line != "\t}")
        .map(str::trim)
        .filter(|line| !line.starts_with("type "))
        .collect()
}

const TO_PROXY: &str = "meta mark set meta mark | 0x1 goto hide_destination";

#[test]
fn the_default_table_steers_meshed_pods_to_the_three_listeners() {
    let script = install_script(&CaptureConfig::default());
    assert!(script.starts_with("table inet weft {}\ndelete table inet weft\n"));
    let prerouting = chain_rules(&script, "prerouting");
    let expected = [
        "meta l4proto != tcp accept".to_owned(),
        "iif != \"lo\" ip daddr 127.0.0.0/8 drop".to_owned(),
        "iif != \"lo\" ip6 daddr ::1 drop".to_owned(),
        "meta mark & 0x2 == 0x2 accept".to_owned(),
        format!("socket transparent 1 {TO_PROXY}"),
        "ct direction reply ct mark & 0x4 == 0x4 fib daddr type local accept".to_owned(),
        format!(
            "ip saddr @meshed_v4 fib saddr . iif oif exists meta l4proto tcp \
             tproxy ip to 127.0.0.1:15001 {TO_PROXY}"
        ),
        format!("ip daddr @meshed_v4 tcp dport 15008 tproxy ip to 127.0.0.1:15008 {TO_PROXY}"),
        format!("ip daddr @meshed_v4 meta l4proto tcp tproxy ip to 127.0.0.1:15006 {TO_PROXY}"),
        format!(
            "ip6 saddr @meshed_v6 fib saddr . iif oif exists meta l4proto tcp \
             tproxy ip6 to [::1]:15001 {TO_PROXY}"
        ),
        format!("ip6 daddr @meshed_v6 tcp dport 15008 tproxy ip6 to [::1]:15008 {TO_PROXY}"),
        format!("ip6 daddr @meshed_v6 meta l4proto tcp tproxy ip6 to [::1]:15006 {TO_PROXY}"),
        "ip saddr @meshed_v4 fib saddr . iif oif exists meta l4proto tcp drop".to_owned(),
        "ip daddr @meshed_v4 meta l4proto tcp drop".to_owned(),
        "ip6 saddr @meshed_v6 fib saddr . iif oif exists meta l4proto tcp drop".to_owned(),
        "ip6 daddr @meshed_v6 meta l4proto tcp drop".to_owned(),
    ];
    assert_eq!(prerouting, expected, "{script}");
}

#[test]
fn replies_to_the_node_pass_but_only_after_the_proxys_own_sockets() {
    let script = install_script(&CaptureConfig::default());
    let prerouting = chain_rules(&script, "prerouting");
    let position = |needle: &str| {
        prerouting
            .iter()
            .position(|rule| rule.contains(needle))
            .unwrap_or_else(|| panic!("no rule with {needle:?}: {prerouting:?}"))
    };
    let exemption = position("ct direction reply");
    // Replies to the proxy's transparent connections keep reaching the
    // proxy (and get the capture mark the policy routing needs).
    assert!(position("socket transparent 1") < exemption);
    // ... and the exemption comes before any steering or dropping.
    assert!(exemption < position("tproxy ip to 127.0.0.1:15001"));
    assert!(exemption < position("@meshed_v4 fib saddr . iif oif exists meta l4proto tcp drop"));
    // It trusts conntrack, not addresses: only connections the node's
    // own output hook marked, and only packets delivered to the node.
    let rule = prerouting[exemption];
    assert!(rule.contains("ct mark & 0x4 == 0x4"), "{rule}");
    assert!(rule.contains("fib daddr type local"), "{rule}");
    assert!(!rule.contains("saddr"), "{rule}");
    assert_eq!(
        chain_rules(&script, "output"),
        ["meta l4proto tcp ct state new ct mark set ct mark | 0x4"]
    );
    assert!(script.contains("type filter hook output priority mangle;"));
}

#[test]
fn connections_kube_proxy_translated_to_a_meshed_pod_are_captured_after_it() {
    let script = install_script(&CaptureConfig::default());
    assert!(script.contains("type filter hook prerouting priority -90;"));
    assert_eq!(
        chain_rules(&script, "prerouting_after_dnat"),
        [
            "meta l4proto != tcp accept",
            "meta mark & 0x2 == 0x2 accept",
            "meta mark & 0x1 == 0x1 accept",
            "ct status & dnat == 0 accept",
            "ip daddr @meshed_v4 meta l4proto tcp tproxy ip to 127.0.0.1:15006 \
             meta mark set meta mark | 0x1 goto hide_destination",
            "ip daddr @meshed_v4 meta l4proto tcp drop",
            "ip6 daddr @meshed_v6 meta l4proto tcp tproxy ip6 to [::1]:15006 \
             meta mark set meta mark | 0x1 goto hide_destination",
            "ip6 daddr @meshed_v6 meta l4proto tcp drop",
        ]
    );
}

#[test]
fn pass_through_connections_the_node_translates_to_a_meshed_pod_are_reset() {
    let script = install_script(&CaptureConfig::default());
    assert!(script.contains("type filter hook output priority -90;"));
    assert_eq!(
        chain_rules(&script, "output_after_dnat"),
        [
            "meta l4proto != tcp accept",
            "meta mark & 0x2 != 0x2 accept",
            "ct status & dnat == 0 accept",
            "ip daddr @meshed_v4 meta l4proto tcp reject with tcp reset",
            "ip6 daddr @meshed_v6 meta l4proto tcp reject with tcp reset",
        ]
    );
    let prerouting = chain_rules(&script, "prerouting");
    assert_eq!(prerouting[1], "iif != \"lo\" ip daddr 127.0.0.0/8 drop");
}

#[test]
fn packets_through_a_bridge_are_lifted_to_ip_and_steered_again() {
    let script = install_script(&CaptureConfig::default());
    assert_eq!(
        chain_rules(&script, "hide_destination"),
        [
            "ip daddr set ip saddr accept",
            "ip6 daddr set ip6 saddr accept",
        ]
    );
    assert_eq!(
        chain_rules(&script, "restore_destination"),
        [
            "ct direction original ip daddr set ct reply ip saddr return",
            "ct direction reply ip daddr set ct reply ip daddr return",
            "ct direction original ip6 daddr set ct reply ip6 saddr return",
            "ct direction reply ip6 daddr set ct reply ip6 daddr return",
        ]
    );
    assert_eq!(
        chain_rules(&script, "input"),
        ["meta mark & 0x1 == 0x1 meta l4proto tcp jump restore_destination"]
    );
    // The second pass: at INT_MIN, only for packets already handed to
    // the proxy, restoring before steering.
    let after_bridge = after_bridge_chain(&CaptureConfig::default());
    assert!(script.ends_with(&after_bridge), "{script}");
    let lines: Vec<&str> = after_bridge.lines().collect();
    assert_eq!(
        lines[0],
        "add chain inet weft after_bridge { type filter hook prerouting \
         priority -2147483648; policy accept; }"
    );
    let rules: Vec<&str> = lines[1..]
        .iter()
        .map(|line| {
            line.strip_prefix("add rule inet weft after_bridge ")
                .unwrap_or_else(|| panic!("not a rule of after_bridge: {line}"))
        })
        .collect();
    assert_eq!(
        rules[..6],
        [
            "meta mark & 0x1 != 0x1 accept",
            "meta iifkind != \"bridge\" accept",
            "meta l4proto != tcp accept",
            "jump restore_destination",
            "ip saddr @meshed_v4 fib saddr . iif oif exists meta l4proto tcp \
             tproxy ip to 127.0.0.1:15001 accept",
            "ip daddr @meshed_v4 tcp dport 15008 tproxy ip to 127.0.0.1:15008 accept",
        ]
    );
    assert_eq!(rules.len(), 10, "{after_bridge}");
}

#[test]
fn without_ipv6_there_is_no_ipv6_set_or_rule() {
    let config = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let script = install_script(&config);
    assert!(!script.contains("ip6"), "{script}");
    assert!(!script.contains(MESHED_V6), "{script}");
}

#[test]
fn a_rewrite_empties_the_sets_first() {
    let config = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let meshed = BTreeSet::from([ip("10.244.1.2")]);
    let script = rewrite_script(&config, &meshed);
    assert!(
        script.starts_with(
            "flush set inet weft meshed_v4\n\
             add element inet weft meshed_v4 { 10.244.1.2 }\n\
             add chain inet weft after_bridge { type filter hook prerouting \
             priority -2147483648; policy accept; }\n\
             flush chain inet weft after_bridge\n"
        ),
        "{script}"
    );
    assert!(script.ends_with(&after_bridge_chain(&config)), "{script}");
}

#[test]
fn updates_touch_only_the_difference_per_family_and_reregister_the_second_pass() {
    let config = CaptureConfig::default();
    assert_eq!(update_script(&config, &[], &[]), None);
    let script = update_script(
        &config,
        &[ip("10.244.1.2"), ip("10.244.1.3"), ip("fd00::2")],
        &[ip("10.244.1.9")],
    );
    let expected = format!(
        "delete element inet weft meshed_v4 {{ 10.244.1.9 }}\n\
         add element inet weft meshed_v4 {{ 10.244.1.2, 10.244.1.3 }}\n\
         add element inet weft meshed_v6 {{ fd00::2 }}\n\
         add chain inet weft after_bridge {{ type filter hook prerouting \
         priority -2147483648; policy accept; }}\n\
         flush chain inet weft after_bridge\n\
         delete chain inet weft after_bridge\n\
         {}",
        after_bridge_chain(&config)
    );
    assert_eq!(script, Some(expected));
}

#[test]
fn adopting_keeps_the_sets_and_replaces_every_chain() {
    let config = CaptureConfig::default();
    let script = adopt_script(&config);
    assert!(script.starts_with("add table inet weft\n"), "{script}");
    // The sets are only ever added to (kept if there), never flushed or
    // deleted: their elements are the pods the last run captured.
    assert!(!script.contains("delete table"), "{script}");
    assert!(!script.contains("flush set"), "{script}");
    assert!(script.contains("add set inet weft meshed_v4 { type ipv4_addr; }"));
    assert!(script.contains("add set inet weft meshed_v6 { type ipv6_addr; }"));
    // Every chain the table defines is deleted first, so that none of the
    // last run's rules survives next to the new ones.
    let defined: BTreeSet<&str> = script
        .lines()
        .filter_map(|line| line.trim().strip_prefix("chain "))
        .filter_map(|rest| rest.split_whitespace().next())
        .chain(
            script
                .lines()
                .filter_map(|line| line.strip_prefix("add chain inet weft "))
                .filter_map(|rest| rest.split_whitespace().next()),
        )
        .collect();
    let deleted: BTreeSet<&str> = script
        .lines()
        .filter_map(|line| line.strip_prefix("delete chain inet weft "))
        .collect();
    assert_eq!(defined, deleted, "{script}");
    // The rules are those of a fresh install.
    let fresh = install_script(&config);
    assert_eq!(
        chain_rules(&script, "prerouting"),
        chain_rules(&fresh, "prerouting")
    );

    let v4_only = adopt_script(&CaptureConfig {
        ipv6: false,
        ..config
    });
    assert!(!v4_only.contains("meshed_v6"), "{v4_only}");
}
