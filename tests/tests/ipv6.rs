//! End to end on the testbed with IPv6: dual-stack pods (point-to-point
//! CNI) and IPv6-only pods (bridge CNI), across nodes. Their IPv6 TCP is
//! captured, carried in HBONE tunnels to `[pod IP]:15008` (TLS on the wire,
//! never the pods' bytes), reaches the server from the client's own
//! address, and meets the destination's policy; the node's probes reach
//! the pods over IPv6 as over IPv4.
//!
//! node-1: web-1 (shop/web) and batch-1 (shop/batch); node-2: db-1
//! (shop/db), echoing on 5432.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;

use weft_proxy::capture::node_source::NODE_SOURCE_V6;

use weft_testbed::{
    DENY_BATCH_TO_DB, IpFamilies, PodNetwork, Target, Testbed, WeftMesh, WireWatch, echoes,
    shop_pod, wait_for_reach,
};

const MARKER: &[u8] = b"weft-ipv6-marker-3e9b71";

fn cluster(families: IpFamilies, network: PodNetwork) -> Testbed {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod_network(network)
        .ip_families(families)
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-1", "batch-1", "batch", &[("app", "batch")]))
        .pod(shop_pod("node-2", "db-1", "db", &[("app", "db")]).probed(&[5432]))
        .build()
        .unwrap()
}

/// Checks IPv6 between web-1 and batch-1 and db-1's `server` (an echo
/// server on db-1's IPv6 address): meshed, from the client's address, only
/// TLS on the link, and batch-1 refused by a DENY.
fn ipv6_is_meshed(testbed: &Testbed, mesh: &WeftMesh, server: &weft_testbed::EchoServer) {
    let db = SocketAddr::from((testbed.pod_ip6("db-1").unwrap(), 5432));
    let wire = WireWatch::start(testbed, Target::Node("node-2"), "eth0").unwrap();
    let mut stream = testbed.connect(Target::Pod("web-1"), db).unwrap();
    for _ in 0..5 {
        let echoed = weft_testbed::echo_round_trip(&mut stream, MARKER).unwrap();
        assert_eq!(echoed, MARKER);
    }
    drop(stream);
    let web_1 = testbed.pod_ip6("web-1").unwrap();
    assert!(
        server.peers().iter().any(|peer| peer.ip() == web_1),
        "db-1 saw {:?}, not web-1's own address {web_1}",
        server.peers()
    );
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
    let tunnels = mesh.proxy_metrics(testbed, "node-2").unwrap();
    assert!(
        tunnels.lines().any(|line| {
            line.starts_with("istio_tcp_connections_opened_total")
                && line.contains("connection_security_policy=\"mutual_tls\"")
                && line.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/web\"")
        }),
        "{tunnels}"
    );

    mesh.write_manifest("deny.yaml", DENY_BATCH_TO_DB).unwrap();
    wait_for_reach(testbed, "batch-1", db, false);
    assert!(echoes(testbed, "web-1", db), "web-1 is not denied");

    // The kubelet probes db-1's port over IPv6 from the node: the probe
    // reaches it past the capture, from the node's IPv6 source for probes.
    let mut probe = testbed.connect(Target::Node("node-2"), db).unwrap();
    assert_eq!(
        weft_testbed::echo_round_trip(&mut probe, b"probe").unwrap(),
        b"probe"
    );
    let node_source = std::net::IpAddr::V6(NODE_SOURCE_V6);
    assert!(
        server.peers().iter().any(|peer| peer.ip() == node_source),
        "the probe came from {:?}",
        server.peers()
    );
}

#[test]
fn dual_stack_pods_are_meshed_over_both_families() {
    let testbed = cluster(IpFamilies::DualStack, PodNetwork::PointToPoint);
    let v4 = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    let db6 = SocketAddr::from((testbed.pod_ip6("db-1").unwrap(), 5432));
    let v6 = testbed
        .start_echo_server_at(Target::Pod("db-1"), db6)
        .unwrap();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();

    // IPv4 as ever.
    let db4 = SocketAddr::from((testbed.pod_ip("db-1").unwrap(), 5432));
    assert!(echoes(&testbed, "web-1", db4));
    assert!(
        v4.peers()
            .iter()
            .any(|p| p.ip() == testbed.pod_ip("web-1").unwrap())
    );
    ipv6_is_meshed(&testbed, &mesh, &v6);
    // The DENY is about the identity, whichever family it comes over.
    wait_for_reach(&testbed, "batch-1", db4, false);
}

#[test]
fn ipv6_only_pods_are_meshed_across_nodes_on_a_bridge() {
    let testbed = cluster(IpFamilies::V6Only, PodNetwork::Bridge);
    let db6 = SocketAddr::from((testbed.pod_ip6("db-1").unwrap(), 5432));
    let server = testbed
        .start_echo_server_at(Target::Pod("db-1"), db6)
        .unwrap();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    ipv6_is_meshed(&testbed, &mesh, &server);
}
