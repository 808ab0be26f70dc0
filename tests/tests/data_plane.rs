//! End to end on the testbed: pods talk as they always did, and weft
//! carries their traffic. Round trips, what the wire between the nodes
//! shows, bulk and many connections, half-close, unmeshed and same-node
//! paths, and the attacks the destination proxy must refuse. Draining is in
//! `drain.rs`.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use nix::sys::signal::Signal;
use weft_testbed::{
    Checksum, PodSpec, ServiceSpec, Target, Testbed, WeftMesh, WireWatch, echo_round_trip,
    start_checksum_server, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// node-1: client (meshed), neighbour (meshed, same node as client), plain
/// (unmeshed namespace). node-2: server (meshed, behind Service "server"),
/// legacy (unmeshed namespace).
fn cluster() -> (Testbed, WeftMesh) {
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "client",
            service_account: "client",
            labels: &[],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "neighbour",
            service_account: "neighbour",
            labels: &[("app", "neighbour")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-1",
            namespace: "legacy",
            name: "plain",
            service_account: "default",
            labels: &[],
            meshed: false,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "shop",
            name: "server",
            service_account: "server",
            labels: &[("app", "server")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "legacy",
            name: "old",
            service_account: "default",
            labels: &[],
            meshed: false,
            probe_ports: &[],
        })
        .service(ServiceSpec {
            namespace: "shop",
            name: "server",
            port: 80,
            target_port: 8080,
            selector: &[("app", "server")],
        })
        .build()
        .unwrap();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    (testbed, mesh)
}

fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    echo_round_trip(stream, message).unwrap()
}

/// Waits until a line of `node`'s proxy metrics is `wanted`.
fn wait_for_metric(mesh: &WeftMesh, testbed: &Testbed, node: &str, wanted: impl Fn(&str) -> bool) {
    wait_until(WAIT, || {
        Ok(mesh.proxy_metrics(testbed, node)?.lines().any(&wanted))
    })
    .unwrap_or_else(|e| {
        let metrics = mesh.proxy_metrics(testbed, node).unwrap_or_default();
        panic!("{node}: no such metric line: {e}\n{metrics}")
    });
}

fn addr(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn pods_reach_pods_and_services_on_other_nodes_as_themselves() {
    let (testbed, mesh) = cluster();
    let server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let client_ip = testbed.pod_ip("client").unwrap();

    let mut direct = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("server").unwrap(), 8080),
        )
        .unwrap();
    assert_eq!(round_trip(&mut direct, b"to the pod"), b"to the pod");
    let vip = testbed.service_vip("shop", "server").unwrap();
    let mut via_service = testbed
        .connect(Target::Pod("client"), addr(vip, 80))
        .unwrap();
    assert_eq!(
        round_trip(&mut via_service, b"to the service"),
        b"to the service"
    );

    let peers = server.peers();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(
        peers.iter().all(|p| p.ip() == client_ip),
        "the server sees the client pod's IP: {peers:?}"
    );

    // The source proxy names the Service the client addressed, as Istio does.
    drop(via_service);
    wait_until(WAIT, || {
        Ok(mesh.proxy_metrics(&testbed, "node-1")?.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_service=\"server.shop.svc.cluster.local\"")
        }))
    })
    .unwrap();
}

#[test]
fn the_link_between_nodes_carries_only_tls() {
    let (testbed, mut mesh) = cluster();
    let _server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let wire = WireWatch::start(&testbed, Target::Node("node-2"), "eth0").unwrap();

    let marker = b"weft-plaintext-marker-7f3a9c";
    let mut stream = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("server").unwrap(), 8080),
        )
        .unwrap();
    for _ in 0..10 {
        assert_eq!(round_trip(&mut stream, marker), marker);
    }
    drop(stream);
    wire.finish().unwrap().check_only_tls(marker).unwrap();
    mesh.stop_control_plane().unwrap();
}

#[test]
fn the_destination_proxy_names_the_source_principal() {
    let (testbed, mesh) = cluster();
    let _server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    // node-1's proxy is stopped while the client connects and writes (the
    // kernel completes the handshake for it), so the bytes are waiting
    // when it accepts: they leave as early data with the CONNECT.
    let source_proxy = mesh.proxy("node-1").unwrap();
    source_proxy.signal(Signal::SIGSTOP).unwrap();
    let connected = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("server").unwrap(), 8080),
        )
        .and_then(|mut stream| {
            stream.write_all(b"hello")?;
            Ok(stream)
        });
    source_proxy.signal(Signal::SIGCONT).unwrap();
    let mut stream = connected.unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello");
    drop(stream);

    let principal = format!("source_principal=\"{CLIENT_ID}\"");
    wait_for_metric(&mesh, &testbed, "node-2", |l| {
        l.starts_with("istio_tcp_connections_closed_total")
            && l.contains("reporter=\"destination\"")
            && l.contains(&principal)
            && l.contains("connection_security_policy=\"mutual_tls\"")
    });
    let received_5 = |reporter: &str, l: &str| {
        l.starts_with("istio_tcp_received_bytes_total")
            && l.contains(&format!("reporter=\"{reporter}\""))
            && l.contains(&principal)
            && l.ends_with(" 5")
    };
    wait_for_metric(&mesh, &testbed, "node-2", |l| received_5("destination", l));
    // The source proxy counts the same bytes, all of them early data.
    wait_for_metric(&mesh, &testbed, "node-1", |l| received_5("source", l));
    let closed = |log: &str| {
        log.lines()
            .any(|l| l.contains("connection closed") && l.contains(CLIENT_ID))
    };
    let log = mesh.proxy("node-2").unwrap().stdout_once(closed).unwrap();
    assert!(closed(&log), "{log}");
}

#[test]
fn a_gibibyte_arrives_intact() {
    let (testbed, _mesh) = cluster();
    let server = start_checksum_server(&testbed, "server", 9000).unwrap();
    let mut stream = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("server").unwrap(), 9000),
        )
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();

    // 1 GiB of a cheap pseudo-random sequence, checksummed as it is sent.
    let mut checksum = Checksum::default();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut bytes = weft_testbed::PseudoRandom(0x9e37_79b9_7f4a_7c15);
    for _ in 0..(1usize << 30) / chunk.len() {
        bytes.fill(&mut chunk);
        checksum.update(&chunk);
        stream.write_all(&chunk).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(answer),
        checksum.0,
        "1 GiB through the mesh arrived changed"
    );
}

#[test]
fn a_thousand_concurrent_connections_all_succeed() {
    let (testbed, _mesh) = cluster();
    let _server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let target = addr(testbed.pod_ip("server").unwrap(), 8080);
    let mut streams: Vec<TcpStream> = (0..1000)
        .map(|i| {
            testbed
                .connect(Target::Pod("client"), target)
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"))
        })
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        let message = format!("connection {i:04}");
        assert_eq!(round_trip(stream, message.as_bytes()), message.as_bytes());
    }
}

#[test]
fn half_close_travels_both_ways() {
    let (testbed, _mesh) = cluster();
    let target = addr(testbed.pod_ip("server").unwrap(), 8080);

    // Client closes first: the echo server still answers what it got, then closes.
    let _echo = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let mut stream = testbed.connect(Target::Pod("client"), target).unwrap();
    stream.write_all(b"last words").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"last words");

    // Server closes first: it says goodbye and shuts its side; the client
    // sees EOF, and can still send, and the server still receives.
    let listener = testbed
        .run_in(Target::Pod("server"), || {
            TcpListener::bind(("0.0.0.0", 8081))
        })
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"goodbye").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        rest
    });
    let mut stream = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("server").unwrap(), 8081),
        )
        .unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"goodbye");
    stream.write_all(b"still talking").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), b"still talking");
}

#[test]
fn unmeshed_and_same_node_traffic_works() {
    let (testbed, mesh) = cluster();
    let _old = testbed.start_echo_server(Target::Pod("old"), 8080).unwrap();
    let neighbour = testbed
        .start_echo_server(Target::Pod("neighbour"), 8080)
        .unwrap();
    let server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();

    // Meshed client to an unmeshed pod: passed through as plain TCP.
    let mut stream = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("old").unwrap(), 8080),
        )
        .unwrap();
    assert_eq!(round_trip(&mut stream, b"to legacy"), b"to legacy");
    // Meshed client to a meshed pod on the same node.
    let mut stream = testbed
        .connect(
            Target::Pod("client"),
            addr(testbed.pod_ip("neighbour").unwrap(), 8080),
        )
        .unwrap();
    assert_eq!(round_trip(&mut stream, b"next door"), b"next door");
    assert_eq!(neighbour.peers()[0].ip(), testbed.pod_ip("client").unwrap());
    // Unmeshed client to a meshed pod: plaintext, accepted and counted as such.
    let mut stream = testbed
        .connect(
            Target::Pod("plain"),
            addr(testbed.pod_ip("server").unwrap(), 8080),
        )
        .unwrap();
    assert_eq!(round_trip(&mut stream, b"no mesh here"), b"no mesh here");
    assert_eq!(server.peers()[0].ip(), testbed.pod_ip("plain").unwrap());
    drop(stream);
    wait_until(WAIT, || {
        Ok(mesh.proxy_metrics(&testbed, "node-2")?.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"none\"")
        }))
    })
    .unwrap();
}

/// Opens one HBONE tunnel from inside `pod`'s namespace with `certificate`,
/// as an attacker with its own HBONE client would.
fn attack(
    testbed: &Testbed,
    pod: &str,
    certificate: weft_certs::WorkloadCertificate,
    destination: &str,
    hbone: SocketAddr,
    target: SocketAddr,
) -> Result<(), weft_proxy::hbone::HboneError> {
    let destination: weft_certs::Identity = destination.parse().unwrap();
    testbed
        .run_in(Target::Pod(pod), move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let pool = weft_proxy::hbone::HbonePool::new(
                    weft_proxy::hbone::direct_dialer(),
                    weft_proxy::hbone::PoolConfig::default(),
                );
                let request = weft_proxy::hbone::HboneRequest {
                    certificate,
                    destination_identity: destination,
                    hbone_addr: hbone,
                    target,
                    source_ip: None,
                    forwarded_for: None,
                    service_host: None,
                    headers: Default::default(),
                };
                let mut tunnel = pool.connect(request).await?;
                tunnel.write_all(b"attack").await.unwrap();
                let mut echoed = [0u8; 6];
                tunnel.read_exact(&mut echoed).await.unwrap();
                Ok(())
            })
        })
        .unwrap()
}

fn certificate_from(
    ca: &weft_certs::MeshCa,
    identity: &str,
    trust: &weft_certs::TrustBundle,
) -> weft_certs::WorkloadCertificate {
    let identity: weft_certs::Identity = identity.parse().unwrap();
    let now = std::time::SystemTime::now();
    let request = weft_certs::CertificateRequest::generate(&identity).unwrap();
    let chain = ca.sign_csr(request.csr_der(), &identity, now).unwrap();
    request.complete(chain, trust.clone(), now).unwrap()
}

fn failures(mesh: &WeftMesh, testbed: &Testbed, node: &str, reason: &str) -> u64 {
    let metrics = mesh.proxy_metrics(testbed, node).unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("weft_tcp_failures_total") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn attacks_on_the_hbone_port_are_refused_and_the_proxy_keeps_serving() {
    let (testbed, mesh) = cluster();
    let server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let server_ip = testbed.pod_ip("server").unwrap();
    let hbone = addr(server_ip, 15008);
    let target = addr(server_ip, 8080);
    let server_id = "spiffe://cluster.local/ns/shop/sa/server";
    let pem = std::fs::read_to_string(mesh.ca_file()).unwrap();
    let mesh_ca = weft_certs::MeshCa::from_pem("cluster.local", &pem, &pem).unwrap();
    let mesh_roots = mesh_ca.trust_bundle().clone();

    // The attacks come from "plain", an unmeshed pod whose traffic is not
    // captured on its own node, straight at the server pod's HBONE port.

    // 1. A client certificate from another CA (which trusts the mesh root,
    //    so only the server's check stands in the way).
    let rogue_ca =
        weft_certs::MeshCa::generate_root("cluster.local", std::time::SystemTime::now()).unwrap();
    let mut rogue_trust = rogue_ca.trust_bundle().clone();
    rogue_trust.merge(&mesh_roots).unwrap();
    let rogue = certificate_from(&rogue_ca, CLIENT_ID, &rogue_trust);
    assert!(attack(&testbed, "plain", rogue, server_id, hbone, target).is_err());
    wait_until(WAIT, || {
        Ok(failures(&mesh, &testbed, "node-2", "handshake_unknown_issuer") >= 1)
    })
    .unwrap();

    // 2. A valid mesh certificate, but for an identity that does not own the
    //    source address (the client's certificate, used from plain's IP): 401.
    let stolen = certificate_from(&mesh_ca, CLIENT_ID, &mesh_roots);
    let refused = attack(&testbed, "plain", stolen.clone(), server_id, hbone, target).unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    assert_eq!(
        failures(&mesh, &testbed, "node-2", "identity_address_mismatch"),
        1
    );

    // 3. A CONNECT to an address that is not the connection's local one: 400.
    let plain_id = "spiffe://cluster.local/ns/legacy/sa/default";
    let plain_cert = certificate_from(&mesh_ca, plain_id, &mesh_roots);
    let elsewhere = addr(testbed.pod_ip("old").unwrap(), 8080);
    let refused = attack(&testbed, "plain", plain_cert, server_id, hbone, elsewhere).unwrap_err();
    assert!(refused.to_string().contains("400"), "{refused}");

    // 4. Plaintext HTTP and 5. garbage on the HBONE port: the connection is
    //    closed, the proxy logs it and carries on.
    for junk in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, 4][..],
    ] {
        let mut stream = testbed.connect(Target::Pod("plain"), hbone).unwrap();
        stream.write_all(junk).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"),
            "{rest:?}"
        );
    }
    wait_until(WAIT, || {
        Ok(failures(&mesh, &testbed, "node-2", "handshake_garbage")
            + failures(&mesh, &testbed, "node-2", "handshake_failed")
            + failures(&mesh, &testbed, "node-2", "handshake_io")
            >= 2)
    })
    .unwrap();
    let refused = |log: &str| log.contains("TLS handshake refused");
    let log = mesh.proxy("node-2").unwrap().stdout_once(refused).unwrap();
    assert!(refused(&log), "{log}");

    // The proxy still serves the real client.
    let mut stream = testbed.connect(Target::Pod("client"), target).unwrap();
    assert_eq!(round_trip(&mut stream, b"still here"), b"still here");
    assert!(
        server
            .peers()
            .iter()
            .all(|p| p.ip() == testbed.pod_ip("client").unwrap()),
        "no attack reached the pod: {:?}",
        server.peers()
    );
}
