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

/// The chain that steers again in br_netfilter's second pass (see
/// [`table`]). It is the one chain [`reregister_script`] re-creates.
const AFTER_BRIDGE: &str = "after_bridge";
/// Its priority: br_netfilter's `ip_sabotage_in` sits at `NF_IP_PRI_FIRST`
/// (`INT_MIN`) and skips every later prerouting hook in that pass, so this
/// chain must be at the same priority and come first. Of two hooks at one
/// priority, the one registered later runs first.
const AFTER_BRIDGE_PRIORITY: i32 = i32::MIN;
/// Just after the `dstnat` priority (-100), where kube-proxy translates
/// ClusterIPs and NodePorts.
const AFTER_DNAT_PRIORITY: i32 = -90;

/// Every chain of weft's table, for [`adopt_script`].
const CHAINS: [&str; 8] = [
    "prerouting",
    "prerouting_after_dnat",
    "output_after_dnat",
    "hide_destination",
    "restore_destination",
    "input",
    "output",
    AFTER_BRIDGE,
];

/// Installs weft's table, taking over the meshed pod sets that a proxy
/// before this one (crashed, killed, or stopped for an upgrade) left in
/// the kernel: their elements stay, so the pods they hold stay captured
/// (and fail closed while no listener serves them) from the old process's
/// end to the new one's first update. Every chain is replaced. One
/// transaction: `nft -f` applies the whole script or nothing, so no packet
/// ever sees half a ruleset. (Each `add` creates what is missing, so that
/// the deletes succeed on a node without the table.)
pub(super) fn adopt_script(config: &CaptureConfig) -> String {
    let mut script = format!(
        "add table {TABLE}
"
    );
    for (set, family) in [(MESHED_V4, "ipv4_addr"), (MESHED_V6, "ipv6_addr")] {
        if family == "ipv4_addr" || config.ipv6 {
            let _ = writeln!(script, "add set {TABLE} {set} {{ type {family}; }}");
        }
    }
    for chain in CHAINS {
        let _ = writeln!(script, "add chain {TABLE} {chain}");
    }
    // Rules go first (jumps and gotos refer to chains), then the chains.
    let _ = writeln!(script, "flush table {TABLE}");
    for chain in CHAINS {
        let _ = writeln!(script, "delete chain {TABLE} {chain}");
    }
    script.push_str(&table(config));
    script.push_str(&after_bridge_chain(config));
    script
}

/// Replaces weft's table, whatever was left of it, with a fresh one holding
/// empty sets, in one transaction: the way back when the table left behind
/// cannot be adopted (a set of another type, say). (Creating the table
/// before deleting it makes the delete succeed when there is none.)
pub(super) fn install_script(config: &CaptureConfig) -> String {
    let mut script = format!("table {TABLE} {{}}\ndelete table {TABLE}\n");
    script.push_str(&table(config));
    script.push_str(&after_bridge_chain(config));
    script
}

/// Deletes weft's table if it exists, and only it.
pub(super) fn remove_script() -> String {
    format!("table {TABLE} {{}}\ndelete table {TABLE}\n")
}

/// Adds and removes meshed pods' IPs, and re-registers the
/// [`AFTER_BRIDGE`] chain (see [`reregister_script`]), in one transaction;
/// `None` when there is nothing to do. The caller guarantees that `add`
/// holds no IP already in the sets and `remove` none that is missing: nft
/// refuses both.
pub(super) fn update_script(
    config: &CaptureConfig,
    add: &[IpAddr],
    remove: &[IpAddr],
) -> Option<String> {
    let elements = element_updates(add, remove);
    (!elements.is_empty()).then(|| elements + &reregister_script(config))
}

/// Empties the sets and fills them with `meshed`, and re-registers the
/// [`AFTER_BRIDGE`] chain, in one transaction: the way back when the sets
/// are not what the caller thought they were.
pub(super) fn rewrite_script(config: &CaptureConfig, meshed: &BTreeSet<IpAddr>) -> String {
    let mut script = format!("flush set {TABLE} {MESHED_V4}\n");
    if config.ipv6 {
        let _ = writeln!(script, "flush set {TABLE} {MESHED_V6}");
    }
    let all: Vec<IpAddr> = meshed.iter().copied().collect();
    script.push_str(&element_updates(&all, &[]));
    script.push_str(&reregister_script(config));
    script
}

/// `add element` / `delete element` lines, per family.
fn element_updates(add: &[IpAddr], remove: &[IpAddr]) -> String {
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
    script
}

/// Deletes and re-creates the [`AFTER_BRIDGE`] chain, which registers its
/// hook anew. br_netfilter registers its hooks in a namespace when the
/// first bridge appears there, which may be after the capture was
/// installed (a fresh node gets its CNI bridge with its first pod); its
/// `ip_sabotage_in` then runs first and the chain never sees the second
/// pass. A pod is meshed only after its CNI set it up, so re-registering
/// with every update puts the chain back in front before any pod on a new
/// bridge is captured. Both hooks exist until the transaction commits:
/// no packet passes between them. (The first line creates the chain if
/// somebody deleted it, so that the delete succeeds.)
fn reregister_script(config: &CaptureConfig) -> String {
    format!(
        "{}flush chain {TABLE} {AFTER_BRIDGE}\ndelete chain {TABLE} {AFTER_BRIDGE}\n{}",
        after_bridge_declaration(),
        after_bridge_chain(config)
    )
}

/// `add chain` for the [`AFTER_BRIDGE`] chain, with its hook.
fn after_bridge_declaration() -> String {
    format!(
        "add chain {TABLE} {AFTER_BRIDGE} {{ type filter hook prerouting \
         priority {AFTER_BRIDGE_PRIORITY}; policy accept; }}\n"
    )
}

/// The `tproxy` statement that hands a packet to the listener on `port`.
fn tproxy(ip: &str, loopback: &str, port: u16) -> String {
    format!("tproxy {ip} to {loopback}:{port}")
}

/// The IP families to write rules for: (`ip` or `ip6`, the set of meshed
/// pods, the listeners' loopback address).
fn families(config: &CaptureConfig) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut families = vec![("ip", MESHED_V4, "127.0.0.1")];
    if config.ipv6 {
        families.push(("ip6", MESHED_V6, "[::1]"));
    }
    families
}

/// The [`AFTER_BRIDGE`] chain as `add chain` and `add rule` commands (it
/// is re-created alone, see [`reregister_script`]). It acts only on the
/// packets the `prerouting` chain handed to the proxy (`capture_mark`) and
/// that arrived through a bridge: it puts their destination back (see
/// `restore_destination` in [`table`]) and hands them to the same
/// listener, or to their established socket, again.
fn after_bridge_chain(config: &CaptureConfig) -> String {
    let capture = config.capture_mark;
    let chain = format!("{TABLE} {AFTER_BRIDGE}");
    let mut script = after_bridge_declaration();
    let mut rules = vec![
        format!("meta mark & {capture:#x} != {capture:#x} accept"),
        "meta iifkind != \"bridge\" accept".to_owned(),
        "meta l4proto != tcp accept".to_owned(),
        "jump restore_destination".to_owned(),
    ];
    for (ip, set, loopback) in families(config) {
        // The same reverse-path check as in the first pass: a packet with
        // a meshed pod's source must come from that pod's interface.
        rules.push(format!(
            "{ip} saddr @{set} fib saddr . iif oif exists meta l4proto tcp {} accept",
            tproxy(ip, loopback, config.outbound_port)
        ));
        rules.push(format!(
            "{ip} daddr @{set} tcp dport {} {} accept",
            config.hbone_port,
            tproxy(ip, loopback, config.hbone_port)
        ));
        rules.push(format!(
            "{ip} daddr @{set} meta l4proto tcp {} accept",
            tproxy(ip, loopback, config.inbound_plaintext_port)
        ));
    }
    for rule in rules {
        let _ = writeln!(script, "add rule {chain} {rule}");
    }
    script
}

/// The table: the sets, and these chains.
///
/// `prerouting` (at the mangle priority) decides. In order, it
/// 1. lets everything but TCP through untouched, and drops TCP from
///    outside the node to a loopback address (a martian, but rule 3 would
///    hand it to one of the proxy's loopback listeners);
/// 2. lets the proxy's own packets (`proxy_mark`) through, never steered;
/// 3. hands packets of the proxy's existing transparent sockets (replies to
///    [`connect_from`](crate::sockets::connect_from) connections, the rest
///    of captured connections) to local delivery: `capture_mark` makes the
///    policy rule route them to `lo`;
/// 4. lets through the replies to connections the node itself opened from
///    one of its own addresses (kubelet probes, hostNetwork clients, the
///    node's NodePort and ClusterIP clients, whose DNAT happens in its
///    `output` hook): `output` marks those connections in conntrack
///    (`node_connection_mark`) when their first packet leaves. Without
///    this, a meshed pod's SYN-ACK to a probe matched rule 5, whose
///    `tproxy` finds the node's socket, not transparent, and gives up, and
///    the fail-closed drop below took it. Only conntrack's view is trusted,
///    not addresses: only the node's own first packet makes such an entry,
///    a pod's packet is a reply to it only when the pod answers the node,
///    and `fib daddr type local` keeps the rule to packets delivered to the
///    node itself (not to the proxy's transparent connections, which the
///    output hook marks too, but from a pod's address), never forwarded
///    to a pod. Connections that reach a pod without passing rule 6 or 7
///    (DNAT by kube-proxy after this hook, for a pod's packets to a
///    ClusterIP or NodePort) were opened in `prerouting`, not by the node:
///    `prerouting_after_dnat` captures them to the inbound plaintext
///    listener, so they meet the authorization gate like any other;
/// 5. steers TCP leaving a meshed pod to the outbound listener, when it
///    arrived on the interface that leads to that pod (a reverse-path
///    check: nodes run with `rp_filter=0`, and nobody else may borrow a
///    meshed pod's IP, and with it its identity);
/// 6. steers TCP to a meshed pod's HBONE port to the HBONE listener;
/// 7. steers any other TCP to a meshed pod to the inbound plaintext
///    listener;
/// 8. drops what 5 to 7 would have steered but could not (see below).
///
/// Traffic from and to pods that are not in the sets matches nothing after
/// rule 4.
///
/// The rest makes rules 3 and 5 to 7 work for pods behind a Linux bridge
/// (the `bridge` CNI) with br_netfilter on (`bridge-nf-call-iptables=1`,
/// which kube-proxy needs). br_netfilter runs the IP prerouting hooks
/// while the frame is still in the bridge, with the bridge as `iif`; that
/// is where `prerouting` sees the packet. `tproxy` assigns the listener's
/// socket to the packet there, but when the bridge then passes the frame up
/// to IP, `ip_rcv` orphans it ("because of tproxy") and br_netfilter's
/// `ip_sabotage_in` skips every other prerouting hook: the SYN reaches TCP
/// with no socket and is dropped. Frames between two pods of the bridge do
/// not go up at all: the bridge forwards them, past the proxy. (Rule 5's
/// reverse-path check holds in both passes, which see the bridge as
/// `iif`; as without br_netfilter, it cannot tell apart the pods of one
/// bridge.) So:
/// - `hide_destination` (the end of rules 3 and 5 to 7, and of
///   `prerouting_after_dnat`) overwrites the destination of every packet
///   handed to the proxy with its source address. br_netfilter sees a
///   changed destination, as after a DNAT, routes the packet
///   (`capture_mark`: locally) and passes it up to IP instead of
///   forwarding it in the bridge. Without a bridge it keeps kube-proxy's
///   DNAT (priority dstnat, after this hook) from translating a meshed
///   client's connection to a ClusterIP: the proxy's socket must see the
///   destination the client dialled on every packet, or the handshake's
///   ACK, looked up by the ClusterIP here, misses the socket TCP made from
///   the translated SYN and is reset. Conntrack has already seen the
///   packet, and the rewrite is undone before any socket sees it;
/// - `after_bridge`, at priority `INT_MIN` ahead of `ip_sabotage_in` (see
///   [`reregister_script`]), runs in that second pass: it restores the
///   destination and hands the packet to its socket again;
/// - `input` restores the destination of every other captured packet
///   (one prerouting pass: no bridge, or a bridge without br_netfilter);
/// - `restore_destination` takes the destination from conntrack, by the
///   packet's direction: for the original direction, where replies come
///   from (the pod a NodePort or ClusterIP was translated to, else the
///   address dialled); a packet without a conntrack entry keeps the
///   rewritten one and reaches no socket.
///
/// Fail closed: a tproxy finds no listener (the proxy is gone or not up
/// yet) and the rule falls through. Without rule 8, a meshed pod's traffic
/// would then flow in plaintext, past policy.
fn table(config: &CaptureConfig) -> String {
    let capture = config.capture_mark;
    let proxy = config.proxy_mark;
    let node = config.node_connection_mark;
    let to_proxy = format!("meta mark set meta mark | {capture:#x} goto hide_destination");
    let mut chain = vec![
        "meta l4proto != tcp accept".to_owned(),
        "iif != \"lo\" ip daddr 127.0.0.0/8 drop".to_owned(),
    ];
    if config.ipv6 {
        chain.push("iif != \"lo\" ip6 daddr ::1 drop".to_owned());
    }
    chain.extend([
        format!("meta mark & {proxy:#x} == {proxy:#x} accept"),
        format!("socket transparent 1 {to_proxy}"),
        format!("ct direction reply ct mark & {node:#x} == {node:#x} fib daddr type local accept"),
    ]);
    let families = families(config);
    for &(ip, set, loopback) in &families {
        chain.push(format!(
            "{ip} saddr @{set} fib saddr . iif oif exists meta l4proto tcp {} {to_proxy}",
            tproxy(ip, loopback, config.outbound_port)
        ));
        chain.push(format!(
            "{ip} daddr @{set} tcp dport {} {} {to_proxy}",
            config.hbone_port,
            tproxy(ip, loopback, config.hbone_port)
        ));
        chain.push(format!(
            "{ip} daddr @{set} meta l4proto tcp {} {to_proxy}",
            tproxy(ip, loopback, config.inbound_plaintext_port)
        ));
    }
    for (ip, set, _) in &families {
        chain.push(format!(
            "{ip} saddr @{set} fib saddr . iif oif exists meta l4proto tcp drop"
        ));
        chain.push(format!("{ip} daddr @{set} meta l4proto tcp drop"));
    }

    // After kube-proxy's DNAT (priority dstnat = -100): connections to a
    // meshed pod that the chain above could not see as such, because they
    // were addressed to a ClusterIP or a NodePort of this node. Those the
    // chain above captured (a meshed client's) carry the capture mark.
    let mut after_dnat = vec![
        "meta l4proto != tcp accept".to_owned(),
        format!("meta mark & {proxy:#x} == {proxy:#x} accept"),
        format!("meta mark & {capture:#x} == {capture:#x} accept"),
        "ct status & dnat == 0 accept".to_owned(),
    ];
    for &(ip, set, loopback) in &families {
        after_dnat.push(format!(
            "{ip} daddr @{set} meta l4proto tcp {} {to_proxy}",
            tproxy(ip, loopback, config.inbound_plaintext_port)
        ));
        after_dnat.push(format!("{ip} daddr @{set} meta l4proto tcp drop"));
    }

    // After the node's own DNAT in `output` (priority dstnat): the proxy's
    // pass-through connections (a destination it does not mesh, dialled as
    // the client) that the node translated to one of its meshed pods: a
    // NodePort or hostPort of this node, a ClusterIP the proxy does not
    // know yet. They would reach the pod past its proxy's gate; a reset
    // fails them closed.
    let mut output_after_dnat = vec![
        "meta l4proto != tcp accept".to_owned(),
        format!("meta mark & {proxy:#x} != {proxy:#x} accept"),
        "ct status & dnat == 0 accept".to_owned(),
    ];
    for &(ip, set, _) in &families {
        output_after_dnat.push(format!(
            "{ip} daddr @{set} meta l4proto tcp reject with tcp reset"
        ));
    }

    let mut hide_destination = Vec::new();
    let mut restore = Vec::new();
    for (ip, _, _) in &families {
        hide_destination.push(format!("{ip} daddr set {ip} saddr accept"));
        // The destination as the connection's replies come from it: for a
        // connection kube-proxy DNAT'd (a ClusterIP, a NodePort) that is
        // the pod, not the address the client dialled.
        restore.push(format!(
            "ct direction original {ip} daddr set ct reply {ip} saddr return"
        ));
        restore.push(format!(
            "ct direction reply {ip} daddr set ct reply {ip} daddr return"
        ));
    }

    let mut table = format!("table {TABLE} {{\n");
    let _ = writeln!(table, "\tset {MESHED_V4} {{\n\t\ttype ipv4_addr\n\t}}");
    if config.ipv6 {
        let _ = writeln!(table, "\tset {MESHED_V6} {{\n\t\ttype ipv6_addr\n\t}}");
    }
    let base = |hook: &str| format!("type filter hook {hook} priority mangle; policy accept;");
    let chains = [
        ("prerouting", Some(base("prerouting")), chain),
        (
            "prerouting_after_dnat",
            Some(format!(
                "type filter hook prerouting priority {AFTER_DNAT_PRIORITY}; policy accept;"
            )),
            after_dnat,
        ),
        (
            "output_after_dnat",
            Some(format!(
                "type filter hook output priority {AFTER_DNAT_PRIORITY}; policy accept;"
            )),
            output_after_dnat,
        ),
        ("hide_destination", None, hide_destination),
        ("restore_destination", None, restore),
        (
            "input",
            Some(base("input")),
            vec![format!(
                "meta mark & {capture:#x} == {capture:#x} meta l4proto tcp \
                 jump restore_destination"
            )],
        ),
        (
            "output",
            Some(base("output")),
            vec![format!(
                "meta l4proto tcp ct state new ct mark set ct mark | {node:#x}"
            )],
        ),
    ];
    for (name, hook, rules) in chains {
        write_chain(&mut table, name, hook.as_deref(), &rules);
    }
    table.push_str("}\n");
    table
}

/// One chain inside a `table ... {}` block: its name, its hook line (a base
/// chain) if any, and its rules, one per line. The node's table and a pod's
/// (`pod.rs`) are written with it.
pub(super) fn write_chain(script: &mut String, name: &str, hook: Option<&str>, rules: &[String]) {
    let _ = writeln!(script, "\tchain {name} {{");
    if let Some(hook) = hook {
        let _ = writeln!(script, "\t\t{hook}");
    }
    for rule in rules {
        let _ = writeln!(script, "\t\t{rule}");
    }
    script.push_str("\t}\n");
}

#[cfg(test)]
#[path = "ruleset_tests.rs"]
mod tests;
