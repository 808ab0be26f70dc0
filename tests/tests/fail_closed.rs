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
use std::thread::JoinHandle;
use std::time::Duration;

use weft_testbed::{
    DENY_BATCH_TO_DB, Target, Testbed, WeftMesh, WireWatch, echoes, wait_for_reach,
};

const MARKER: &[u8] = b"weft-fail-closed-marker-5d21c0";

/// How long a held connection may wait for its proxy to come back: SYNs
/// are retransmitted after 1, 3, 7, 15 and 31 s.
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
    let to = db(testbed);
    testbed
        .run_in(Target::Pod(pod), || TcpStream::connect_timeout(&to, HELD))
        .map_err(std::io::Error::other)?
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(HELD))?;
            stream.write_all(payload)?;
            let mut echoed = vec![0; payload.len()];
            stream.read_exact(&mut echoed)?;
            Ok(echoed)
        })
}

/// [`round_trip`] on a thread of its own, started now.
fn round_trip_in_background(
    testbed: &std::sync::Arc<Testbed>,
    pod: &'static str,
    payload: &'static [u8],
) -> JoinHandle<std::io::Result<Vec<u8>>> {
    let testbed = testbed.clone();
    std::thread::spawn(move || round_trip(&testbed, pod, payload))
}

#[test]
fn a_killed_proxy_never_lets_a_meshed_pods_traffic_through_in_plaintext() {
    let testbed = std::sync::Arc::new(cluster());
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);

    // The source's proxy is killed: web-1's new connection is held (its SYN
    // dropped), not sent; once a proxy is back it goes through, meshed.
    mesh.kill_proxy("node-1").unwrap();
    let held = round_trip_in_background(&testbed, "web-1", MARKER);
    std::thread::sleep(Duration::from_secs(2));
    mesh.start_proxy(&testbed, "node-1").unwrap();
    assert_eq!(held.join().unwrap().unwrap(), MARKER);

    // The destination's proxy is killed: nothing reaches db-1 but through
    // it, neither the tunnel nor an unmeshed client's plaintext.
    mesh.kill_proxy("node-2").unwrap();
    let meshed = round_trip_in_background(&testbed, "web-1", MARKER);
    let plaintext = round_trip_in_background(&testbed, "old-1", b"legacy hello");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !meshed.is_finished() && !plaintext.is_finished(),
        "a connection to db-1 was answered while no proxy served it"
    );
    mesh.start_proxy(&testbed, "node-2").unwrap();
    // The tunnel's connect may have timed out meanwhile (then the source
    // proxy closes web-1's connection): either way, nothing in plaintext.
    if let Ok(echoed) = meshed.join().unwrap() {
        assert_eq!(echoed, MARKER);
    }
    assert_eq!(plaintext.join().unwrap().unwrap(), b"legacy hello");
    mesh.wait_for_data_plane(&testbed).unwrap();
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
fn without_ipv6_listeners_meshed_pods_ipv6_tcp_is_refused_not_passed() {
    let testbed = cluster();
    let (mut mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    mesh.stop_proxy("node-1").unwrap();
    // Something else holds the IPv6 inbound port: the proxy cannot listen
    // on IPv6.
    let squatter = testbed
        .run_in(Target::Node("node-1"), || {
            std::net::TcpListener::bind("[::1]:15006")
        })
        .unwrap()
        .unwrap();
    mesh.start_proxy(&testbed, "node-1").unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    let proxy = mesh.proxy("node-1").unwrap();
    proxy
        .wait_for_output("meshed pods' IPv6 TCP is refused", Duration::from_secs(30))
        .unwrap();
    // The IPv6 rules are in, ending in the drop that catches what no
    // listener takes.
    let mut nft = std::process::Command::new("nft");
    nft.args(["list", "chain", "inet", "weft", "prerouting"]);
    let listing = testbed.spawn(Target::Node("node-1"), nft).unwrap();
    assert!(listing.wait(Duration::from_secs(30)).unwrap().success());
    let chain = listing.stdout().unwrap();
    assert!(
        chain.contains("ip6 daddr @meshed_v6 meta l4proto tcp drop"),
        "{chain}"
    );
    // IPv4 is served as ever.
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    drop(squatter);
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

/// Whether `node`'s capture holds `ip`.
fn captured_on(testbed: &Testbed, node: &str, ip: std::net::Ipv4Addr) -> bool {
    let mut nft = std::process::Command::new("nft");
    nft.args(["list", "set", "inet", "weft", "meshed_v4"]);
    let listing = testbed.spawn(Target::Node(node), nft).unwrap();
    assert!(listing.wait(Duration::from_secs(30)).unwrap().success());
    listing.stdout().unwrap().contains(&ip.to_string())
}

#[test]
fn unlabelling_a_namespace_takes_its_pods_out_of_the_capture_and_back() {
    let testbed = cluster();
    let (mesh, _server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    let (web, db_ip) = (
        testbed.pod_ip("web-1").unwrap(),
        testbed.pod_ip("db-1").unwrap(),
    );
    assert!(captured_on(&testbed, "node-1", web) && captured_on(&testbed, "node-2", db_ip));

    mesh.write_manifest("testbed.yaml", &manifests_with_shop_meshed(&testbed, false))
        .unwrap();
    weft_testbed::wait_until(Duration::from_secs(30), || {
        Ok(!captured_on(&testbed, "node-1", web) && !captured_on(&testbed, "node-2", db_ip))
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
        Ok(captured_on(&testbed, "node-1", web) && captured_on(&testbed, "node-2", db_ip))
    })
    .unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();
    assert_eq!(round_trip(&testbed, "web-1", MARKER).unwrap(), MARKER);
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}
