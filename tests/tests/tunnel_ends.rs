//! End to end on the testbed: how a tunnel ends and what its ends tell each
//! other. A pod's reset reaches the pod at the other end as a reset (both
//! ways), while a clean close stays clean; the destination learns the
//! Service the client addressed and who the client is (baggage), and both
//! proxies log one trace id for the connection.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use weft_testbed::{PodSpec, ServiceSpec, Target, Testbed, WeftMesh, echo_round_trip, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// node-1: client; node-2: server, behind Service `shop/server` (80 → 8080).
fn cluster() -> (Testbed, WeftMesh) {
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "client",
            service_account: "client",
            labels: &[("app", "storefront"), ("version", "v7")],
            meshed: true,
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

/// Closes `stream` with a reset, as a crashing or aborting program does.
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// A listener in the server pod on `port`, and the accepted connection,
/// handed to `serve` on a thread.
fn serve_once<T: Send + 'static>(
    testbed: &Testbed,
    port: u16,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let listener = testbed
        .run_in(Target::Pod("server"), || {
            TcpListener::bind(("0.0.0.0", port))
        })
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        serve(stream)
    })
}

/// What reading `stream` to its end gives: the bytes, or the error kind.
fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).map_err(|e| e.kind())?;
    Ok(rest)
}

#[test]
fn a_reset_on_either_side_reaches_the_other_pod_as_a_reset() {
    let (testbed, _mesh) = cluster();
    let server_ip = testbed.pod_ip("server").unwrap();

    // The server resets after reading the request: the client, which is
    // waiting for an answer, must see a reset, not a clean end.
    let server = serve_once(&testbed, 8081, |mut stream| {
        let mut request = [0; 5];
        stream.read_exact(&mut request).unwrap();
        reset(stream);
        request
    });
    let mut stream = testbed
        .connect(Target::Pod("client"), SocketAddr::from((server_ip, 8081)))
        .unwrap();
    stream.write_all(b"hello").unwrap();
    assert_eq!(&server.join().unwrap(), b"hello");
    assert_eq!(
        read_to_end(&mut stream),
        Err(ErrorKind::ConnectionReset),
        "the server's reset reached the client as a clean end"
    );

    // The client resets mid-upload: the server must see a reset too.
    let server = serve_once(&testbed, 8082, |mut stream| {
        let mut first = [0; 5];
        stream.read_exact(&mut first).unwrap();
        // Tell the client its bytes arrived, then read on.
        stream.write_all(b"k").unwrap();
        read_to_end(&mut stream)
    });
    let mut stream = testbed
        .connect(Target::Pod("client"), SocketAddr::from((server_ip, 8082)))
        .unwrap();
    stream.write_all(b"part1").unwrap();
    let mut ack = [0; 1];
    stream.read_exact(&mut ack).unwrap();
    reset(stream);
    assert_eq!(
        server.join().unwrap(),
        Err(ErrorKind::ConnectionReset),
        "the client's reset reached the server as a clean end"
    );

    // A clean close stays clean both ways.
    let server = serve_once(&testbed, 8083, |mut stream| {
        let request = read_to_end(&mut stream);
        stream.write_all(b"bye").unwrap();
        request
    });
    let mut stream = testbed
        .connect(Target::Pod("client"), SocketAddr::from((server_ip, 8083)))
        .unwrap();
    stream.write_all(b"all of it").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut stream), Ok(b"bye".to_vec()));
    assert_eq!(server.join().unwrap(), Ok(b"all of it".to_vec()));
}

#[test]
fn a_connection_a_policy_change_refuses_is_reset_not_ended() {
    let (testbed, mesh) = cluster();
    let _echo = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let server_ip = testbed.pod_ip("server").unwrap();
    let mut stream = testbed
        .connect(Target::Pod("client"), SocketAddr::from((server_ip, 8080)))
        .unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"ping").unwrap(), b"ping");
    let deny = format!(
        "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-client, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from: {{principals: [\"{CLIENT_ID}\"]}}
"
    );
    mesh.write_manifest("deny.yaml", &deny).unwrap();
    // The client waits for bytes that will not come: the destination
    // proxy cuts the connection when it applies the DENY, and the client
    // must learn that it was cut.
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0; 1];
    assert_eq!(
        stream.read(&mut byte).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "the revoked connection did not end with a reset"
    );
}

#[test]
fn the_destination_learns_the_service_and_the_client_and_both_ends_log_one_trace() {
    let (testbed, mesh) = cluster();
    let _echo = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let vip = testbed.service_vip("shop", "server").unwrap();
    let mut stream = testbed
        .connect(Target::Pod("client"), SocketAddr::from((vip, 80)))
        .unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"ping").unwrap(), b"ping");
    drop(stream);

    // The destination's metrics name the Service the client addressed.
    wait_until(WAIT, || {
        Ok(mesh.proxy_metrics(&testbed, "node-2")?.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_service=\"server.shop.svc.cluster.local\"")
        }))
    })
    .unwrap_or_else(|e| {
        let metrics = mesh.proxy_metrics(&testbed, "node-2").unwrap_or_default();
        panic!("no destination_service on node-2: {e}\n{metrics}")
    });

    // The tunnel's TLS used the post-quantum hybrid key exchange.
    let hybrid = |node: &str, side: &str| -> anyhow::Result<bool> {
        let wanted = format!(
            "weft_proxy_hbone_handshakes_total{{side=\"{side}\",group=\"X25519MLKEM768\"}} "
        );
        Ok(mesh.proxy_metrics(&testbed, node)?.lines().any(|l| {
            l.strip_prefix(&wanted)
                .is_some_and(|count| count.trim() != "0")
        }))
    };
    assert!(
        hybrid("node-1", "client").unwrap(),
        "node-1 dialled without the hybrid"
    );
    assert!(
        hybrid("node-2", "server").unwrap(),
        "node-2 served without the hybrid"
    );

    // Both access-log lines carry the same trace id; the destination's
    // also the client's canonical service and revision from its baggage.
    let closed = |log: &str| {
        log.lines()
            .find(|l| l.contains("connection closed") && l.contains(CLIENT_ID))
            .map(str::to_owned)
    };
    let source_log = mesh
        .proxy("node-1")
        .unwrap()
        .stdout_once(|log| closed(log).is_some())
        .unwrap();
    let destination_log = mesh
        .proxy("node-2")
        .unwrap()
        .stdout_once(|log| closed(log).is_some())
        .unwrap();
    let (source_line, destination_line) = (
        closed(&source_log).unwrap(),
        closed(&destination_log).unwrap(),
    );
    let trace = trace_id(&source_line).unwrap_or_else(|| panic!("no trace id: {source_line}"));
    assert_eq!(
        trace_id(&destination_line).as_deref(),
        Some(trace.as_str()),
        "{source_line}\n{destination_line}"
    );
    for field in [
        "src.service=\"storefront\"",
        "src.revision=\"v7\"",
        "src.cluster=\"Kubernetes\"",
    ] {
        assert!(
            destination_line.contains(field),
            "{field}: {destination_line}"
        );
    }
}

/// The 32 hex digits after `trace_id=` in a log line, if any.
fn trace_id(line: &str) -> Option<String> {
    let rest = &line[line.find("trace_id=")? + "trace_id=".len()..];
    let id: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (id.len() == 32).then_some(id)
}
