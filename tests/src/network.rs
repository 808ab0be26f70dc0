//! Turning a planned [`Topology`] into namespaces, veths, bridges, addresses, routes
//! and sysctls. Nothing is created in the host's root namespace: every `ip` command
//! runs with `-n <testbed namespace>`, veth peers are created directly in their target
//! namespace, and sysctls are written from inside the namespace they belong to.

use anyhow::{Context, Result};

use crate::topology::{BRIDGE, NODE_NETWORK, POD_BRIDGE, PodNetwork, Topology};
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
    for pod in &topology.pods {
        let node = &topology.nodes[pod.node];
        let gateway = node.pod_gateway;
        let commands = match topology.pod_network {
            PodNetwork::PointToPoint => vec![
                format!("addr add {}/32 dev eth0", pod.ip),
                "link set eth0 up".to_owned(),
                format!("route add {gateway} dev eth0 scope link"),
                format!("route add default via {gateway} dev eth0"),
            ],
            // The /24 brings the route to the node's other pods (and the
            // gateway) on the link.
            PodNetwork::Bridge => vec![
                format!("addr add {}/{} dev eth0", pod.ip, node.pod_cidr.prefix_len),
                "link set eth0 up".to_owned(),
                format!("route add default via {gateway} dev eth0"),
            ],
        };
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
    let mut commands = vec![
        format!("addr add {}/{} dev eth0", node.ip, NODE_NETWORK.prefix_len),
        "link set eth0 up".to_owned(),
    ];
    let mut interfaces = vec!["lo".to_owned(), "eth0".to_owned()];
    if topology.pod_network == PodNetwork::Bridge {
        commands.push(format!("link add {POD_BRIDGE} type bridge"));
        commands.push(format!(
            "addr add {}/{} dev {POD_BRIDGE}",
            node.pod_gateway, node.pod_cidr.prefix_len
        ));
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
                commands.push(format!("link set {veth} up"));
                commands.push(format!("route add {}/32 dev {veth}", pod.ip));
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
    }
    netns::ip_batch(&node.netns, &commands)
        .with_context(|| format!("wiring node {}", node.name))?;

    let mut sysctls = vec![("ipv4/ip_forward".to_owned(), "1")];
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
