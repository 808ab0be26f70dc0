//! The nftables side of the capture, as `nft -f` scripts: pure functions of
//! the config and the meshed pods, so what the node gets can be read (and
//! tested) without root.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::CaptureConfig;

/// The family and name of weft's table; nothing else in the node's
/// ruleset is ever touched.
pub(super) const TABLE: &str = "inet weft";

/// The set of meshed local pods' IPv4 addresses.
const MESHED_V4: &str = "meshed_v4";
/// The set of meshed local pods' IPv6 addresses.
const MESHED_V6: &str = "meshed_v6";

/// Replaces weft's table, whatever a crashed run left of it, with a fresh
/// one holding empty sets, in one transaction: `nft -f` applies the whole
/// script or nothing, so no packet ever sees half a ruleset. (Creating the
/// table before deleting it makes the delete succeed when there is none.)
pub(super) fn install_script(config: &CaptureConfig) -> String {
    let mut script = format!("table {TABLE} {{}}\ndelete table {TABLE}\n");
    script.push_str(&table(config));
    script
}

/// Deletes weft's table if it exists, and only it.
pub(super) fn remove_script() -> String {
    format!("table {TABLE} {{}}\ndelete table {TABLE}\n")
}

/// Adds and removes meshed pods' IPs in one transaction; `None` when there
/// is nothing to do. The caller guarantees that `add` holds no IP already
/// in the sets and `remove` none that is missing: nft refuses both.
pub(super) fn update_script(add: &[IpAddr], remove: &[IpAddr]) -> Option<String> {
    let mut script = String::new();
    for (verb, ips) in [("delete", remove), ("add", add)] {
        for (set, v4) in [(MESHED_V4, true), (MESHED_V6, false)] {
            let elements: Vec<String> = ips
                .iter()
                .filter(|ip| ip.is_ipv4() == v4)
                .map(IpAddr::to_string)
                .collect();
            if !elements.is_empty() {
                let _ = writeln!(
                    script,
                    "{verb} element {TABLE} {set} {{ {} }}",
                    elements.join(", ")
                );
            }
        }
    }
    (!script.is_empty()).then_some(script)
}

/// Empties the sets and fills them with `meshed`, in one transaction: the
/// way back when the sets are not what the caller thought they were.
pub(super) fn rewrite_script(meshed: &BTreeSet<IpAddr>, ipv6: bool) -> String {
    let mut script = format!("flush set {TABLE} {MESHED_V4}\n");
    if ipv6 {
        let _ = writeln!(script, "flush set {TABLE} {MESHED_V6}");
    }
    let all: Vec<IpAddr> = meshed.iter().copied().collect();
    script.push_str(&update_script(&all, &[]).unwrap_or_default());
    script
}

/// The table: the sets, and one chain at the prerouting hook that, in
/// order,
/// 1. lets everything but TCP through untouched;
/// 2. lets the proxy's own packets (`proxy_mark`) through, never steered;
/// 3. hands packets of the proxy's existing transparent sockets (replies to
///    [`connect_from`](crate::sockets::connect_from) connections, the rest
///    of captured connections) to local delivery: `capture_mark` makes the
///    policy rule route them to `lo`;
/// 4. steers TCP leaving a meshed pod to the outbound listener, when it
///    arrived on the interface that leads to that pod (a reverse-path
///    check: nodes run with `rp_filter=0`, and nobody else may borrow a
///    meshed pod's IP, and with it its identity);
/// 5. steers TCP to a meshed pod's HBONE port to the HBONE listener;
/// 6. steers any other TCP to a meshed pod to the inbound plaintext
///    listener.
///
/// Traffic from and to pods that are not in the sets matches nothing after
/// rule 3, and the node's own traffic (kubelet probes) never passes the
/// prerouting hook at all.
fn table(config: &CaptureConfig) -> String {
    let capture = config.capture_mark;
    let proxy = config.proxy_mark;
    let set_mark = format!("meta mark set meta mark | {capture:#x}");
    let mut chain = vec![
        "meta l4proto != tcp accept".to_owned(),
        format!("meta mark & {proxy:#x} == {proxy:#x} accept"),
        format!("socket transparent 1 {set_mark} accept"),
    ];
    let mut families = vec![("ip", MESHED_V4, "127.0.0.1")];
    if config.ipv6 {
        families.push(("ip6", MESHED_V6, "[::1]"));
    }
    for &(ip, set, loopback) in &families {
        let tproxy = |port: u16| format!("tproxy {ip} to {loopback}:{port} {set_mark} accept");
        chain.push(format!(
            "{ip} saddr @{set} fib saddr . iif oif exists meta l4proto tcp {}",
            tproxy(config.outbound_port)
        ));
        chain.push(format!(
            "{ip} daddr @{set} tcp dport {} {}",
            config.hbone_port,
            tproxy(config.hbone_port)
        ));
        chain.push(format!(
            "{ip} daddr @{set} meta l4proto tcp {}",
            tproxy(config.inbound_plaintext_port)
        ));
    }
    // Fail closed: a tproxy finds no listener (the proxy is gone or not up
    // yet) and the rule above falls through. Without these, a meshed pod's
    // traffic would then flow in plaintext, past policy.
    for (ip, set, _) in &families {
        chain.push(format!(
            "{ip} saddr @{set} fib saddr . iif oif exists meta l4proto tcp drop"
        ));
        chain.push(format!("{ip} daddr @{set} meta l4proto tcp drop"));
    }

    let mut table = format!("table {TABLE} {{\n");
    let _ = writeln!(table, "\tset {MESHED_V4} {{\n\t\ttype ipv4_addr\n\t}}");
    if config.ipv6 {
        let _ = writeln!(table, "\tset {MESHED_V6} {{\n\t\ttype ipv6_addr\n\t}}");
    }
    table.push_str("\tchain prerouting {\n");
    table.push_str("\t\ttype filter hook prerouting priority mangle; policy accept;\n");
    for rule in chain {
        let _ = writeln!(table, "\t\t{rule}");
    }
    table.push_str("\t}\n}\n");
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a literal IP address")
    }

    #[test]
    fn the_default_table_steers_meshed_pods_to_the_three_listeners() {
        let script = install_script(&CaptureConfig::default());
        assert!(script.starts_with("table inet weft {}\ndelete table inet weft\n"));
        for rule in [
            "meta l4proto != tcp accept",
            "meta mark & 0x2 == 0x2 accept",
            "socket transparent 1 meta mark set meta mark | 0x1 accept",
            "ip saddr @meshed_v4 fib saddr . iif oif exists meta l4proto tcp \
             tproxy ip to 127.0.0.1:15001 meta mark set meta mark | 0x1 accept",
            "ip daddr @meshed_v4 tcp dport 15008 \
             tproxy ip to 127.0.0.1:15008 meta mark set meta mark | 0x1 accept",
            "ip daddr @meshed_v4 meta l4proto tcp \
             tproxy ip to 127.0.0.1:15006 meta mark set meta mark | 0x1 accept",
            "ip6 daddr @meshed_v6 tcp dport 15008 \
             tproxy ip6 to [::1]:15008 meta mark set meta mark | 0x1 accept",
            "ip saddr @meshed_v4 fib saddr . iif oif exists meta l4proto tcp drop",
            "ip daddr @meshed_v4 meta l4proto tcp drop",
        ] {
            assert!(
                script.contains(&format!("\t\t{rule}\n")),
                "{rule}\n{script}"
            );
        }
        // The socket match comes before any steering: replies to the proxy's
        // transparent connections must never be captured again.
        let socket = script.find("socket transparent");
        let first_tproxy = script.find("tproxy");
        assert!(socket < first_tproxy);
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
        let meshed = BTreeSet::from([ip("10.244.1.2")]);
        assert_eq!(
            rewrite_script(&meshed, false),
            "flush set inet weft meshed_v4\n\
             add element inet weft meshed_v4 { 10.244.1.2 }\n"
        );
    }

    #[test]
    fn updates_touch_only_the_difference_per_family() {
        assert_eq!(update_script(&[], &[]), None);
        let script = update_script(
            &[ip("10.244.1.2"), ip("10.244.1.3"), ip("fd00::2")],
            &[ip("10.244.1.9")],
        );
        assert_eq!(
            script.as_deref(),
            Some(
                "delete element inet weft meshed_v4 { 10.244.1.9 }\n\
                 add element inet weft meshed_v4 { 10.244.1.2, 10.244.1.3 }\n\
                 add element inet weft meshed_v6 { fd00::2 }\n"
            )
        );
    }
}
