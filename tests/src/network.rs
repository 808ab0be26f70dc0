//! Turning a planned [`Topology`] into namespaces, veths, bridges, addresses, routes
//! and sysctls. Nothing is created in the host's root namespace: every `ip` command
//! runs with `-n <testbed namespace>`, veth peers are created directly in their target
//! namespace, and sysctls are written from inside the namespace they belong to.

use anyhow::{Context, Result};

use crate::topology::{BRIDGE, NODE_NETWORK, POD_BRIDGE, PodNetwork, Topology, node_ip6, pod_ip6};
use crate::{cleanup, netns};

/// Creates every namespace of `topology`. Each name is recorded in `created` (and
/// for the signal handler) right before it is created, so whatever exists can be
/// deleted again if a later step fails.
pub(crate) fn create_namespaces(topology: &Topology, created: &mut Vec<String>) -> Result<()> {
    for name in topology.all_netns() {
        cleanup::track_netns(&name);
        created.push(name.clone());
        netns::create(&name)?;
    }
    Ok(())
}

/// Wires the namespaces: bridge, node uplinks, pod veths, addresses, routes, sysctls.
pub(crate) fn wire(topology: &Topology) -> Result<()> {
    wire_fabric(topology)?;
    for node in 0..topology.nodes.len() {
        wire_node(topology, node)?;
    }
    let families = topology.ip_families;
    for pod in &topology.pods {
        let node = &topology.nodes[pod.node];
        let gateway = node.pod_gateway;
        let gateway6 = pod_ip6(node.index, 1);
        let mut commands = vec!["link set eth0 up".to_owned()];
        match topology.pod_network {
            PodNetwork::PointToPoint => {
                if families.v4() {
                    commands.extend([
                        format!("addr add {}/32 dev eth0", pod.ip),
                        format!("route add {gateway} dev eth0 scope link"),
                        format!("route add default via {gateway} dev eth0"),
                    ]);
                }
                if families.v6() {
                    commands.extend([
                        format!("addr add {}/128 dev eth0 nodad", pod.ip6),
                        format!("route add {gateway6} dev eth0"),
                        format!("route add ::/0 via {gateway6} dev eth0"),
                    ]);
                }
            }
            // The /24 (/64) brings the route to the node's other pods (and
            // the gateway) on the link.
            PodNetwork::Bridge => {
                if families.v4() {
                    commands.extend([
                        format!("addr add {}/{} dev eth0", pod.ip, node.pod_cidr.prefix_len),
                        format!("route add default via {gateway} dev eth0"),
                    ]);
                }
                if families.v6() {
                    commands.extend([
                        format!("addr add {}/64 dev eth0 nodad", pod.ip6),
                        format!("route add ::/0 via {gateway6} dev eth0"),
                    ]);
                }
            }
        }
        netns::ip_batch(&pod.netns, &commands)
            .with_context(|| format!("wiring pod {}", pod.name))?;
    }
    Ok(())
}

/// The fabric namespace holds the bridge, and one veth per node on it; the other end
/// of each is the node's `eth0`.
fn wire_fabric(topology: &Topology) -> Result<()> {
    let mut commands = vec![
        format!("link add {BRIDGE} type bridge"),
        format!("link set {BRIDGE} up"),
    ];
    for node in &topology.nodes {
        let port = format!("n{}", node.index);
        commands.push(format!(
            "link add {port} type veth peer name eth0 netns {}",
            node.netns
        ));
        commands.push(format!("link set {port} master {BRIDGE}"));
        commands.push(format!("link set {port} up"));
    }
    netns::ip_batch(&topology.fabric_netns, &commands).context("wiring the fabric")
}

fn wire_node(topology: &Topology, index: usize) -> Result<()> {
    let node = &topology.nodes[index];
    let v6 = topology.ip_families.v6();
    let mut commands = vec![
        format!("addr add {}/{} dev eth0", node.ip, NODE_NETWORK.prefix_len),
        "link set eth0 up".to_owned(),
    ];
    if v6 {
        commands.push(format!(
            "addr add {}/64 dev eth0 nodad",
            node_ip6(node.index)
        ));
    }
    let gateway6 = pod_ip6(node.index, 1);
    let mut interfaces = vec!["lo".to_owned(), "eth0".to_owned()];
    if topology.pod_network == PodNetwork::Bridge {
        commands.push(format!("link add {POD_BRIDGE} type bridge"));
        commands.push(format!(
            "addr add {}/{} dev {POD_BRIDGE}",
            node.pod_gateway, node.pod_cidr.prefix_len
        ));
        if v6 {
            commands.push(format!("addr add {gateway6}/64 dev {POD_BRIDGE} nodad"));
        }
        commands.push(format!("link set {POD_BRIDGE} up"));
        interfaces.push(POD_BRIDGE.to_owned());
    }
    for pod in topology.pods.iter().filter(|p| p.node == index) {
        let veth = &pod.node_veth;
        commands.push(format!(
            "link add {veth} type veth peer name eth0 netns {}",
            pod.netns
        ));
        match topology.pod_network {
            PodNetwork::PointToPoint => {
                commands.push(format!("addr add {}/32 dev {veth}", node.pod_gateway));
                if v6 {
                    commands.push(format!("addr add {gateway6}/128 dev {veth} nodad"));
                }
                commands.push(format!("link set {veth} up"));
                commands.push(format!("route add {}/32 dev {veth}", pod.ip));
                if v6 {
                    commands.push(format!("route add {}/128 dev {veth}", pod.ip6));
                }
            }
            PodNetwork::Bridge => {
                commands.push(format!("link set {veth} master {POD_BRIDGE}"));
                commands.push(format!("link set {veth} up"));
            }
        }
        interfaces.push(veth.clone());
    }
    for other in topology.nodes.iter().filter(|n| n.name != node.name) {
        commands.push(format!(
            "route add {} via {} dev eth0",
            other.pod_cidr, other.ip
        ));
        if v6 {
            commands.push(format!(
                "route add {}/64 via {} dev eth0",
                pod_ip6(other.index, 0),
                node_ip6(other.index)
            ));
        }
    }
    netns::ip_batch(&node.netns, &commands)
        .with_context(|| format!("wiring node {}", node.name))?;

    let mut sysctls = vec![("ipv4/ip_forward".to_owned(), "1")];
    if v6 {
        sysctls.push(("ipv6/conf/all/forwarding".to_owned(), "1"));
    }
    for conf in ["all", "default"]
        .into_iter()
        .map(str::to_owned)
        .chain(interfaces)
    {
        sysctls.push((format!("ipv4/conf/{conf}/rp_filter"), "0"));
    }
    if topology.pod_network == PodNetwork::Bridge {
        // Per namespace; set explicitly rather than trusting the default
        // of a new namespace. The root namespace's is never touched.
        for family in ["iptables", "ip6tables"] {
            sysctls.push((format!("bridge/bridge-nf-call-{family}"), "1"));
        }
    }
    netns::set_sysctls(&node.netns, &sysctls)
        .with_context(|| format!("setting sysctls on node {}", node.name))
}
