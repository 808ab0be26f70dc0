//! End to end on the testbed: upgrading a node's proxy under load drops
//! nothing. A new proxy process starts beside the running one and takes its
//! sockets over (the pods' listeners, the node's endpoints, the CNI socket);
//! the old one stops accepting and carries its open connections to their
//! end (see `proxy/src/handover`).
//!
//! node-1: web-1 (meshed, shop); node-2: db-1 (meshed, shop), echoing on
//! 5432. The load runs from web-1 to db-1: request/response over persistent
//! connections, a new connection per request, and one long-lived stream. The
//! link between the nodes is watched for the marker every request carries.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::signal::Signal;
use weft_testbed::steady_load::{LoadKind, LoadShape, SteadyLoad};
use weft_testbed::{EchoServer, STARTUP_TIMEOUT, Target, Testbed, WeftMesh, WireWatch, wait_until};

const MARKER: &[u8] = b"weft-upgrade-marker-a41c77";

/// Requests (of all kinds together) that run between two steps.
const REQUESTS_BETWEEN_STEPS: u64 = 150;

fn cluster() -> Testbed {
    weft_testbed::shop_testbed().unwrap()
}

fn db(testbed: &Testbed) -> SocketAddr {
    weft_testbed::shop_db(testbed).unwrap()
}

/// Connections the proxy on `node` (whichever process answers its metrics
/// port) has opened, as a source or a destination.
fn opened_by(mesh: &WeftMesh, testbed: &Testbed, node: &str) -> u64 {
    let metrics = mesh.proxy_metrics(testbed, node).unwrap_or_default();
    metrics
        .lines()
        .filter(|line| line.starts_with("istio_tcp_connections_opened_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The mesh, db-1's echo server, the wire watched and the load running
/// (for a while already).
fn start_with_load(testbed: &Testbed) -> (WeftMesh, EchoServer, WireWatch, SteadyLoad) {
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(testbed).unwrap();
    let wire = WireWatch::start(testbed, Target::Node("node-2"), "eth0").unwrap();
    let load =
        SteadyLoad::start(testbed, "web-1", db(testbed), MARKER, LoadShape::default()).unwrap();
    load.run_for_requests(REQUESTS_BETWEEN_STEPS);
    (mesh, server, wire, load)
}

#[test]
fn upgrading_each_nodes_proxy_under_load_drops_nothing() {
    let testbed = cluster();
    let (mut mesh, _server, wire, load) = start_with_load(&testbed);

    // The source side first, then the destination side (its HBONE
    // listeners, and the tunnels from node-1 that end there).
    let mut drained = Vec::new();
    for node in ["node-1", "node-2"] {
        let old = mesh.upgrade_proxy(&testbed, node).unwrap();
        let before = opened_by(&mesh, &testbed, node);
        load.run_for_requests(REQUESTS_BETWEEN_STEPS);
        // The new process serves the new connections (its metrics start
        // from zero and count them).
        wait_until(STARTUP_TIMEOUT, || {
            Ok(opened_by(&mesh, &testbed, node) > before)
        })
        .unwrap();
        drained.push((node, old));
    }
    load.run_for_requests(REQUESTS_BETWEEN_STEPS);
    let report = load.stop();

    report.check_nothing_failed().unwrap();
    // The old processes carried their connections to the end (the load's
    // persistent ones and the stream, open across both upgrades), and exit
    // once those are closed.
    for (node, old) in drained {
        let status = old.wait(STARTUP_TIMEOUT).unwrap();
        assert!(status.success(), "{node}'s old proxy exited with {status}");
    }
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn killing_the_old_proxy_during_a_hand_over_fails_closed_and_recovers() {
    let testbed = cluster();
    let (mut mesh, _server, wire, load) = start_with_load(&testbed);

    // The old process dies while the new one starts: before, during or
    // after the hand-over, whichever comes. Its connections die with it;
    // nothing leaves web-1 in plaintext; the new process ends up serving,
    // with the sockets it was given or with its own.
    let new = mesh.spawn_proxy(&testbed, "node-1").unwrap();
    let old = mesh.replace_proxy("node-1", new).unwrap();
    old.signal(Signal::SIGKILL).unwrap();
    old.wait(STARTUP_TIMEOUT).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    wait_until(STARTUP_TIMEOUT, || Ok(round_trip(&testbed).is_ok())).unwrap();
    // Traffic runs again, meshed, of every kind.
    let recovered_from = load.completed();
    load.run_for_requests(REQUESTS_BETWEEN_STEPS);
    let report = load.stop();
    let late_failures: Vec<_> = report
        .samples
        .iter()
        .skip(usize::try_from(recovered_from).unwrap())
        .filter(|sample| sample.kind == LoadKind::NewConnection && sample.error.is_some())
        .collect();
    assert!(
        late_failures.is_empty(),
        "new connections still fail after the recovery: {late_failures:?}"
    );
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

/// One round trip of `payload` from web-1 to db-1 on a new connection.
fn round_trip(testbed: &Testbed) -> anyhow::Result<()> {
    let to = db(testbed);
    let mut stream = testbed.run_in(Target::Pod("web-1"), || {
        TcpStream::connect_timeout(&to, Duration::from_secs(30))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let echoed = weft_testbed::echo_round_trip(&mut stream, MARKER)?;
    anyhow::ensure!(echoed == MARKER, "the echo differs");
    Ok(())
}

#[test]
fn a_new_proxy_that_cannot_take_over_leaves_the_running_one_serving() {
    let testbed = cluster();
    let (mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    round_trip(&testbed).unwrap();

    // The running proxy does not answer (stopped): the new one gives up
    // on the hand-over, cannot bind what the running one holds, and
    // exits, failed (Kubernetes would restart it).
    let old = mesh.proxy("node-1").unwrap();
    old.signal(Signal::SIGSTOP).unwrap();
    let new = mesh
        .spawn_proxy_with(&testbed, "node-1", &["--handover-timeout-ms", "500"])
        .unwrap();
    let status = new.wait(STARTUP_TIMEOUT);
    old.signal(Signal::SIGCONT).unwrap();
    assert!(
        !status.unwrap().success(),
        "a proxy started beside one that holds the node's sockets"
    );

    // The running one finds the new one gone once it answers, and serves
    // on as before: its pods, its node endpoints.
    old.wait_for_output(
        "handing over to the new proxy failed; serving on as before",
        STARTUP_TIMEOUT,
    )
    .unwrap();
    round_trip(&testbed).unwrap();
    wait_until(STARTUP_TIMEOUT, || {
        Ok(mesh.proxy_admin(&testbed, "node-1", "/healthz").is_ok())
    })
    .unwrap();
    // And it hands over to the next one that comes.
    let mut mesh = mesh;
    let drained = mesh.upgrade_proxy(&testbed, "node-1").unwrap();
    round_trip(&testbed).unwrap();
    drained.wait(STARTUP_TIMEOUT).unwrap();
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn the_pod_a_proxy_took_over_from_never_takes_the_sockets_back() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    // Two upgrades: pod-a takes over, then pod-b from pod-a.
    for pod in ["pod-a", "pod-b"] {
        let old = mesh
            .upgrade_proxy_with(&testbed, "node-1", &["--pod-uid", pod])
            .unwrap();
        old.wait(STARTUP_TIMEOUT).unwrap();
    }
    round_trip(&testbed).unwrap();

    // pod-a's container, restarted after a crash, asks for the sockets:
    // refused, it cannot start beside pod-b, which serves on.
    let restarted = mesh
        .spawn_proxy_with(&testbed, "node-1", &["--pod-uid", "pod-a"])
        .unwrap();
    let status = restarted.wait(STARTUP_TIMEOUT).unwrap();
    assert!(!status.success(), "the older pod's proxy started");
    mesh.proxy("node-1")
        .unwrap()
        .wait_for_output("the one this proxy took over from", STARTUP_TIMEOUT)
        .unwrap();
    round_trip(&testbed).unwrap();
    wait_until(STARTUP_TIMEOUT, || {
        Ok(mesh.proxy_admin(&testbed, "node-1", "/healthz").is_ok())
    })
    .unwrap();
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn readiness_says_whether_the_probing_pods_own_proxy_serves() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let ready_as = |mesh: &WeftMesh, pod: &str| mesh.probe_ready(&testbed, "node-1", pod).unwrap();
    // Before pod-a's proxy has taken over, the running one answers the
    // node's port: not pod-a's, so pod-a is not ready yet.
    let before = ready_as(&mesh, "pod-a");
    assert!(
        before
            .as_ref()
            .is_err_and(|why| why.contains("not of pod \"pod-a\"")),
        "{before:?}"
    );
    let old = mesh
        .upgrade_proxy_with(&testbed, "node-1", &["--pod-uid", "pod-a"])
        .unwrap();
    wait_until(STARTUP_TIMEOUT, || Ok(ready_as(&mesh, "pod-a").is_ok())).unwrap();
    // The pod it took over from is not ready any more.
    assert!(ready_as(&mesh, "").is_err());
    old.wait(STARTUP_TIMEOUT).unwrap();
    assert!(ready_as(&mesh, "pod-a").is_ok());
}

/// Sends one HTTP/1.1 request for `path` on a kept-alive connection and
/// reads the answer's head and body (content-length framed).
fn ask_keeping_alive(stream: &mut TcpStream, path: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    format!("{head}{}", String::from_utf8_lossy(&body))
}

#[test]
fn kept_alive_clients_of_the_node_endpoints_move_to_the_new_proxy() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let readiness = SocketAddr::from(([127, 0, 0, 1], 15021));
    let mut scraper = testbed.connect(Target::Node("node-1"), readiness).unwrap();
    assert!(ask_keeping_alive(&mut scraper, "/healthz/ready").starts_with("http/1.1 200"));

    let old = mesh
        .upgrade_proxy_with(&testbed, "node-1", &["--pod-uid", "pod-a"])
        .unwrap();
    // The old proxy closes the idle connection instead of answering on it
    // for as long as it drains; the scraper reconnects to the new one.
    let mut rest = Vec::new();
    scraper.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let mut scraper = testbed.connect(Target::Node("node-1"), readiness).unwrap();
    wait_until(STARTUP_TIMEOUT, || {
        Ok(ask_keeping_alive(&mut scraper, "/healthz/ready?pod=pod-a").starts_with("http/1.1 200"))
    })
    .unwrap();
    old.wait(STARTUP_TIMEOUT).unwrap();
}
