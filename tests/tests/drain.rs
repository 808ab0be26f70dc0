//! End to end on the testbed: a node proxy told to stop (SIGTERM, or
//! `POST /drain` on its admin endpoint) refuses new connections, lets the
//! open ones finish and exits cleanly. It leaves the capture in its meshed
//! pods to the next proxy (their traffic is refused meanwhile, never sent
//! in plaintext), unless the mesh is being uninstalled: then it takes it
//! away, from the pods and from the node.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::Signal;
use weft_testbed::{
    PROXY_ADMIN_PORT, PodSpec, Target, Testbed, WeftMesh, echo_round_trip, http_request,
};

const WAIT: Duration = Duration::from_secs(30);

/// A meshed client on node-1, a meshed server on node-2.
fn cluster() -> (Testbed, WeftMesh) {
    let pod = |node, name| PodSpec {
        node,
        namespace: "shop",
        name,
        service_account: name,
        labels: &[],
        meshed: true,
        probe_ports: &[],
    };
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(pod("node-1", "client"))
        .pod(pod("node-2", "server"))
        .build()
        .unwrap();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    (testbed, mesh)
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Sigterm,
    AdminDrain,
}

/// Stops node-1's proxy by `stop` while a connection through it is open,
/// during an uninstall or not, and checks the drain from start to exit.
fn drains_open_connections(stop: Stop, uninstall: bool) {
    let (testbed, mesh) = cluster();
    if uninstall {
        mesh.announce_uninstall().unwrap();
        mesh.wait_for_uninstall_confirmed(&testbed, "node-1")
            .unwrap();
    }
    let _server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let target = SocketAddr::from((testbed.pod_ip("server").unwrap(), 8080));
    let mut open = testbed.connect(Target::Pod("client"), target).unwrap();
    assert_eq!(echo_round_trip(&mut open, b"before").unwrap(), b"before");

    let proxy = mesh.proxy("node-1").unwrap();
    match stop {
        Stop::Sigterm => {
            proxy.signal(Signal::SIGTERM).unwrap();
        }
        Stop::AdminDrain => {
            // A GET must not do it.
            let (status, _) = admin(&testbed, "GET", "/drain");
            assert_eq!(status, 405);
            assert_eq!(
                echo_round_trip(&mut open, b"still up").unwrap(),
                b"still up"
            );
            // On the TCP port nothing may change the proxy; its admin
            // socket takes it (`weft-proxy admin drain`).
            let (status, _) = admin(&testbed, "POST", "/drain");
            assert_eq!(status, 403);
            let (taken, said) = mesh.admin_command(&testbed, "node-1", &["drain"]).unwrap();
            assert!(taken, "{said}");
        }
    }
    proxy.wait_for_output("draining", WAIT).unwrap();

    // Draining: the open connection carries on, new ones are not accepted.
    assert_eq!(echo_round_trip(&mut open, b"during").unwrap(), b"during");
    let refused = testbed
        .connect(Target::Pod("client"), target)
        .and_then(|mut s| {
            s.write_all(b"x")?;
            let mut byte = [0u8; 1];
            Ok(s.read(&mut byte)?)
        });
    assert!(
        !matches!(refused, Ok(1)),
        "{stop:?}: a new connection was proxied while draining"
    );

    // The last connection ends; the proxy exits cleanly.
    drop(open);
    let status = proxy.wait(WAIT).unwrap();
    assert!(status.success(), "{stop:?}: {status:?}");
    let log = proxy.stdout().unwrap();
    assert!(log.contains("all connections finished"), "{log}");
    let ruleset = |target| {
        let mut nft = std::process::Command::new("nft");
        nft.args(["list", "ruleset"]);
        let listing = testbed.spawn(target, nft).unwrap();
        assert!(listing.wait(WAIT).unwrap().success());
        listing.stdout().unwrap()
    };
    let (in_client, on_node) = (
        ruleset(Target::Pod("client")),
        ruleset(Target::Node("node-1")),
    );
    if uninstall {
        // It took its rules along: the pods talk directly again.
        assert!(!in_client.contains("weft"), "{in_client}");
        assert!(!on_node.contains("weft"), "{on_node}");
        assert!(log.contains("capture removed from every pod"), "{log}");
        // And the state it kept on the node, keys included.
        let state = mesh.proxy_state_dir(&testbed, "node-1");
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
        let mut direct = testbed.connect(Target::Pod("client"), target).unwrap();
        assert_eq!(echo_round_trip(&mut direct, b"after").unwrap(), b"after");
    } else {
        // It left them: the client is still captured, and its traffic is
        // refused until the next proxy serves it, never let through.
        assert!(in_client.contains("table inet weft"), "{in_client}");
        assert!(log.contains("leaving the pods' capture in place"), "{log}");
        let state = mesh.proxy_state_dir(&testbed, "node-1");
        assert!(
            state.join("config.pb").is_file(),
            "the next proxy starts from it"
        );
        let held = testbed
            .connect(Target::Pod("client"), target)
            .and_then(|mut s| echo_round_trip(&mut s, b"x"));
        assert!(
            held.is_err(),
            "{stop:?}: a meshed pod's connection went through with no proxy"
        );
    }
}

/// One request to node-1's admin endpoint: status and body.
fn admin(testbed: &Testbed, method: &str, path: &str) -> (u16, String) {
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_ADMIN_PORT));
    http_request(testbed, Target::Node("node-1"), admin, method, path).unwrap()
}

#[test]
fn sigterm_drains_open_connections_and_leaves_the_capture_failing_closed() {
    drains_open_connections(Stop::Sigterm, false);
}

#[test]
fn during_an_uninstall_a_drain_requested_on_the_admin_endpoint_removes_the_capture() {
    drains_open_connections(Stop::AdminDrain, true);
}
