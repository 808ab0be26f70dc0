//! Hostile neighbours on the testbed: one pod floods its node's proxy, and
//! another pod's traffic must go on. Each test runs an attack and a
//! legitimate client side by side and asserts what the client sees (every
//! exchange answered) and what the proxy counted (the limit that bit).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use weft_testbed::{PodSpec, Target, Testbed, WeftMesh, echo_round_trip, metric_sum, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// node-1: client and flood (meshed, each its own identity), intruder
/// (unmeshed). node-2: server (meshed).
fn cluster() -> (Testbed, WeftMesh) {
    let pod = PodSpec::named;
    let testbed = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(pod("node-1", "shop", "client", true))
        .pod(pod("node-1", "shop", "flood", true))
        .pod(pod("node-1", "legacy", "intruder", false))
        .pod(pod("node-2", "shop", "server", true))
        .build()
        .unwrap();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.wait_for_data_plane(&testbed).unwrap();
    (testbed, mesh)
}

/// Room for the attack's sockets in this process, whatever the machine's
/// default soft limit (often 1,024).
fn raise_open_files(wanted: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard).unwrap();
    }
}

/// Opens connections from `from` to `to` as fast as it can until `stop`,
/// counting them in `opened`, keeping the latest `keep` of them open;
/// returns those.
fn flood(
    testbed: &Testbed,
    from: Target<'_>,
    to: SocketAddr,
    keep: usize,
    stop: &AtomicBool,
    opened: &AtomicUsize,
) -> VecDeque<TcpStream> {
    testbed
        .run_in(from, || {
            let mut held = VecDeque::with_capacity(keep);
            while !stop.load(Ordering::SeqCst) {
                if let Ok(stream) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                    opened.fetch_add(1, Ordering::SeqCst);
                    if held.len() == keep {
                        held.pop_front();
                    }
                    held.push_back(stream);
                }
            }
            held
        })
        .unwrap()
}

/// `count` requests of the client pod to the echo server at `to`, each
/// once on a kept connection and once on a new one: every one answered.
fn client_requests(testbed: &Testbed, to: SocketAddr, count: usize) {
    let mut kept = testbed.connect(Target::Pod("client"), to).unwrap();
    for i in 0..count {
        let message = format!("request {i}");
        assert_eq!(
            echo_round_trip(&mut kept, message.as_bytes()).unwrap(),
            message.as_bytes()
        );
        new_connection_round_trip(testbed, "client", to, message.as_bytes());
    }
}

/// A new connection from `from` to the echo server at `to`, and one
/// exchange on it.
fn new_connection_round_trip(testbed: &Testbed, from: &str, to: SocketAddr, message: &[u8]) {
    let mut stream = testbed.connect(Target::Pod(from), to).unwrap();
    assert_eq!(echo_round_trip(&mut stream, message).unwrap(), message);
}

#[test]
fn silent_connections_to_15008_from_one_pod_leave_other_pods_tunnels_alone() {
    let (testbed, mesh) = cluster();
    raise_open_files(8192);
    let server_ip = testbed.pod_ip("server").unwrap();
    let _echo = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let hbone = SocketAddr::from((server_ip, 15008));
    let echo = SocketAddr::from((server_ip, 8080));
    let (stop, opened) = (AtomicBool::new(false), AtomicUsize::new(0));

    let silent = std::thread::scope(|scope| {
        // The intruder (not meshed, so nothing stops it reaching 15008)
        // keeps 2,000 connections open that never say a word, opening new
        // ones as fast as it can.
        let intruder = scope.spawn(|| {
            let intruder = Target::Pod("intruder");
            flood(&testbed, intruder, hbone, 2000, &stop, &opened)
        });
        wait_until(WAIT, || Ok(opened.load(Ordering::SeqCst) >= 2000)).unwrap();
        // Meanwhile the client's first tunnel to the server needs a TLS
        // handshake on node-2: its proxy takes it, and the ones after it.
        for i in 0..20 {
            let request = format!("request {i}");
            new_connection_round_trip(&testbed, "client", echo, request.as_bytes());
        }
        stop.store(true, Ordering::SeqCst);
        intruder.join().unwrap()
    });

    let rejected = |reason: &str| {
        let needle = format!(r#"weft_proxy_rejected_total{{listener="hbone",reason="{reason}"}}"#);
        metric_sum(&mesh, &testbed, "node-2", &needle).unwrap()
    };
    assert!(
        rejected("handshake_source_limit") > 0,
        "the intruder's connections beyond its share of handshakes were refused"
    );
    // The ones it was allowed to hold are closed for saying nothing.
    wait_until(WAIT, || Ok(rejected("handshake_timeout") > 0)).unwrap();
    assert_eq!(rejected("handshake_limit"), 0, "the node's cap never bit");
    drop(silent);
}

/// A flood from the flood pod to the server's echo, holding the latest
/// `keep` connections, beside the client's `requests`: once `node`'s
/// proxy has refused more than 100 of the flood's connections for
/// `refused` (a `weft_proxy_rejected_total` series), the client's
/// requests, on a kept connection and on new ones, are all answered while
/// the flood goes on. `node`'s proxy runs with `flags`.
struct FloodBesideClient<'a> {
    node: &'a str,
    flags: &'a [&'a str],
    keep: usize,
    refused: &'a str,
    requests: usize,
}

impl FloodBesideClient<'_> {
    fn run(&self) -> (Testbed, WeftMesh) {
        let (testbed, mut mesh) = cluster();
        raise_open_files(8192);
        let old = mesh
            .upgrade_proxy_with(&testbed, self.node, self.flags)
            .unwrap();
        old.wait(WAIT).unwrap();
        let server_ip = testbed.pod_ip("server").unwrap();
        let echo_server = testbed
            .start_echo_server(Target::Pod("server"), 8080)
            .unwrap();
        let echo = SocketAddr::from((server_ip, 8080));
        let (stop, opened) = (AtomicBool::new(false), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            let (testbed, keep, stop, opened) = (&testbed, self.keep, &stop, &opened);
            scope.spawn(move || flood(testbed, Target::Pod("flood"), echo, keep, stop, opened));
            wait_until(WAIT, || {
                Ok(metric_sum(&mesh, testbed, self.node, self.refused)? > 100)
            })
            .unwrap();
            client_requests(testbed, echo, self.requests);
            stop.store(true, Ordering::SeqCst);
        });
        drop(echo_server);
        (testbed, mesh)
    }
}

#[test]
fn a_pod_opening_connections_as_fast_as_it_can_gets_its_share_and_its_neighbour_keeps_going() {
    // A small node: 100 connections in all, saturated at 75. The flood
    // holds every connection it gets and asks for more.
    let (testbed, mesh) = FloodBesideClient {
        node: "node-1",
        flags: &["--max-connections", "100"],
        keep: 5000,
        refused: r#"weft_proxy_rejected_total{listener="outbound",reason="fair_share"}"#,
        requests: 50,
    }
    .run();

    let limit = |reason: &str| {
        let needle =
            format!(r#"weft_proxy_rejected_total{{listener="outbound",reason="{reason}"}}"#);
        metric_sum(&mesh, &testbed, "node-1", &needle).unwrap()
    };
    assert_eq!(limit("node_limit"), 0, "the client never met a full node");
}

#[test]
fn a_pods_tunnels_are_counted_one_by_one_at_the_destination_and_its_neighbour_keeps_going() {
    // The server's node lets one source hold 20 connections: the flood's
    // tunnels share a pooled HBONE connection or two, but each is a
    // connection to the server pod all the same, and is refused beyond
    // the source's cap. The client is another source.
    FloodBesideClient {
        node: "node-2",
        flags: &["--max-inbound-connections-per-source", "20"],
        keep: 500,
        refused: r#"weft_proxy_rejected_total{listener="hbone",reason="source_limit"}"#,
        requests: 20,
    }
    .run();
}

#[test]
fn a_refused_connection_flood_with_the_log_sink_blocked_stalls_no_traffic() {
    let (testbed, mut mesh) = cluster();
    raise_open_files(8192);
    // node-1's new proxy logs into a pipe that nobody reads: once its
    // buffer is full, every write to it would block.
    let sink = testbed.dir().join("blocked-log-sink");
    nix::unistd::mkfifo(
        &sink,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    let _held_open = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&sink)
        .unwrap();
    let old = mesh
        .upgrade_proxy_logging_to(
            &testbed,
            "node-1",
            &[
                "--max-connections-per-pod=16",
                "--log-buffer-lines=64",
                // Every crate's debug lines: far more than the pipe holds.
                "--log-level=debug",
            ],
            &sink,
        )
        .unwrap();
    old.wait(WAIT).unwrap();
    let server_ip = testbed.pod_ip("server").unwrap();
    let _echo = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let echo = SocketAddr::from((server_ip, 8080));
    let (stop, opened) = (AtomicBool::new(false), AtomicUsize::new(0));
    let pod_limit = r#"weft_proxy_rejected_total{listener="outbound",reason="pod_limit"}"#;

    std::thread::scope(|scope| {
        // The flood's connections beyond its 16 are refused, each a
        // warning the proxy would log, with the log's pipe full.
        scope.spawn(|| flood(&testbed, Target::Pod("flood"), echo, 5000, &stop, &opened));
        wait_until(WAIT, || {
            Ok(metric_sum(&mesh, &testbed, "node-1", pod_limit)? > 1000)
        })
        .unwrap();
        // Every connection logs too (its access log line): the client's
        // requests are all answered.
        client_requests(&testbed, echo, 100);
        stop.store(true, Ordering::SeqCst);
    });
    let dropped = metric_sum(
        &mesh,
        &testbed,
        "node-1",
        "weft_proxy_log_lines_dropped_total",
    )
    .unwrap();
    assert!(
        dropped > 0,
        "the log lines that did not fit were dropped: {}",
        mesh.proxy_metrics(&testbed, "node-1").unwrap()
    );
}

/// `count` connections from `node`'s loopback address 127.0.0.2 to `to`,
/// each having sent half a request's headers, never the rest: a slowloris
/// client, from another source than the legitimate one (127.0.0.1).
fn slowloris(testbed: &Testbed, node: &str, to: SocketAddr, count: usize) -> Vec<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::io::Write;
    testbed
        .run_in(Target::Node(node), || {
            (0..count)
                .filter_map(|_| {
                    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
                    socket
                        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
                        .ok()?;
                    socket
                        .connect_timeout(&to.into(), Duration::from_secs(1))
                        .ok()?;
                    let mut stream = TcpStream::from(socket);
                    // A reset one (over the limit) may fail here or later.
                    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n");
                    Some(stream)
                })
                .collect()
        })
        .unwrap()
}

#[test]
fn slowloris_clients_of_the_metrics_ports_are_cut_off_and_the_scraper_is_answered() {
    let (testbed, mesh) = cluster();
    let proxy_metrics = SocketAddr::from(([127, 0, 0, 1], weft_testbed::PROXY_METRICS_PORT));
    let monitoring =
        SocketAddr::from(([127, 0, 0, 1], weft_testbed::CONTROL_PLANE_MONITORING_PORT));
    let cp_node = mesh.control_plane_node().to_owned();
    let slow_proxy = slowloris(&testbed, "node-1", proxy_metrics, 50);
    let slow_control_plane = slowloris(&testbed, &cp_node, monitoring, 50);

    // The scrapers (another source) are answered while the slow clients
    // hold what they were allowed.
    for _ in 0..5 {
        assert!(mesh.proxy_metrics(&testbed, "node-1").is_ok());
        assert!(mesh.control_plane_page(&testbed, "/metrics").is_ok());
    }
    let proxy_rejected = |reason: &str| {
        let needle =
            format!(r#"weft_proxy_rejected_total{{listener="metrics",reason="{reason}"}}"#);
        metric_sum(&mesh, &testbed, "node-1", &needle).unwrap()
    };
    let control_plane_rejected = |reason: &str| {
        let needle = format!(
            r#"weft_control_plane_rejected_total{{listener="monitoring",reason="{reason}"}} "#
        );
        let page = mesh.control_plane_page(&testbed, "/metrics").unwrap();
        page.lines()
            .filter_map(|line| line.strip_prefix(needle.as_str()))
            .filter_map(|value| value.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(
        proxy_rejected("source_limit") > 0,
        "one source held only its share"
    );
    assert!(control_plane_rejected("source_limit") > 0);
    // The ones held are closed once their headers are overdue.
    wait_until(WAIT, || {
        Ok(proxy_rejected("header_timeout") > 0 && control_plane_rejected("header_timeout") > 0)
    })
    .unwrap();
    drop((slow_proxy, slow_control_plane));
}

/// Uploads a pseudo-random stream from `from` to the checksum server at
/// `to` until `stop`, then half-closes: whether the server's checksum is
/// the one of what was sent, and how many bytes that was.
fn upload_until(testbed: &Testbed, from: &str, to: SocketAddr, stop: &AtomicBool) -> (bool, u64) {
    use std::io::{Read, Write};
    let mut stream = testbed.connect(Target::Pod(from), to).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let (mut checksum, mut sent) = (weft_testbed::Checksum::default(), 0u64);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut bytes = weft_testbed::PseudoRandom(0x2545_f491_4f6c_dd1d);
    while !stop.load(Ordering::SeqCst) {
        bytes.fill(&mut chunk);
        checksum.update(&chunk);
        stream.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).unwrap();
    (u64::from_be_bytes(answer) == checksum.0, sent)
}

#[test]
fn a_bulk_upload_moves_to_the_bulk_lane_intact_and_its_neighbours_requests_are_all_answered() {
    let (testbed, mut mesh) = cluster();
    // Both proxies move a task that keeps them busy 1 % of the time: the
    // upload surely does, so it changes lanes mid-transfer on both nodes
    // however busy the machine is.
    for node in ["node-1", "node-2"] {
        let old = mesh
            .upgrade_proxy_with(&testbed, node, &["--bulk-lane-percent", "1"])
            .unwrap();
        old.wait(WAIT).unwrap();
    }
    let server_ip = testbed.pod_ip("server").unwrap();
    let checksums = weft_testbed::start_checksum_server(&testbed, "server", 9000).unwrap();
    let _echo_server = testbed
        .start_echo_server(Target::Pod("server"), 8080)
        .unwrap();
    let moved = r#"weft_proxy_lane_moves_total{to="bulk"}"#;
    let stop = AtomicBool::new(false);
    let (intact, sent) = std::thread::scope(|scope| {
        let (testbed, stop) = (&testbed, &stop);
        let upload = scope.spawn(move || {
            upload_until(testbed, "flood", SocketAddr::from((server_ip, 9000)), stop)
        });
        // The upload has moved at both ends of its tunnel.
        wait_until(WAIT, || {
            Ok(metric_sum(&mesh, testbed, "node-1", moved)? >= 1
                && metric_sum(&mesh, testbed, "node-2", moved)? >= 1)
        })
        .unwrap();
        client_requests(testbed, SocketAddr::from((server_ip, 8080)), 20);
        stop.store(true, Ordering::SeqCst);
        upload.join().unwrap()
    });
    checksums.join().unwrap().unwrap();
    eprintln!("uploaded {sent} bytes beside the requests");
    assert!(intact, "the upload ({sent} bytes) arrived changed");
}
