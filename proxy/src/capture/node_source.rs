//! The node's own connections to the ports the kubelet probes on its
//! meshed pods. The kubelet has no mesh identity: a probe captured like any
//! other client's would be plaintext, which STRICT refuses, and the pod
//! would never become ready. So the node gives its own connections to a
//! pod's probe ports a source address no pod has ([`NODE_SOURCE`],
//! [`NODE_SOURCE_V6`]), and the pod's redirection lets that source through
//! to those ports alone ([`super::pod`]).
//!
//! What that admits, and no more: any process of the node's own network
//! namespace (the kubelet, a hostNetwork pod) reaches a meshed pod's probe
//! ports unauthenticated, as it would without a mesh; every other port of
//! the pod it reaches as a plaintext client, which STRICT refuses. A pod
//! that forges the node's source address is dropped where the node
//! forwards its packets (routed, or bridged: [`bridge_ruleset`]); one that
//! got through would reach the probe ports alone.
//!
//! The node's rule (a table of its own in the node's namespace) sees only
//! connections the node opens itself (its `output` hook, which forwarded
//! and translated traffic from elsewhere never passes), also those to a
//! ClusterIP that the node's DNAT sent to a probe port of a meshed pod.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::command::run;
use super::{CaptureConfig, CaptureError};

/// The IPv4 source of the node's own connections to its pods' probe ports:
/// link-local, held by no pod; the one Istio's in-pod mode uses.
pub const NODE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// The IPv6 source of the node's own connections to its pods' probe ports:
/// a unique local address of weft's own (`7765:6674` is "weft").
pub const NODE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7765, 0x6674, 0, 0, 0, 0, 0x7f);

/// weft's table in the node's namespace.
const TABLE: &str = "inet weft_node_source";
/// The table an earlier weft used (IPv4, every port), removed with ours.
const EARLIER_TABLE: &str = "ip weft_node_source";
/// weft's table for bridged frames in the node's namespace.
const BRIDGE_TABLE: &str = "bridge weft_node_source";

/// The node's rules as an `nft -f` script: the node's own new TCP
/// connections to one of `probes` (a pod's address and probe port) leave
/// with the node source address of their family. Replaces the last one.
pub fn ruleset(config: &CaptureConfig, probes: &BTreeSet<SocketAddr>) -> String {
    let node = config.node_connection_mark;
    let elements = |v4: bool| {
        probes
            .iter()
            .filter(|probe| probe.is_ipv4() == v4)
            .map(|probe| format!("{} . {}", probe.ip(), probe.port()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut script = String::new();
    for table in [TABLE, EARLIER_TABLE] {
        let _ = writeln!(script, "table {table} {{}}\ndelete table {table}");
    }
    let _ = writeln!(script, "table {TABLE} {{");
    for (set, kind, v4) in [
        ("probes4", "ipv4_addr", true),
        ("probes6", "ipv6_addr", false),
    ] {
        let _ = writeln!(script, "\tset {set} {{\n\t\ttype {kind} . inet_service");
        let elements = elements(v4);
        if !elements.is_empty() {
            let _ = writeln!(script, "\t\telements = {{ {elements} }}");
        }
        script.push_str("\t}\n");
    }
    // After the node's own DNAT (priority -100: kube-proxy's ClusterIPs),
    // so that a connection is recognised by the pod it really reaches; the
    // source translation just before kube-proxy's masquerade (srcnat, 100),
    // since only the first source translation of a connection counts.
    let _ = writeln!(
        script,
        "\tchain output {{\n\t\ttype filter hook output priority 0; policy accept;\n\t\t\
         meta l4proto tcp ct state new ip daddr . tcp dport @probes4 ct mark set ct mark | {node:#x}\n\t\t\
         meta l4proto tcp ct state new ip6 daddr . tcp dport @probes6 ct mark set ct mark | {node:#x}\n\t}}"
    );
    let _ = writeln!(
        script,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 99; policy accept;\n\t\t\
         ct mark & {node:#x} == {node:#x} ip daddr . tcp dport @probes4 snat ip to {NODE_SOURCE}\n\t\t\
         ct mark & {node:#x} == {node:#x} ip6 daddr . tcp dport @probes6 snat ip6 to {NODE_SOURCE_V6}\n\t}}"
    );
    // Only the node sends from its source addresses: one forwarded (a pod
    // forging it, on this node or another) is dropped, routed or bridged
    // with br_netfilter on (see [`bridge_ruleset`] for bridges without).
    let _ = writeln!(
        script,
        "\tchain forward {{\n\t\ttype filter hook forward priority -10; policy accept;\n\t\t\
         ip saddr {NODE_SOURCE} drop\n\t\tip6 saddr {NODE_SOURCE_V6} drop\n\t}}"
    );
    script.push_str("}\n");
    script
}

/// weft's bridge-family table in the node's namespace: frames that a bridge
/// forwards between ports (pods on one bridge, br_netfilter off) with the
/// node's source addresses are dropped too. Separate from [`ruleset`]: a
/// kernel without bridge support for nftables refuses it, and that must not
/// take the probes' rules with it.
pub fn bridge_ruleset() -> String {
    format!(
        "table {BRIDGE_TABLE} {{}}\ndelete table {BRIDGE_TABLE}\ntable {BRIDGE_TABLE} {{\n\t\
         chain forward {{\n\t\ttype filter hook forward priority -10; policy accept;\n\t\t\
         ip saddr {NODE_SOURCE} drop\n\t\tip6 saddr {NODE_SOURCE_V6} drop\n\t}}\n}}\n"
    )
}

/// The probe addresses of a pod: each of its addresses with each port.
pub fn probes_of(ips: &BTreeSet<IpAddr>, ports: &BTreeSet<u16>) -> BTreeSet<SocketAddr> {
    ips.iter()
        .flat_map(|ip| ports.iter().map(|port| SocketAddr::new(*ip, *port)))
        .collect()
}

/// Installs [`ruleset`] for `probes` in the calling thread's namespace
/// (the node's), replacing the last one.
pub fn set(config: &CaptureConfig, probes: &BTreeSet<SocketAddr>) -> Result<(), CaptureError> {
    run(
        "setting the node's source address for its probes of meshed pods",
        "nft",
        &["-f", "-"],
        Some(&ruleset(config, probes)),
    )?;
    let bridged = run(
        "dropping bridged frames from the node's source address",
        "nft",
        &["-f", "-"],
        Some(&bridge_ruleset()),
    );
    if let Err(error) = bridged {
        tracing::warn!(%error, "no bridge-family table: with br_netfilter off, a pod on a bridge can forge the node's source to its neighbours' probe ports");
    }
    Ok(())
}

/// Removes what [`set`] installed (and an earlier weft's table); none
/// there is no error.
pub fn remove() -> Result<(), CaptureError> {
    let mut script = String::new();
    for table in [TABLE, EARLIER_TABLE] {
        let _ = writeln!(script, "table {table} {{}}\ndelete table {table}");
    }
    run(
        "removing the node's source address rule",
        "nft",
        &["-f", "-"],
        Some(&script),
    )?;
    // Best effort, as it was made: a kernel without bridge support for
    // nftables never had it.
    let _ = run(
        "removing the node's bridged-frames rule",
        "nft",
        &["-f", "-"],
        Some(&format!(
            "table {BRIDGE_TABLE} {{}}\ndelete table {BRIDGE_TABLE}\n"
        )),
    );
    Ok(())
}
