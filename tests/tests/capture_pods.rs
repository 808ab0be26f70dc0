//! End to end on the testbed with the capture inside each pod's network
//! namespace, the pods on a Linux bridge: a pod's
//! connections are its own, whatever address it forges; a new pod is
//! captured before it runs and its first connection goes meshed, as
//! itself; a pod set up while its proxy is down waits for it; the node
//! reaches its pods for probes. (`fail_closed.rs` kills proxies.)
//!
//! node-1: web-1 and batch-1 (meshed, shop) and old-1 (unmeshed); node-2:
//! db-1 (meshed, shop), echoing on 5432, which only web may reach.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use weft_testbed::{
    ALLOW_WEB_TO_DB, PodNetwork, Target, Testbed, WeftMesh, WireWatch, echoes, metric_sum,
    wait_for_reach, wait_until,
};

const MARKER: &[u8] = b"weft-in-pod-marker-8e4a1f";
const WAIT: Duration = Duration::from_secs(20);
/// A bound on each connect and read (a busy machine), not a timing
/// assertion.
const IO_WAIT: Duration = Duration::from_secs(20);

const STRICT: &str = "apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
";

fn cluster() -> Testbed {
    weft_testbed::shop_testbed_builder()
        .pod_network(PodNetwork::Bridge)
        .build()
        .unwrap()
}

fn start(testbed: &Testbed) -> (WeftMesh, weft_testbed::EchoServer) {
    let server = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    let mesh = WeftMesh::start(testbed).unwrap();
    mesh.wait_for_data_plane(testbed).unwrap();
    (mesh, server)
}

/// One round trip from `pod` to `to`, the connection bound to `source`
/// (an address the pod may have taken from a neighbour). Meshed pods send
/// [`MARKER`], which must never cross the wire in plaintext; unmeshed ones
/// (plaintext by design) something else.
fn round_trip_from(
    testbed: &Testbed,
    pod: &str,
    source: IpAddr,
    to: SocketAddr,
) -> std::io::Result<Vec<u8>> {
    let payload: &[u8] = if pod.starts_with("old") {
        b"legacy hello"
    } else {
        MARKER
    };
    testbed
        .run_in(Target::Pod(pod), || -> std::io::Result<Vec<u8>> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&to.into(), IO_WAIT)?;
            let mut stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(IO_WAIT))?;
            stream.write_all(payload)?;
            let mut echoed = vec![0; payload.len()];
            stream.read_exact(&mut echoed)?;
            Ok(echoed)
        })
        .map_err(std::io::Error::other)?
}

/// Gives `pod` the address `ip` too, as a pod with `CAP_NET_ADMIN` can.
fn take_address(testbed: &Testbed, pod: &str, ip: IpAddr) {
    let status = testbed
        .run_in(Target::Pod(pod), || {
            Command::new("ip")
                .args(["addr", "add", &format!("{ip}/32"), "dev", "eth0"])
                .status()
        })
        .unwrap()
        .unwrap();
    assert!(status.success(), "ip addr add {ip} in {pod}");
}

#[test]
fn a_pod_that_forges_a_neighbours_address_is_refused() {
    let testbed = cluster();
    let (mesh, server) = start(&testbed);
    let db = weft_testbed::shop_db(&testbed).unwrap();
    mesh.write_manifest("only-web.yaml", ALLOW_WEB_TO_DB)
        .unwrap();
    wait_for_reach(&testbed, "batch-1", db, false);
    assert!(echoes(&testbed, "web-1", db));
    let web = IpAddr::V4(testbed.pod_ip("web-1").unwrap());
    let seen_before = server.peers().len();

    // batch-1 (meshed, its own identity) takes web-1's address and dials
    // db-1 from it: its proxy serves batch-1 alone, and refuses it.
    take_address(&testbed, "batch-1", web);
    assert!(round_trip_from(&testbed, "batch-1", web, db).is_err());
    let refused = || metric_sum(&mesh, &testbed, "node-1", "spoofed_address").unwrap();
    wait_until(WAIT, || Ok(refused() >= 1)).unwrap();

    // old-1 (unmeshed) does the same: its forged plaintext reaches db-1's
    // proxy without any identity, which the policy refuses.
    take_address(&testbed, "old-1", web);
    assert!(round_trip_from(&testbed, "old-1", web, db).is_err());

    // (Taking the address poisons the node's ARP entry for web-1 on the
    // bridge, so web-1 is not asked again: that is the bridge's problem,
    // not the mesh's. What matters is that nothing forged got through.)
    assert_eq!(
        server.peers().len(),
        seen_before,
        "db-1 saw a connection from a forged address"
    );
}

#[test]
fn the_node_reaches_its_meshed_pods_probe_ports_as_itself_and_nothing_else() {
    let testbed = cluster();
    let (mesh, server) = start(&testbed);
    // STRICT for db-1: plaintext from pods is refused, the node's own
    // connections (the kubelet's probes) still pass.
    mesh.write_manifest("strict.yaml", STRICT).unwrap();
    let db = weft_testbed::shop_db(&testbed).unwrap();
    wait_for_reach(&testbed, "old-1", db, false);
    let probe = testbed
        .run_in(Target::Node("node-2"), || {
            TcpStream::connect_timeout(&db, WAIT)
        })
        .unwrap();
    let mut probe = probe.unwrap();
    probe.write_all(b"probe").unwrap();
    let mut echoed = [0; 5];
    probe.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"probe");
    let node_source: IpAddr = "169.254.7.127".parse().unwrap();
    assert!(
        server.peers().iter().any(|peer| peer.ip() == node_source),
        "the probe did not come from the node's source address: {:?}",
        server.peers()
    );

    // A port of db-1 that nobody probes: the node is a plaintext client
    // there like any other, which STRICT refuses.
    let other = testbed
        .start_echo_server(Target::Pod("db-1"), 6000)
        .unwrap();
    let to_other = SocketAddr::new(db.ip(), 6000);
    let refused = testbed
        .run_in(Target::Node("node-2"), || -> std::io::Result<Vec<u8>> {
            let mut stream = TcpStream::connect_timeout(&to_other, WAIT)?;
            weft_testbed::echo_round_trip(&mut stream, b"not a probe")
                .map_err(std::io::Error::other)
        })
        .unwrap();
    assert!(
        refused.is_err(),
        "the node reached an unprobed port of a STRICT pod"
    );
    assert!(other.peers().is_empty(), "{:?}", other.peers());
}

#[test]
fn a_new_pods_first_connection_waits_for_its_config_and_goes_meshed_as_itself() {
    let testbed = weft_testbed::shop_testbed_builder()
        .pod_network(PodNetwork::Bridge)
        .pod(weft_testbed::shop_pod("node-1", "fresh-1", "fresh", &[]))
        .build()
        .unwrap();
    let _server = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    let mesh = WeftMesh::start_without(&testbed, &["fresh-1"]).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    let db = weft_testbed::shop_db(&testbed).unwrap();
    let fresh = IpAddr::V4(testbed.pod_ip("fresh-1").unwrap());
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();

    // The runtime sets the sandbox up: weft-cni returns once the proxy
    // captures it, though weft's config does not know the pod yet.
    mesh.create_pod(&testbed, "fresh-1").unwrap();
    // Its first connection (an init container's) waits for the pod's
    // config and certificate, which come once the pod is published.
    let testbed = std::sync::Arc::new(testbed);
    let first = std::thread::spawn({
        let testbed = testbed.clone();
        move || round_trip_from(&testbed, "fresh-1", fresh, db)
    });
    mesh.publish_pod(&testbed, "fresh-1").unwrap();
    assert_eq!(first.join().unwrap().unwrap(), MARKER);

    // It arrived as fresh-1's own identity.
    let as_fresh = "source_principal=\"spiffe://cluster.local/ns/shop/sa/fresh\"";
    wait_until(WAIT, || {
        Ok(metric_sum(&mesh, &testbed, "node-2", as_fresh)? >= 1)
    })
    .unwrap();
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn a_pod_set_up_while_its_proxy_is_down_waits_until_the_proxy_serves_it() {
    let testbed = cluster();
    let (mut mesh, _server) = start(&testbed);
    let db = weft_testbed::shop_db(&testbed).unwrap();
    let web = IpAddr::V4(testbed.pod_ip("web-1").unwrap());
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();

    // A node reboot: the proxy is not running yet when the runtime sets up
    // web-1's sandbox again (a fresh namespace, without capture).
    mesh.kill_proxy("node-1").unwrap();
    let removed = testbed
        .run_in(Target::Pod("web-1"), || {
            Command::new("nft")
                .args(["delete", "table", "inet", "weft"])
                .status()
        })
        .unwrap()
        .unwrap();
    assert!(removed.success());
    // weft-cni refuses to let it start ("try again later"): the proxy
    // cannot be reached and shop is meshed, as the proxy last said.
    let (started, said) = mesh
        .run_cni_plugin(&testbed, "node-1", "web-1", "ADD")
        .unwrap();
    assert!(!started, "web-1 set up without a proxy: {said}");
    assert!(said.contains("\"code\":11"), "{said}");

    // The proxy comes back: the runtime's next try succeeds, and web-1's
    // traffic is meshed.
    mesh.start_proxy(&testbed, "node-1").unwrap();
    wait_until(WAIT, || {
        Ok(mesh.run_cni_plugin(&testbed, "node-1", "web-1", "ADD")?.0)
    })
    .unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    assert_eq!(round_trip_from(&testbed, "web-1", web, db).unwrap(), MARKER);
    wire.finish().unwrap().check_only_tls(MARKER).unwrap();
}

#[test]
fn the_proxys_own_ports_in_a_pod_are_refused_not_looped() {
    let testbed = cluster();
    let (mesh, _server) = start(&testbed);
    let db = testbed.pod_ip("db-1").unwrap();
    let old = IpAddr::V4(testbed.pod_ip("old-1").unwrap());
    // Plaintext to db-1's 15006 would come back to the proxy's own
    // listener there, and again; likewise a tunnel to it.
    for port in [15006, 15001] {
        let to = SocketAddr::from((db, port));
        assert!(
            round_trip_from(&testbed, "old-1", old, to).is_err(),
            "{port}"
        );
    }
    let refused = || metric_sum(&mesh, &testbed, "node-2", "reason=\"connect_failed\"").unwrap();
    wait_until(WAIT, || Ok(refused() >= 2)).unwrap();
    // And the proxy serves on.
    let to = weft_testbed::shop_db(&testbed).unwrap();
    assert_eq!(
        round_trip_from(&testbed, "old-1", old, to).unwrap(),
        b"legacy hello"
    );
}

/// The testbed with fresh-1 (ServiceAccount `fresh`, label app=fresh) on
/// node-1, held back: its sandbox exists, weft knows nothing of it.
fn with_fresh_pod() -> (Testbed, WeftMesh, SocketAddr) {
    let testbed = weft_testbed::shop_testbed_builder()
        .pod_network(PodNetwork::Bridge)
        .pod(weft_testbed::shop_pod(
            "node-1",
            "fresh-1",
            "fresh",
            &[("app", "fresh")],
        ))
        .build()
        .unwrap();
    let mesh = WeftMesh::start_without(&testbed, &["fresh-1"]).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    let db = weft_testbed::shop_db(&testbed).unwrap();
    (testbed, mesh, db)
}

#[test]
fn a_pod_at_a_deleted_pods_address_gets_nothing_of_that_pod() {
    let (testbed, mesh, db) = with_fresh_pod();
    let _server = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    mesh.write_manifest("only-web.yaml", ALLOW_WEB_TO_DB)
        .unwrap();
    wait_for_reach(&testbed, "batch-1", db, false);
    let fresh = IpAddr::V4(testbed.pod_ip("fresh-1").unwrap());

    // The config still has gone-1 (ServiceAccount web, deleted) at the
    // address the runtime now gives fresh-1: the API server's deletion
    // has not reached weft yet.
    let mut gone = testbed
        .objects()
        .into_iter()
        .find(|object| object["kind"] == "Pod" && object["metadata"]["name"] == "fresh-1")
        .unwrap();
    gone["metadata"]["name"] = "gone-1".into();
    gone["metadata"]["uid"] = "testbed-shop-gone-1".into();
    gone["metadata"]["labels"]["app"] = "web".into();
    gone["spec"]["serviceAccountName"] = "web".into();
    mesh.write_manifest("pod-gone-1.yaml", &gone.to_string())
        .unwrap();
    wait_until(WAIT, || {
        Ok(mesh
            .proxy_admin(&testbed, "node-1", "/config_dump")?
            .contains("shop/gone-1"))
    })
    .unwrap();

    // fresh-1 is announced as itself: its connection waits for a config
    // that names it there, and never goes as gone-1 (whom db-1 admits).
    mesh.create_pod(&testbed, "fresh-1").unwrap();
    assert!(
        round_trip_from(&testbed, "fresh-1", fresh, db).is_err(),
        "fresh-1 reached db-1 as gone-1"
    );
    let unknown = || metric_sum(&mesh, &testbed, "node-1", "unknown_source").unwrap();
    wait_until(WAIT, || Ok(unknown() >= 1)).unwrap();

    // The deletion arrives and fresh-1 is published; db-1 now admits
    // fresh alone: fresh-1 gets in, as itself.
    std::fs::remove_file(mesh.manifests_dir().join("pod-gone-1.yaml")).unwrap();
    mesh.write_manifest(
        "only-web.yaml",
        &ALLOW_WEB_TO_DB.replace("sa/web", "sa/fresh"),
    )
    .unwrap();
    mesh.publish_pod(&testbed, "fresh-1").unwrap();
    wait_until(WAIT, || {
        Ok(round_trip_from(&testbed, "fresh-1", fresh, db).is_ok())
    })
    .unwrap();
    let as_fresh = "source_principal=\"spiffe://cluster.local/ns/shop/sa/fresh\"";
    assert!(metric_sum(&mesh, &testbed, "node-2", as_fresh).unwrap() >= 1);
    let as_web = "source_principal=\"spiffe://cluster.local/ns/shop/sa/web\"";
    assert_eq!(metric_sum(&mesh, &testbed, "node-2", as_web).unwrap(), 0);
}

#[test]
fn a_new_pod_is_reached_on_its_node_only_through_its_policy() {
    let (testbed, mesh, _db) = with_fresh_pod();
    let server = testbed
        .start_echo_server(Target::Pod("fresh-1"), 8080)
        .unwrap();
    let fresh = SocketAddr::from((testbed.pod_ip("fresh-1").unwrap(), 8080));
    let web = IpAddr::V4(testbed.pod_ip("web-1").unwrap());
    mesh.write_manifest(
        "fresh-not-from-web.yaml",
        "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: fresh-not-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: fresh}}
  action: DENY
  rules:
  - from: {principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}
",
    )
    .unwrap();

    // fresh-1 is served from its announcement on, before the config
    // names it: web-1, on the same node, waits for that config and is
    // refused, never let in past a policy the proxy has not seen yet.
    mesh.create_pod(&testbed, "fresh-1").unwrap();
    assert!(round_trip_from(&testbed, "web-1", web, fresh).is_err());
    mesh.publish_pod(&testbed, "fresh-1").unwrap();
    let denied = || metric_sum(&mesh, &testbed, "node-1", "fresh-not-from-web").unwrap();
    wait_until(WAIT, || {
        let _ = round_trip_from(&testbed, "web-1", web, fresh);
        Ok(denied() >= 1)
    })
    .unwrap();
    assert!(round_trip_from(&testbed, "web-1", web, fresh).is_err());
    assert!(
        server.peers().is_empty(),
        "fresh-1 was reached past its policy: {:?}",
        server.peers()
    );
    // Others reach it.
    let batch = IpAddr::V4(testbed.pod_ip("batch-1").unwrap());
    assert_eq!(
        round_trip_from(&testbed, "batch-1", batch, fresh).unwrap(),
        MARKER
    );
}
