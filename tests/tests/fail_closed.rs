//! End to end on the testbed: a node proxy that dies or restarts never lets
//! a meshed pod's traffic through in plaintext, and one that restarts while
//! the control plane is away serves and enforces its last config.
//!
//! node-1: web-1 and batch-1 (meshed, shop) and old-1 (unmeshed); node-2:
//! db-1 (meshed, shop), echoing on 5432. The link between the nodes is
//! watched for a marker the pods send: it must never show up there.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use weft_testbed::{
    DENY_BATCH_TO_DB, IpFamilies, Target, Testbed, WeftMesh, WireWatch, echoes, wait_for_reach,
};

const MARKER: &[u8] = b"weft-fail-closed-marker-5d21c0";

/// How long a connection may take (a busy machine).
const HELD: Duration = Duration::from_secs(60);

fn cluster() -> Testbed {
    weft_testbed::shop_testbed().unwrap()
}

fn db(testbed: &Testbed) -> SocketAddr {
    weft_testbed::shop_db(testbed).unwrap()
}

/// One round trip of `payload` from `pod` to db-1 on a new connection,
/// waiting up to [`HELD`] for each step: `Ok` with what came back, or why
/// it failed.
fn round_trip(testbed: &Testbed, pod: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    round_trip_to(testbed, pod, db(testbed), payload, HELD)
}

/// Writes `payload` on `stream` and reads as many bytes back: an error
/// (a reset, or the end of the stream) if they do not come.
fn echo(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(payload)?;
    let mut echoed = vec![0; payload.len()];
    stream.read_exact(&mut echoed)?;
    Ok(echoed)
}

/// [`round_trip`] to `to`.
fn round_trip_to(
    testbed: &Testbed,
    pod: &str,
    to: SocketAddr,
    payload: &[u8],
    wait: Duration,
) -> std::io::Result<Vec<u8>> {
    testbed
        .run_in(Target::Pod(pod), || TcpStream::connect_timeout(&to, wait))
        .map_err(std::io::Error::other)?
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(wait))?;
            stream.write_all(payload)?;
            let mut echoed = vec![0; payload.len()];
            stream.read_exact(&mut echoed)?;
            Ok(echoed)
        })
}

#[test]
fn a_killed_proxy_never_lets_a_meshed_pods_traffic_through_in_plaintext() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    // A connection open across the kill (traffic running).
    let mut open = testbed
        .run_in(Target::Pod("web-1"), || {
            TcpStream::connect_timeout(&db(&testbed), HELD)
        })
        .unwrap()
        .unwrap();
    open.set_read_timeout(Some(HELD)).unwrap();
    assert_eq!(echo(&mut open, MARKER).unwrap(), MARKER);

    // The source's proxy is killed: web-1's open connection ends with it
    // (its other end was the proxy's socket, in web-1): what web-1 writes
    // next goes nowhere. Its new connections are refused inside web-1 (its
    // capture redirects them to a listener that is gone), nothing leaves
    // it; once a proxy is back they go, meshed.
    mesh.kill_proxy("node-1").unwrap();
    assert!(
        echo(&mut open, MARKER).is_err(),
        "an open connection outlived its proxy"
    );
    assert!(round_trip(&testbed, "web-1", MARKER).is_err());
    mesh.start_proxy(&testbed, "node-1").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);

    // The destination's proxy is killed: nothing reaches db-1 but through
    // it, neither the tunnel nor an unmeshed client's plaintext.
    mesh.kill_proxy("node-2").unwrap();
    assert!(round_trip(&testbed, "web-1", MARKER).is_err());
    assert!(round_trip(&testbed, "old-1", b"legacy hello").is_err());
    mesh.start_proxy(&testbed, "node-2").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    assert_eq!(
        round_trip(&testbed, "old-1", b"legacy hello").unwrap(),
        b"legacy hello"
    );
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);

    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn a_proxy_restarted_without_the_control_plane_keeps_enforcing_its_policy() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    mesh.write_manifest("deny.yaml", DENY_BATCH_TO_DB).unwrap();
    wait_for_reach(&testbed, "batch-1", db(&testbed), false);
    assert!(echoes(&testbed, "web-1", db(&testbed)));
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();

    // What the proxies applied is on their nodes (a change applied just
    // before a crash may not be, see `--state-write-interval-ms`).
    mesh.wait_for_stored_config(&testbed, "node-2", "no-batch")
        .unwrap();
    mesh.stop_control_plane().unwrap();
    // A crash and a clean restart of the destination's proxy, then of the
    // source's: each comes back with its last config and certificates.
    mesh.kill_proxy("node-2").unwrap();
    mesh.start_proxy(&testbed, "node-2").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    assert_policy_holds(&testbed, &mesh);

    mesh.stop_proxy("node-2").unwrap();
    mesh.start_proxy(&testbed, "node-2").unwrap();
    mesh.stop_proxy("node-1").unwrap();
    mesh.start_proxy(&testbed, "node-1").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    assert_policy_holds(&testbed, &mesh);
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();

    // The control plane comes back: the proxies follow it again.
    mesh.start_control_plane(&testbed).unwrap();
    mesh.write_manifest("deny.yaml", "").unwrap();
    wait_for_reach(&testbed, "batch-1", db(&testbed), true);
}

/// batch-1 is denied, web-1 gets through (meshed: its marker is on the
/// watched wire only inside TLS), and the proxies say why.
fn assert_policy_holds(testbed: &Testbed, mesh: &WeftMesh) {
    assert!(
        !echoes(testbed, "batch-1", db(testbed)),
        "the DENY was lost with the restart"
    );
    assert_eq!(round_trip(testbed, "web-1", MARKER).unwrap(), MARKER);
    let dump = mesh.proxy_admin(testbed, "node-2", "/config_dump").unwrap();
    assert!(dump.contains("shop/no-batch"), "{dump}");
    let status: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(status["control_plane"]["connected"], false, "{dump}");
}

#[test]
fn without_an_ipv6_listener_a_meshed_pods_ipv6_tcp_is_refused_not_passed() {
    let testbed = weft_testbed::shop_testbed_builder()
        .ip_families(IpFamilies::DualStack)
        .build()
        .unwrap();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let db6 = SocketAddr::from((testbed.pod_ip6("db-1").unwrap(), 5432));
    let _server6 = testbed
        .start_echo_server_at(Target::Pod("db-1"), db6)
        .unwrap();
    assert_eq!(
        round_trip_to(&testbed, "web-1", db6, MARKER, HELD).unwrap(),
        MARKER
    );

    // web-1 loses its IPv6 loopback: its proxy cannot listen there for
    // web-1's IPv6 connections, which its capture still redirects.
    mesh.stop_proxy("node-1").unwrap();
    let disabled = testbed
        .run_in(Target::Pod("web-1"), || {
            std::fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1")
        })
        .unwrap();
    disabled.unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    mesh.start_proxy(&testbed, "node-1").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    let proxy = mesh.proxy("node-1").unwrap();
    proxy
        .wait_for_output("its IPv6 TCP is refused", Duration::from_secs(30))
        .unwrap();
    // Dropped (nothing can take it): a few seconds show it goes nowhere.
    let dropped = Duration::from_secs(5);
    assert!(round_trip_to(&testbed, "web-1", db6, MARKER, dropped).is_err());
    // IPv4 is served as ever.
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

/// The testbed's manifests with namespace `shop` labelled for the mesh or
/// not, as JSON documents (which YAML reads).
fn manifests_with_shop_meshed(testbed: &Testbed, meshed: bool) -> String {
    testbed
        .objects()
        .into_iter()
        .map(|mut object| {
            if object["kind"] == "Namespace" && object["metadata"]["name"] == "shop" {
                object["metadata"]["labels"] = if meshed {
                    serde_json::json!({ "weft.dev/mesh": "enabled" })
                } else {
                    serde_json::json!({})
                };
            }
            object.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Whether `pod`'s namespace holds weft's capture.
fn captured(testbed: &Testbed, pod: &str) -> bool {
    let mut nft = std::process::Command::new("nft");
    nft.args(["list", "table", "inet", "weft"]);
    let listing = testbed.spawn(Target::Pod(pod), nft).unwrap();
    listing.wait(Duration::from_secs(30)).unwrap().success()
}

#[test]
fn unlabelling_a_namespace_takes_its_pods_out_of_the_capture_and_back() {
    let testbed = cluster();
    let (mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    assert!(captured(&testbed, "web-1") && captured(&testbed, "db-1"));

    mesh.write_manifest("testbed.yaml", &manifests_with_shop_meshed(&testbed, false))
        .unwrap();
    weft_testbed::wait_until(Duration::from_secs(30), || {
        Ok(!captured(&testbed, "web-1") && !captured(&testbed, "db-1"))
    })
    .unwrap();
    // Unmeshed, the pods talk as they would without weft: in plaintext.
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    let seen = wire.finish().unwrap();
    assert!(
        seen.contains(MARKER),
        "the unmeshed request was not on the wire as is"
    );

    mesh.write_manifest("testbed.yaml", &manifests_with_shop_meshed(&testbed, true))
        .unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    weft_testbed::wait_until(Duration::from_secs(30), || {
        Ok(captured(&testbed, "web-1") && captured(&testbed, "db-1"))
    })
    .unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}
