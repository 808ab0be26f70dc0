//! What a testbed is made of, decided before anything is created: the specs a test
//! declares (nodes, pods, services) and the address plan derived from them.
//!
//! Nothing here touches the system; [`Topology::plan`] is a pure function, so the
//! address scheme can be checked without root.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail, ensure};

pub(crate) use crate::specs::{PodDecl, ServiceDecl};
pub use crate::specs::{PodSpec, ServiceSpec};

/// An IPv4 network: address and prefix length, displayed as `10.244.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address.
    pub addr: Ipv4Addr,
    /// Prefix length in bits.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// How a node's pods are wired to it: the two shapes of CNI the testbed
/// plays. Both give pod `k` of node `n` the IP `10.244.<n>.<k+2>` and a
/// default route via `10.244.<n>.1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PodNetwork {
    /// A veth per pod, routed by the node (as kindnet or Calico wire pods):
    /// the pod's `eth0` has a `/32`, the node end of the veth `pod<k>`
    /// carries the gateway address, and every packet between two pods,
    /// also of one node, is routed by the node.
    #[default]
    PointToPoint,
    /// The standard `bridge` CNI plugin: the node ends of the pods' veths
    /// (`pod<k>`) are ports of a Linux bridge `cni0`, which carries the
    /// gateway as `10.244.<n>.1/24`; the pod's `eth0` has a `/24`, so pods
    /// of one node reach each other across the bridge without the node
    /// routing them. br_netfilter's `net.bridge.bridge-nf-call-iptables`
    /// (and `-ip6tables`) is set to 1 in the node namespace, as kube-proxy
    /// needs it: bridged IPv4 frames pass the IP netfilter hooks.
    Bridge,
}

/// Which IP families the pods have. IPv6 addresses mirror the IPv4 plan:
/// pod `k` of node `n` gets `fd00:10:244:<n>::<k+2>`, its gateway is
/// `fd00:10:244:<n>::1`, node `n`'s uplink `fd00:172:30::<n+1>/64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpFamilies {
    /// IPv4 only.
    #[default]
    V4,
    /// IPv4 and IPv6; the manifests list the IPv4 address first.
    DualStack,
    /// IPv6 only: the pods have no IPv4 address (their planned one,
    /// [`crate::Testbed::pod_ip`], is not configured), and the manifests
    /// list only the IPv6 one. The nodes keep their IPv4 uplinks.
    V6Only,
}

impl IpFamilies {
    /// Whether pods have an IPv4 address.
    pub fn v4(self) -> bool {
        self != IpFamilies::V6Only
    }

    /// Whether pods (and nodes) have an IPv6 address.
    pub fn v6(self) -> bool {
        self != IpFamilies::V4
    }
}

/// Pod `slot` of node `index`'s IPv6 address (`fd00:10:244:<n>::<slot+2>`;
/// `slot` -1 is the gateway, `::1`).
pub(crate) fn pod_ip6(node: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(node), 0, 0, 0, host)
}

/// Node `index`'s IPv6 uplink address, `fd00:172:30::<n+1>`.
pub(crate) fn node_ip6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, u16::from(node) + 1)
}

/// Name of the pods' bridge in a node namespace, in [`PodNetwork::Bridge`].
pub(crate) const POD_BRIDGE: &str = "cni0";

/// Which network namespace to act in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The node namespace, where a node proxy runs.
    Node(&'a str),
    /// A pod namespace, by pod name.
    Pod(&'a str),
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(name) => write!(f, "node {name}"),
            Target::Pod(name) => write!(f, "pod {name}"),
        }
    }
}

/// A planned node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    /// 1-based position in declaration order; picks the addresses.
    pub index: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Cidr,
    /// The address every pod on this node uses as its gateway (`10.244.<n>.1`).
    pub pod_gateway: Ipv4Addr,
}

/// A planned pod.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub meshed: bool,
    /// The ports the kubelet probes.
    pub probe_ports: Vec<u16>,
    /// Index into [`Topology::nodes`].
    pub node: usize,
    pub netns: String,
    /// Name of the node-side veth (`pod0`, `pod1`, ... per node); a port of
    /// [`POD_BRIDGE`] in [`PodNetwork::Bridge`].
    pub node_veth: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (whether configured: [`Topology::ip_families`]).
    pub ip6: Ipv6Addr,
}

/// A planned service.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub selector: BTreeMap<String, String>,
    pub vip: Ipv4Addr,
}

impl Service {
    /// Whether `pod` is one of this service's endpoints.
    pub fn selects(&self, pod: &Pod) -> bool {
        !self.selector.is_empty()
            && pod.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

/// The whole plan: every namespace name and address, before anything exists.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    /// How pods are wired to their node ([`PodNetwork::PointToPoint`] from
    /// [`Topology::plan`]; see [`Topology::with_pod_network`]).
    pub pod_network: PodNetwork,
    /// Which addresses pods have ([`IpFamilies::V4`] from
    /// [`Topology::plan`]; see [`Topology::with_ip_families`]).
    pub ip_families: IpFamilies,
    pub fabric_netns: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
}

/// Name of the bridge joining the nodes, inside the fabric namespace.
pub(crate) const BRIDGE: &str = "br0";
/// The node network all node uplinks are on.
pub(crate) const NODE_NETWORK: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(172, 30, 0, 0),
    prefix_len: 24,
};

impl Topology {
    /// Plans names and addresses. `prefix` makes every namespace name unique to this
    /// testbed (see `netns::unique_prefix`).
    pub fn plan(
        prefix: &str,
        nodes: &[String],
        pods: &[PodDecl],
        services: &[ServiceDecl],
    ) -> Result<Topology> {
        ensure!(!nodes.is_empty(), "a testbed needs at least one node");
        ensure!(
            nodes.len() <= 250,
            "{} nodes declared, at most 250 fit 172.30.0.0/24",
            nodes.len()
        );
        let mut planned_nodes = Vec::with_capacity(nodes.len());
        for (i, name) in nodes.iter().enumerate() {
            check_name("node", name)?;
            if planned_nodes.iter().any(|n: &Node| &n.name == name) {
                bail!("node {name:?} declared twice");
            }
            let index = u8::try_from(i + 1).context("node index")?;
            planned_nodes.push(Node {
                name: name.clone(),
                index,
                netns: format!("{prefix}-n-{name}"),
                ip: Ipv4Addr::new(172, 30, 0, index + 1),
                pod_cidr: Ipv4Cidr {
                    addr: Ipv4Addr::new(10, 244, index, 0),
                    prefix_len: 24,
                },
                pod_gateway: Ipv4Addr::new(10, 244, index, 1),
            });
        }

        let mut planned_pods: Vec<Pod> = Vec::with_capacity(pods.len());
        let mut pods_per_node = vec![0u8; planned_nodes.len()];
        for spec in pods {
            check_name("pod", &spec.name)?;
            check_name("namespace", &spec.namespace)?;
            check_name("service account", &spec.service_account)?;
            if planned_pods.iter().any(|p| p.name == spec.name) {
                bail!(
                    "pod {:?} declared twice (pod names are unique per testbed)",
                    spec.name
                );
            }
            let node = planned_nodes
                .iter()
                .position(|n| n.name == spec.node)
                .with_context(|| {
                    format!(
                        "pod {:?} is on node {:?}, which was not declared (nodes: {:?})",
                        spec.name, spec.node, nodes
                    )
                })?;
            let slot = pods_per_node[node];
            ensure!(
                slot < 250,
                "node {:?} has more than 250 pods, its /24 is full",
                spec.node
            );
            pods_per_node[node] += 1;
            let index = planned_nodes[node].index;
            planned_pods.push(Pod {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                service_account: spec.service_account.clone(),
                labels: spec.labels.clone(),
                meshed: spec.meshed,
                probe_ports: spec.probe_ports.clone(),
                node,
                netns: format!("{prefix}-p-{}", spec.name),
                node_veth: format!("pod{slot}"),
                ip: Ipv4Addr::new(10, 244, index, slot + 2),
                ip6: pod_ip6(index, u16::from(slot) + 2),
            });
        }

        let mut planned_services: Vec<Service> = Vec::with_capacity(services.len());
        for (i, spec) in services.iter().enumerate() {
            check_name("namespace", &spec.namespace)?;
            check_name("service", &spec.name)?;
            if planned_services
                .iter()
                .any(|s| s.namespace == spec.namespace && s.name == spec.name)
            {
                bail!("service {}/{} declared twice", spec.namespace, spec.name);
            }
            let k = u8::try_from(i + 1)
                .ok()
                .filter(|k| *k < 255)
                .context("more than 254 services do not fit 10.96.1.0/24")?;
            planned_services.push(Service {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                port: spec.port,
                target_port: spec.target_port,
                selector: spec.selector.clone(),
                vip: Ipv4Addr::new(10, 96, 1, k),
            });
        }

        Ok(Topology {
            pod_network: PodNetwork::default(),
            ip_families: IpFamilies::default(),
            fabric_netns: format!("{prefix}-fabric"),
            nodes: planned_nodes,
            pods: planned_pods,
            services: planned_services,
        })
    }

    /// The same plan with its pods wired as `pod_network` says; names and
    /// addresses do not change.
    pub fn with_pod_network(self, pod_network: PodNetwork) -> Topology {
        Topology {
            pod_network,
            ..self
        }
    }

    pub fn with_ip_families(self, ip_families: IpFamilies) -> Topology {
        Topology {
            ip_families,
            ..self
        }
    }

    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!("no node {name:?} in this testbed (nodes: {known:?})")
        })
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods.iter().find(|p| p.name == name).with_context(|| {
            let known: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
            format!("no pod {name:?} in this testbed (pods: {known:?})")
        })
    }

    pub fn service(&self, namespace: &str, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .with_context(|| format!("no service {namespace}/{name} in this testbed"))
    }

    /// The network namespace a target lives in.
    pub fn netns_of(&self, target: Target<'_>) -> Result<&str> {
        match target {
            Target::Node(name) => Ok(&self.node(name)?.netns),
            Target::Pod(name) => Ok(&self.pod(name)?.netns),
        }
    }

    /// Every namespace of the plan: fabric first, then nodes, then pods.
    pub fn all_netns(&self) -> Vec<String> {
        std::iter::once(self.fabric_netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain(self.pods.iter().map(|p| p.netns.clone()))
            .collect()
    }
}

/// Names become namespace names and Kubernetes object names, so they follow the
/// Kubernetes DNS label rule: lowercase letters, digits and '-', at most 63.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    ensure!(
        ok,
        "{what} name {name:?} is not a DNS label (lowercase letters, digits, '-', at most 63)"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn plan() -> Topology {
        let nodes = vec!["node-1".to_owned(), "node-2".to_owned()];
        let pods = [
            PodSpec {
                node: "node-1",
                name: "a",
                ..PodSpec::default()
            },
            PodSpec {
                node: "node-2",
                name: "b",
                labels: &[("app", "b")],
                ..PodSpec::default()
            },
            PodSpec {
                node: "node-2",
                name: "c",
                ..PodSpec::default()
            },
        ];
        let services = [ServiceSpec {
            namespace: "default",
            name: "b",
            port: 80,
            target_port: 8080,
            selector: &[("app", "b")],
        }];
        Topology::plan("wft1x0", &nodes, &decls(pods), &[services[0].into()]).unwrap()
    }

    pub(crate) fn decls<const N: usize>(pods: [PodSpec<'_>; N]) -> Vec<PodDecl> {
        pods.into_iter().map(PodDecl::from).collect()
    }

    #[test]
    fn addresses_follow_the_documented_scheme() {
        let t = plan();
        assert_eq!(t.nodes[0].ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(t.nodes[1].pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(t.pod("a").unwrap().ip, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(t.pod("c").unwrap().ip, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!(t.pod("c").unwrap().node_veth, "pod1");
        assert_eq!(t.services[0].vip, Ipv4Addr::new(10, 96, 1, 1));
        assert!(t.nodes[1].pod_cidr.contains(t.pod("b").unwrap().ip));
        assert!(!t.nodes[0].pod_cidr.contains(t.pod("b").unwrap().ip));
        assert!(t.services[0].selects(t.pod("b").unwrap()));
        assert!(!t.services[0].selects(t.pod("c").unwrap()));
        assert_eq!(t.netns_of(Target::Pod("a")).unwrap(), "wft1x0-p-a");
        assert_eq!(t.pod_network, PodNetwork::PointToPoint);
        let bridged = t.with_pod_network(PodNetwork::Bridge);
        assert_eq!(bridged.pod_network, PodNetwork::Bridge);
        assert_eq!(bridged.pod("c").unwrap().ip, Ipv4Addr::new(10, 244, 2, 3));
    }

    #[test]
    fn ipv6_addresses_mirror_the_ipv4_plan() {
        assert_eq!(
            pod_ip6(2, 3),
            "fd00:10:244:2::3".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_ip6(1, 1),
            "fd00:10:244:1::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(node_ip6(1), "fd00:172:30::2".parse::<Ipv6Addr>().unwrap());
        assert!(IpFamilies::DualStack.v4() && IpFamilies::DualStack.v6());
        assert!(!IpFamilies::V6Only.v4() && !IpFamilies::V4.v6());
    }

    #[test]
    fn bad_declarations_are_refused() {
        let nodes = vec!["node-1".to_owned()];
        let on = |node| PodSpec {
            node,
            name: "a",
            ..PodSpec::default()
        };
        let err = Topology::plan("p", &nodes, &decls([on("node-9")]), &[]).unwrap_err();
        assert!(err.to_string().contains("node-9"), "{err}");
        let twice = decls([on("node-1"), on("node-1")]);
        assert!(Topology::plan("p", &nodes, &twice, &[]).is_err());
        assert!(Topology::plan("p", &["Bad_Name".to_owned()], &[], &[]).is_err());
        assert!(Topology::plan("p", &[], &[], &[]).is_err());
    }
}
