//! End to end on the two pod networks the testbed plays: a veth per pod,
//! routed by the node, and the standard `bridge` CNI (pods on `cni0`, one
//! /24 per node, br_netfilter on in the node namespace, as kube-proxy
//! needs). Each scenario runs on both, with the capture inside the pods.
//! On both, the node's own connections to its pods (kubelet probes,
//! hostNetwork clients) reach them uncaptured, from the node's source
//! address for them (`NODE_SOURCE`),
//! meshed pods reach each other through the proxies, on one node and
//! across nodes, and plaintext from outside the mesh never reaches a STRICT
//! pod, also not by way of the node's exemption.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use nix::sys::signal::Signal;
use weft_proxy::capture::node_source::NODE_SOURCE;
use weft_testbed::{
    CONFIG_WAIT, EchoServer, PodNetwork, SHOP_DB_SERVICE, Target, Testbed, WeftMesh,
    echo_round_trip, echoes, legacy_pod, shop_pod, start_mesh_with_db_echo, wait_for_reach,
    wait_until,
};

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const STRICT: &str = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";

/// node-1: web-1 and db-1 (meshed, shop), old-1 and stranger-1 (an
/// unmeshed namespace); node-2: db-2 (meshed, shop). db-1 and db-2 echo on
/// 5432. old-1 is the client [`Cluster::make_shop_strict`] waits with;
/// stranger-1 connects to nothing before shop is STRICT, so a db that ever
/// sees its address has been reached past the proxies.
struct Cluster {
    testbed: Testbed,
    mesh: WeftMesh,
    db1: EchoServer,
    db2: EchoServer,
}

fn start(pod_network: PodNetwork) -> Cluster {
    let testbed = Testbed::builder()
        .pod_network(pod_network)
        .node("node-1")
        .node("node-2")
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-1", "db-1", "db", &[("app", "db")]).probed(&[5432]))
        .pod(legacy_pod("node-1", "old-1"))
        .pod(legacy_pod("node-1", "stranger-1"))
        .pod(shop_pod("node-2", "db-2", "db", &[("app", "db")]))
        .service(SHOP_DB_SERVICE)
        .build()
        .unwrap();
    if pod_network == PodNetwork::Bridge {
        // The scenario is only worth something if bridged frames really
        // pass the IP hooks in the node namespace.
        let setting = testbed
            .run_in(Target::Node("node-1"), || {
                std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
            })
            .unwrap()
            .unwrap();
        assert_eq!(setting.trim(), "1");
    }
    let db2 = testbed
        .start_echo_server(Target::Pod("db-2"), 5432)
        .unwrap();
    let (mesh, db1) = start_mesh_with_db_echo(&testbed).unwrap();
    Cluster {
        testbed,
        mesh,
        db1,
        db2,
    }
}

impl Cluster {
    fn db(&self, pod: &str) -> SocketAddr {
        SocketAddr::from((self.testbed.pod_ip(pod).unwrap(), 5432))
    }

    /// Makes namespace `shop` STRICT and waits until both nodes' proxies
    /// refuse plaintext (to db-1 on node-1, db-2 on node-2: each node
    /// applies the change in its own time).
    fn make_shop_strict(&self) {
        self.mesh.write_manifest("mtls.yaml", STRICT).unwrap();
        wait_for_reach(&self.testbed, "old-1", self.db("db-1"), false);
        wait_for_reach(&self.testbed, "old-1", self.db("db-2"), false);
    }

    /// The peers `server` saw from `ip`.
    fn seen_from(server: &EchoServer, ip: Ipv4Addr) -> usize {
        server.peers().iter().filter(|p| p.ip() == ip).count()
    }

    /// Connections `node`'s proxy opened as `reporter` for `principal`,
    /// with this `connection_security_policy`.
    fn opened(&self, node: &str, reporter: &str, principal: &str, security: &str) -> u64 {
        let metrics = self.mesh.proxy_metrics(&self.testbed, node).unwrap();
        let needles = [
            "istio_tcp_connections_opened_total{".to_owned(),
            format!("reporter=\"{reporter}\""),
            format!("source_principal=\"{principal}\""),
            format!("connection_security_policy=\"{security}\""),
        ];
        metrics
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle.as_str())))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until `node`'s proxy counts a connection as [`Cluster::opened`]
    /// does.
    fn wait_for_opened(&self, node: &str, reporter: &str, principal: &str, security: &str) {
        let waited = wait_until(CONFIG_WAIT, || {
            Ok(self.opened(node, reporter, principal, security) >= 1)
        });
        if waited.is_err() {
            let metrics = self.mesh.proxy_metrics(&self.testbed, node).unwrap();
            panic!(
                "{node} never counted a {security} connection from {principal} ({reporter}):\n{metrics}"
            );
        }
    }

    /// Runs `nft -f -` with `script` in node-1's namespace.
    fn nft_on_node_1(&self, script: &str) {
        use std::io::Write as _;
        let output = self
            .testbed
            .run_in(Target::Node("node-1"), || {
                let mut child = Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()?;
                child
                    .stdin
                    .take()
                    .expect("a piped stdin")
                    .write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// What a kubelet does: the node's own socket connects to a meshed pod's
/// port. It reaches the pod in plaintext, from the node's source address
/// for its pods, even where the proxy refuses plaintext and while the
/// proxy does not run.
fn the_node_reaches_its_meshed_pods_as_itself(pod_network: PodNetwork) {
    let cluster = start(pod_network);
    cluster.make_shop_strict();
    let testbed = &cluster.testbed;
    let node_ip = NODE_SOURCE;

    // Had the proxy taken it, STRICT would have refused it.
    let probe = || -> anyhow::Result<Vec<u8>> {
        let mut stream = testbed.connect(Target::Node("node-1"), cluster.db("db-1"))?;
        echo_round_trip(&mut stream, b"probe")
    };
    assert_eq!(probe().unwrap(), b"probe");
    assert_eq!(Cluster::seen_from(&cluster.db1, node_ip), 1);

    // The proxy plays no part: stopped, the probe still passes.
    let proxy = cluster.mesh.proxy("node-1").unwrap();
    proxy.signal(Signal::SIGSTOP).unwrap();
    let while_stopped = probe();
    proxy.signal(Signal::SIGCONT).unwrap();
    assert_eq!(while_stopped.unwrap(), b"probe");
    assert_eq!(Cluster::seen_from(&cluster.db1, node_ip), 2);
}

/// web-1 reaches db-2 on the other node over mTLS, and db-1 on its own
/// node through node-1's proxy, both seeing web-1's address.
fn meshed_pods_reach_each_other_through_the_proxies(pod_network: PodNetwork) {
    let cluster = start(pod_network);
    let web = cluster.testbed.pod_ip("web-1").unwrap();

    assert!(echoes(&cluster.testbed, "web-1", cluster.db("db-2")));
    assert_eq!(Cluster::seen_from(&cluster.db2, web), 1);
    cluster.wait_for_opened("node-2", "destination", WEB_ID, "mutual_tls");

    assert!(echoes(&cluster.testbed, "web-1", cluster.db("db-1")));
    assert_eq!(Cluster::seen_from(&cluster.db1, web), 1);
    // The same-node path has no tunnel: node-1's proxy carries it as the
    // source's proxy.
    cluster.wait_for_opened("node-1", "source", WEB_ID, "node_local");
}

/// Outside the mesh, old-1 is carried as plaintext while shop is
/// PERMISSIVE; once shop is STRICT, stranger-1 is refused by the proxies,
/// on its own node and on the other, and no byte of it reaches a db.
fn plaintext_never_reaches_a_strict_pod(pod_network: PodNetwork) {
    let cluster = start(pod_network);
    let testbed = &cluster.testbed;

    assert!(echoes(testbed, "old-1", cluster.db("db-1")));
    cluster.wait_for_opened("node-1", "destination", "unknown", "none");

    cluster.make_shop_strict();
    let stranger = testbed.pod_ip("stranger-1").unwrap();
    for (db, node) in [("db-1", "node-1"), ("db-2", "node-2")] {
        assert!(
            !echoes(testbed, "stranger-1", cluster.db(db)),
            "stranger-1 -> {db}"
        );
        // Refused by the proxy, not lost on the way.
        let refusal = format!("source={stranger}:");
        let proxy = cluster.mesh.proxy(node).unwrap();
        wait_until(CONFIG_WAIT, || {
            Ok(proxy.stdout()?.lines().any(|line| {
                line.contains("inbound connection denied")
                    && line.contains("mTLS mode STRICT")
                    && line.contains(&refusal)
            }))
        })
        .unwrap_or_else(|e| panic!("{node}'s proxy never refused stranger-1: {e}"));
    }
    assert_eq!(
        (
            Cluster::seen_from(&cluster.db1, stranger),
            Cluster::seen_from(&cluster.db2, stranger),
        ),
        (0, 0),
        "plaintext from stranger-1 reached a STRICT pod"
    );
}

/// The node's exemption covers replies to connections the node itself
/// opened, and only those. The way a pod could otherwise get such
/// "replies" past the proxy: a connection that reaches a meshed pod
/// without passing the capture, as kube-proxy's DNAT for a ClusterIP does
/// (after the capture's prerouting hook). It is played here by a
/// kube-proxy-like DNAT in node-1: the node's own client of the ClusterIP
/// gets through (a hostNetwork client), an unmeshed pod's does not.
///
/// Spoofing does not get a pod further: the exemption trusts conntrack's
/// mark, which only the node's output hook sets, and passes only packets
/// addressed to the node itself; a pod's packet is in the reply direction
/// of such a connection only if it answers it, and then it goes to the
/// node, never to another pod.
fn replies_to_the_node_open_no_path_for_pods(pod_network: PodNetwork) {
    let cluster = start(pod_network);
    cluster.make_shop_strict();
    let testbed = &cluster.testbed;
    let vip = Ipv4Addr::new(10, 96, 200, 1);
    let db1 = testbed.pod_ip("db-1").unwrap();
    cluster.nft_on_node_1(&format!(
        "table ip kube_proxy_stand_in {{
    chain pods {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {vip} tcp dport 80 dnat to {db1}:5432
    }}
    chain node {{
        type nat hook output priority -100; policy accept;
        ip daddr {vip} tcp dport 80 dnat to {db1}:5432
    }}
}}
"
    ));
    // The node's route to the ClusterIP, as its default route would be.
    let node_ip = testbed.node_ip("node-1").unwrap();
    let status = Command::new("ip")
        .args(["-n", testbed.netns_name(Target::Node("node-1")).unwrap()])
        .args(["route", "add", &format!("{vip}/32"), "dev", "eth0"])
        .args(["src", &node_ip.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let service = SocketAddr::from((vip, 80));

    let mut stream = testbed.connect(Target::Node("node-1"), service).unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"client").unwrap(), b"client");
    assert_eq!(Cluster::seen_from(&cluster.db1, NODE_SOURCE), 1);

    assert!(!echoes(testbed, "stranger-1", service));
    let stranger = testbed.pod_ip("stranger-1").unwrap();
    assert_eq!(
        Cluster::seen_from(&cluster.db1, stranger),
        0,
        "stranger-1 reached STRICT db-1 in plaintext through the DNAT"
    );
}

#[test]
fn point_to_point_the_node_reaches_its_meshed_pods_as_itself() {
    the_node_reaches_its_meshed_pods_as_itself(PodNetwork::PointToPoint);
}

#[test]
fn bridge_the_node_reaches_its_meshed_pods_as_itself() {
    the_node_reaches_its_meshed_pods_as_itself(PodNetwork::Bridge);
}

#[test]
fn point_to_point_meshed_pods_reach_each_other_through_the_proxies() {
    meshed_pods_reach_each_other_through_the_proxies(PodNetwork::PointToPoint);
}

#[test]
fn bridge_meshed_pods_reach_each_other_through_the_proxies() {
    meshed_pods_reach_each_other_through_the_proxies(PodNetwork::Bridge);
}

#[test]
fn point_to_point_plaintext_never_reaches_a_strict_pod() {
    plaintext_never_reaches_a_strict_pod(PodNetwork::PointToPoint);
}

#[test]
fn bridge_plaintext_never_reaches_a_strict_pod() {
    plaintext_never_reaches_a_strict_pod(PodNetwork::Bridge);
}

#[test]
fn point_to_point_replies_to_the_node_open_no_path_for_pods() {
    replies_to_the_node_open_no_path_for_pods(PodNetwork::PointToPoint);
}

#[test]
fn bridge_replies_to_the_node_open_no_path_for_pods() {
    replies_to_the_node_open_no_path_for_pods(PodNetwork::Bridge);
}
