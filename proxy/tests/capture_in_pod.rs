//! Redirection inside a pod's network namespace on the testbed (run as
//! root): real nftables and policy routing in the pod `client`'s own
//! namespace, listeners opened there the way the proxy will open them,
//! real connections. node-1 runs `client`; node-2 runs `server`, an echo
//! server on port 8080. Nothing is installed on a node.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use weft_proxy::capture::pod::{PodNetns, install_in_pod, remove_from_pod};
use weft_proxy::capture::{CaptureConfig, node_source};
use weft_proxy::sockets::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK, outgoing_socket,
    redirected_destination,
};
use weft_testbed::{PodNetwork, PodSpec, Target, Testbed};

const ECHO_PORT: u16 = 8080;

/// Every testbed plans the same pod addresses: the tests of this file run
/// one at a time, so that the search by address finds this test's pods.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
const APP_PORT: u16 = 9090;
/// A port of the pod's application that nobody probes.
const OTHER_PORT: u16 = 9191;
const WAIT: Duration = Duration::from_secs(10);

fn cluster(network: PodNetwork) -> Testbed {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod_network(network)
        .pod(PodSpec {
            node: "node-1",
            name: "client",
            ..PodSpec::default()
        })
        .pod(PodSpec {
            node: "node-1",
            name: "neighbour",
            ..PodSpec::default()
        })
        .pod(PodSpec {
            node: "node-2",
            name: "server",
            ..PodSpec::default()
        })
        .build()
        .unwrap()
}

fn netns_of(testbed: &Testbed, pod: &str) -> PodNetns {
    let name = testbed.netns_name(Target::Pod(pod)).unwrap();
    PodNetns::open(&PathBuf::from("/run/netns").join(name)).unwrap()
}

/// The proxy's three listeners, opened inside the pod's namespace.
fn listen_in(netns: &PodNetns) -> [TcpListener; 3] {
    netns
        .run_in(|| {
            let bind = |ip: Ipv4Addr, port| {
                let listener = TcpListener::bind((ip, port)).unwrap();
                listener.set_nonblocking(false).unwrap();
                listener
            };
            [
                bind(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
                bind(Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT),
                bind(Ipv4Addr::UNSPECIFIED, HBONE_PORT),
            ]
        })
        .unwrap()
}

fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(false).unwrap();
    let (stream, peer) = listener.accept().unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    (stream, peer)
}

fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).unwrap();
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).unwrap();
    back
}

/// Passes what `from` has to `to`, once.
fn forward(from: &mut TcpStream, to: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let n = from.read(&mut buf).unwrap();
    to.write_all(&buf[..n]).unwrap();
}

/// Relays one message each way between two connections.
fn relay_once(a: &mut TcpStream, b: &mut TcpStream) {
    forward(a, b);
    forward(b, a);
}

#[test]
fn on_a_point_to_point_network() {
    redirected_inside_the_pod_and_refused_without_a_proxy(PodNetwork::PointToPoint);
}

#[test]
fn on_a_bridge() {
    redirected_inside_the_pod_and_refused_without_a_proxy(PodNetwork::Bridge);
}

/// A pod's TCP is redirected inside its namespace, both ways, and refused
/// while no proxy listens there; the same whatever the pod network.
fn redirected_inside_the_pod_and_refused_without_a_proxy(network: PodNetwork) {
    let _serial = one_at_a_time();
    let testbed = cluster(network);
    let echo = testbed
        .start_echo_server(Target::Pod("server"), ECHO_PORT)
        .unwrap();
    let client_ip = testbed.pod_ip("client").unwrap();
    let server = SocketAddr::from((testbed.pod_ip("server").unwrap(), ECHO_PORT));
    let netns = netns_of(&testbed, "client");
    let config = CaptureConfig::default();
    install_in_pod(&netns, &config, &BTreeSet::new()).unwrap();
    let [outbound, inbound, hbone] = listen_in(&netns);

    // Outbound: the pod's connection lands on its own 127.0.0.1:15001,
    // from the pod's address, and says where it was going.
    let mut pod_side = testbed.connect(Target::Pod("client"), server).unwrap();
    let (mut captured, peer) = accept(&outbound);
    assert_eq!(peer.ip(), IpAddr::V4(client_ip));
    assert_eq!(redirected_destination(&captured).unwrap(), server);
    // The proxy dials out from inside the pod (its mark skips the
    // redirect): the server sees the pod's own address.
    let upstream = netns
        .run_in(|| outgoing_socket(None, server, PROXY_MARK))
        .unwrap()
        .unwrap();
    upstream.set_nonblocking(false).unwrap();
    upstream.connect(&server.into()).unwrap();
    let mut upstream: TcpStream = upstream.into();
    upstream.set_read_timeout(Some(WAIT)).unwrap();
    pod_side.write_all(b"hello").unwrap();
    relay_once(&mut captured, &mut upstream);
    let mut echoed = [0u8; 5];
    pod_side.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello");
    assert!(echo.peers().iter().any(|p| p.ip() == IpAddr::V4(client_ip)));
    assert_eq!(
        echo.peers().len(),
        1,
        "only the proxy's connection reached it"
    );

    // Inbound: a connection to the pod's application port lands on the
    // proxy's 15006 in the pod; the proxy reaches the application from the
    // client's own address, and the replies find their way back.
    let app = netns
        .run_in(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, APP_PORT)).unwrap())
        .unwrap();
    let app_addr = SocketAddr::from((client_ip, APP_PORT));
    let mut remote = testbed.connect(Target::Pod("server"), app_addr).unwrap();
    let (mut arrived, from) = accept(&inbound);
    let server_ip = testbed.pod_ip("server").unwrap();
    assert_eq!(from.ip(), IpAddr::V4(server_ip));
    assert_eq!(redirected_destination(&arrived).unwrap(), app_addr);
    let to_app = netns
        .run_in(|| outgoing_socket(Some(from.ip()), app_addr, PROXY_MARK))
        .unwrap()
        .unwrap();
    to_app.set_nonblocking(false).unwrap();
    to_app.connect(&app_addr.into()).unwrap();
    let mut to_app: TcpStream = to_app.into();
    to_app.set_read_timeout(Some(WAIT)).unwrap();
    let (mut at_app, app_peer) = accept(&app);
    assert_eq!(
        app_peer.ip(),
        IpAddr::V4(server_ip),
        "the app sees the client"
    );
    remote.write_all(b"ping").unwrap();
    forward(&mut arrived, &mut to_app);
    let mut got = [0u8; 4];
    at_app.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    at_app.write_all(b"pong").unwrap();
    forward(&mut to_app, &mut arrived);
    let mut answer = [0u8; 4];
    remote.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong");

    // HBONE: the proxy's own port in the pod is reached directly.
    let hbone_addr = SocketAddr::from((client_ip, HBONE_PORT));
    let mut tunnel = testbed.connect(Target::Pod("server"), hbone_addr).unwrap();
    let (mut at_hbone, _) = accept(&hbone);
    tunnel.write_all(b"h2").unwrap();
    let mut preface = [0u8; 2];
    at_hbone.read_exact(&mut preface).unwrap();
    assert_eq!(&preface, b"h2");

    // No proxy listening: both directions are refused at once (a reset),
    // nothing goes through in plaintext.
    drop((outbound, inbound, hbone));
    let out = testbed.connect(Target::Pod("client"), server);
    assert!(out.is_err(), "the pod reached the server with no proxy");
    let into = testbed.connect(Target::Pod("server"), app_addr);
    assert!(into.is_err(), "the app was reached with no proxy");
    assert_eq!(echo.peers().len(), 1);

    // Removed: the pod talks directly again.
    remove_from_pod(&netns, &config).unwrap();
    let mut direct = testbed.connect(Target::Pod("client"), server).unwrap();
    assert_eq!(round_trip(&mut direct, b"direct"), b"direct");
    assert_eq!(echo.peers().len(), 2);
    drop(app);
}

#[test]
fn running_pods_are_found_by_their_addresses() {
    let _serial = one_at_a_time();
    let testbed = cluster(PodNetwork::PointToPoint);
    let (client, server) = (
        IpAddr::V4(testbed.pod_ip("client").unwrap()),
        IpAddr::V4(testbed.pod_ip("server").unwrap()),
    );
    let elsewhere: IpAddr = "10.99.99.99".parse().unwrap();
    let wanted = std::collections::BTreeSet::from([client, server, elsewhere]);
    let found = weft_proxy::capture::pod::find_pod_namespaces(
        &wanted,
        &[std::path::Path::new("/run/netns")],
        std::path::Path::new("/proc"),
    );
    let name =
        |pod| PathBuf::from("/run/netns").join(testbed.netns_name(Target::Pod(pod)).unwrap());
    assert_eq!(found.get(&client), Some(&name("client")));
    assert_eq!(found.get(&server), Some(&name("server")));
    assert!(!found.contains_key(&elsewhere));
    // What was found is the pod: redirection installed there works.
    let netns = PodNetns::open(&found[&client]).unwrap();
    install_in_pod(&netns, &CaptureConfig::default(), &BTreeSet::new()).unwrap();
    let [outbound, _inbound, _hbone] = listen_in(&netns);
    let to = SocketAddr::from((testbed.pod_ip("server").unwrap(), ECHO_PORT));
    let _pod_side = testbed.connect(Target::Pod("client"), to).unwrap();
    let (captured, _) = accept(&outbound);
    assert_eq!(redirected_destination(&captured).unwrap(), to);
}

#[test]
fn the_nodes_own_connections_reach_the_probe_ports_and_nothing_else_does() {
    let _serial = one_at_a_time();
    let testbed = cluster(PodNetwork::Bridge);
    let client_ip = testbed.pod_ip("client").unwrap();
    let netns = netns_of(&testbed, "client");
    let config = CaptureConfig::default();
    // APP_PORT is probed, OTHER_PORT is not.
    install_in_pod(&netns, &config, &BTreeSet::from([APP_PORT])).unwrap();
    let probe_addr = SocketAddr::from((client_ip, APP_PORT));
    let other_addr = SocketAddr::from((client_ip, OTHER_PORT));
    // The node gives its own connections to the probe port its source.
    let script = node_source::ruleset(&config, &BTreeSet::from([probe_addr]));
    let node = netns_of_node(&testbed, "node-1");
    node.run_in(|| nft(&script)).unwrap();
    node.run_in(|| nft(&node_source::bridge_ruleset())).unwrap();
    let [app, other] = [APP_PORT, OTHER_PORT].map(|port| {
        netns
            .run_in(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
            .unwrap()
    });

    // No proxy listens in the pod. A probe from the node still reaches the
    // application, from the node's link-local source...
    let probe = testbed.connect(Target::Node("node-1"), probe_addr).unwrap();
    let (_at_app, peer) = accept(&app);
    assert_eq!(peer.ip(), IpAddr::V4(node_source::NODE_SOURCE));
    drop(probe);
    // ... but not another port: captured, refused without a proxy.
    let refused = testbed.connect(Target::Node("node-1"), other_addr);
    assert!(refused.is_err(), "the node reached a port nobody probes");
    // Other pods, on the same bridge or another node, are refused.
    for pod in ["neighbour", "server"] {
        let refused = testbed.connect(Target::Pod(pod), probe_addr);
        assert!(refused.is_err(), "{pod} reached the app with no proxy");
    }
    other.set_nonblocking(true).unwrap();
    assert!(
        other.accept().is_err(),
        "the app's other port saw a connection"
    );
}

/// Runs `ip <args>` in `netns`; returns what it printed.
fn ip_in(netns: &PodNetns, args: &[&str]) -> String {
    let output = netns
        .run_in(|| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(output.status.success(), "ip {args:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn installing_the_capture_again_never_takes_its_routing_rule_away() {
    let _serial = one_at_a_time();
    let testbed = cluster(PodNetwork::Bridge);
    let netns = netns_of(&testbed, "client");
    let config = CaptureConfig::default();
    install_in_pod(&netns, &config, &BTreeSet::new()).unwrap();
    // A rule a crashed run left at another priority.
    let selector = format!(
        "fwmark {mark:#x}/{mark:#x} table {}",
        config.route_table,
        mark = config.capture_mark
    );
    let stale = format!("add priority 31000 {selector}");
    ip_in(
        &netns,
        &["-4", "rule"]
            .into_iter()
            .chain(stale.split(' '))
            .collect::<Vec<_>>(),
    );

    let mut monitor = std::process::Command::new("ip");
    monitor.args(["-4", "monitor", "rule"]);
    let monitor = testbed.spawn(Target::Pod("client"), monitor).unwrap();
    // A marker rule, added and deleted, tells when the monitor listens and
    // when it has printed everything before it.
    let marker = |priority: &str| {
        ip_in(
            &netns,
            &["-4", "rule", "add", "priority", priority, "table", "4242"],
        );
        ip_in(
            &netns,
            &["-4", "rule", "del", "priority", priority, "table", "4242"],
        );
    };
    weft_testbed::wait_until(WAIT, || {
        marker("12345");
        Ok(monitor.stdout()?.contains("12345:"))
    })
    .unwrap();
    // A proxy taking the pod over installs the capture again, twice here.
    install_in_pod(&netns, &config, &BTreeSet::new()).unwrap();
    install_in_pod(&netns, &config, &BTreeSet::new()).unwrap();
    marker("12346");
    monitor.wait_for_output("Deleted 12346:", WAIT).unwrap();

    let events = monitor.stdout().unwrap();
    let ours = format!("{}:", config.rule_priority);
    assert!(
        !events
            .lines()
            .any(|line| line.starts_with("Deleted") && line.contains(&ours)),
        "the rule went away for a moment:\n{events}"
    );
    assert!(
        events
            .lines()
            .any(|line| line.starts_with("Deleted 31000:")),
        "the stale rule stayed:\n{events}"
    );
    let rules = ip_in(&netns, &["-4", "rule", "list"]);
    assert_eq!(
        rules
            .matches(&format!("lookup {}", config.route_table))
            .count(),
        1,
        "{rules}"
    );
}

fn nft(script: &str) {
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "{script}");
}

fn netns_of_node(testbed: &Testbed, node: &str) -> PodNetns {
    let name = testbed.netns_name(Target::Node(node)).unwrap();
    PodNetns::open(&PathBuf::from("/run/netns").join(name)).unwrap()
}
