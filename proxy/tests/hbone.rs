//! HBONE on loopback, both sides for real: a pool of mutual-TLS HTTP/2
//! connections on the client, `serve_connection` on the server, workload
//! certificates from a real mesh CA, and small TCP servers behind the tunnel.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::hbone::{HboneError, HbonePool, PoolConfig, TunnelStats, Windows};

mod hbone_support;
use hbone_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_bytes_to_the_target_and_the_server_knows_the_client() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());

    let mut request = mesh.request(&server, echo);
    request.forwarded_for = Some("10.0.1.5:43210".parse().unwrap());
    request.headers.insert(
        "baggage",
        HeaderValue::from_static("k8s.namespace.name=shop"),
    );
    let mut tunnel = within("the tunnel", pool.connect(request)).await.unwrap();
    tunnel.write_all(b"hello through the mesh").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("the echo", tunnel.read_to_end(&mut echoed))
        .await
        .unwrap();

    assert_eq!(echoed, b"hello through the mesh");
    assert_eq!(
        tunnel.stats(),
        TunnelStats {
            sent: 22,
            received: 22
        }
    );
    let seen = server.handler.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer_identity, id(FRONTEND));
    assert_eq!(seen[0].target, echo);
    assert_eq!(seen[0].forwarded_for, "10.0.1.5:43210".parse().ok());
    assert_eq!(seen[0].headers["baggage"], "k8s.namespace.name=shop");
    let stats = server.handler.wait_for_stats(1).await;
    assert_eq!(
        stats[0],
        TunnelStats {
            sent: 22,
            received: 22
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_an_address_that_is_not_the_servers_is_refused_with_400() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let pool = pool(PoolConfig::default());

    let elsewhere = "127.0.0.2:8080".parse().unwrap();
    let error = pool
        .connect(mesh.request(&server, elsewhere))
        .await
        .unwrap_err();

    assert_refused(&error, StatusCode::BAD_REQUEST);
    assert!(
        server.handler.requests().is_empty(),
        "the handler is not asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_refusals_reach_the_client_as_401_and_503() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let pool = pool(PoolConfig::default());

    let denied = SocketAddr::new(server.addr.ip(), DENIED_PORT);
    let error = pool
        .connect(mesh.request(&server, denied))
        .await
        .unwrap_err();
    assert_refused(&error, StatusCode::UNAUTHORIZED);
    assert_eq!(error.reason(), "refused_unauthorized");

    let missing = SocketAddr::new(server.addr.ip(), UNAVAILABLE_PORT);
    let error = pool
        .connect(mesh.request(&server, missing))
        .await
        .unwrap_err();
    assert_refused(&error, StatusCode::SERVICE_UNAVAILABLE);

    // Refused streams leave the connection usable.
    let echo = echo_server().await;
    let mut tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(
        round_trip(&mut tunnel, b"still there").await,
        b"still there"
    );
    assert_eq!(server.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_half_closes_and_still_reads_the_answer() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let upstream = answers_after_eof().await;
    let pool = pool(PoolConfig::default());

    let mut tunnel = pool.connect(mesh.request(&server, upstream)).await.unwrap();
    tunnel.write_all(b"the whole request").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut answer = String::new();
    within("the answer", tunnel.read_to_string(&mut answer))
        .await
        .unwrap();

    assert_eq!(answer, "received 17 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_half_closes_and_still_reads_the_request() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let (upstream, received) = banner_then_listens().await;
    let pool = pool(PoolConfig::default());

    let mut tunnel = pool.connect(mesh.request(&server, upstream)).await.unwrap();
    let mut banner = Vec::new();
    within("the banner and EOF", tunnel.read_to_end(&mut banner))
        .await
        .unwrap();
    assert_eq!(banner, b"banner");
    tunnel
        .write_all(b"written after the server's EOF")
        .await
        .unwrap();
    tunnel.shutdown().await.unwrap();

    let got = within("the upstream's report", received).await.unwrap();
    assert_eq!(got, b"written after the server's EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_tunnel_ends_it_on_the_server_too() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());

    let mut tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(round_trip(&mut tunnel, b"then gone").await, b"then gone");
    drop(tunnel);

    // The CANCEL reads as EOF on the server, which closes the upstream
    // and reports the tunnel as ended.
    let stats = server.handler.wait_for_stats(1).await;
    assert_eq!(stats[0].received, 9);
    eventually("the slot to be freed", || pool.streams() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mebibytes_arrive_intact_both_ways() {
    const SIZE: usize = 10 * 1024 * 1024;
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());
    let data = pseudo_random(SIZE);

    let tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
        writer
    });
    let mut echoed = Vec::with_capacity(SIZE);
    within("10 MiB back", reader.read_to_end(&mut echoed))
        .await
        .unwrap();
    let writer = writing.await.unwrap();

    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == data, "the echoed bytes differ from those sent");
    let tunnel = reader.unsplit(writer);
    let both = TunnelStats {
        sent: SIZE as u64,
        received: SIZE as u64,
    };
    assert_eq!(tunnel.stats(), both);
    assert_eq!(server.handler.wait_for_stats(1).await[0], both);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tunnels_share_a_few_connections() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let (dialer, dials) = counting_dialer(Duration::ZERO);
    let pool = HbonePool::new(dialer, PoolConfig::default());

    let mut opening = Vec::new();
    for i in 0..200u32 {
        let pool = pool.clone();
        let request = mesh.request(&server, echo);
        opening.push(tokio::spawn(async move {
            let mut tunnel = pool.connect(request).await.unwrap();
            let message = i.to_be_bytes();
            assert_eq!(round_trip(&mut tunnel, &message).await, message);
            tunnel
        }));
    }
    let mut open = Vec::new();
    for task in opening {
        open.push(within("a tunnel", task).await.unwrap());
    }

    assert_eq!(pool.streams(), 200);
    assert!(
        pool.connections() <= 3,
        "{} connections",
        pool.connections()
    );
    assert!(server.accepted() <= 3, "{} connections", server.accepted());
    assert!(dials.load(Ordering::SeqCst) <= 3, "{dials:?} dials");
    drop(open);
    eventually("the streams to end", || pool.streams() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_a_dead_address_share_one_failed_dial() {
    let mesh = Mesh::new();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    // A slow network: the refusal takes half a second to come back, so the
    // requests below all arrive while the first dial is under way.
    let (dialer, dials) = counting_dialer(Duration::from_millis(500));
    let pool = HbonePool::new(dialer, PoolConfig::default());

    let mut attempts = Vec::new();
    for _ in 0..20 {
        let (pool, request) = (pool.clone(), mesh.request_to(dead, dead));
        attempts.push(tokio::spawn(async move { pool.connect(request).await }));
    }
    for attempt in attempts {
        let error = within("the failure", attempt).await.unwrap().unwrap_err();
        assert_eq!(error.reason(), "dial_failed", "{error}");
        assert!(error.to_string().contains(&dead.to_string()), "{error}");
    }

    assert!(dials.load(Ordering::SeqCst) < 5, "{dials:?} dials");
    assert_eq!(pool.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_another_identity_refuses_the_server() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let pool = pool(PoolConfig::default());

    let mut request = mesh.request(&server, SocketAddr::new(server.addr.ip(), 80));
    request.destination_identity = id(PAYMENTS);
    let error = pool.connect(request).await.unwrap_err();

    assert!(
        matches!(error, HboneError::TlsHandshake { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("expected {PAYMENTS}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("the peer is {CHECKOUT}")),
        "{message}"
    );
    assert_eq!(pool.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_plaintext_do_not_hang_or_stop_the_server() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;

    for junk in [
        pseudo_random(4096),
        b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n".to_vec(),
    ] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(&junk).await.unwrap();
        let mut rest = Vec::new();
        // Closed (cleanly or with a reset), not left hanging.
        let _ = within("the server to hang up", tcp.read_to_end(&mut rest)).await;
    }
    // A proper TLS client that then speaks HTTP/1.1 instead of HTTP/2.
    let config = weft_certs::hbone_client_config(
        &mesh.frontend,
        &id(CHECKOUT),
        weft_certs::KeyExchange::default(),
    )
    .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within("the server to hang up", tls.read_to_end(&mut rest)).await;

    let pool = pool(PoolConfig::default());
    let mut tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(
        round_trip(&mut tunnel, b"still serving").await,
        b"still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    });

    let mut tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(round_trip(&mut tunnel, b"once").await, b"once");
    assert_eq!(pool.connections(), 1);
    drop(tunnel);

    eventually("the pool to close it", || pool.connections() == 0).await;
    eventually("the server to see it closed", || server.finished() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_open_tunnels_and_the_pool_lets_go() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());
    let mut tunnel = pool.connect(mesh.request(&server, echo)).await.unwrap();

    server.drain.send_replace(true);

    assert_eq!(
        round_trip(&mut tunnel, b"after GOAWAY").await,
        b"after GOAWAY"
    );
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", tunnel.read_to_end(&mut rest)).await.unwrap();
    drop(tunnel);
    eventually("the server to close", || server.finished() == 1).await;
    eventually("the pool to forget it", || pool.connections() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tunnels_use_a_connection_made_with_the_renewed_certificate() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());
    let renewed = workload_at(
        &mesh.ca,
        FRONTEND,
        SystemTime::now() + Duration::from_secs(60),
    );

    let mut old = pool.connect(mesh.request(&server, echo)).await.unwrap();
    let mut request = mesh.request(&server, echo);
    request.certificate = renewed;
    let mut new = pool.connect(request).await.unwrap();

    assert_eq!(
        server.accepted(),
        2,
        "a new connection for the new certificate"
    );
    assert_eq!(pool.connections(), 1, "the old one takes no new streams");
    assert_eq!(round_trip(&mut old, b"old").await, b"old");
    assert_eq!(round_trip(&mut new, b"new").await, b"new");
    drop(old);
    eventually("the old connection to close", || server.finished() == 1).await;

    // A request still holding the old certificate rides the newer connection.
    let mut late = pool.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(round_trip(&mut late, b"late").await, b"late");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_pooled_connections_are_retired_when_it_leaves() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let pool = pool(PoolConfig::default());
    let pod: std::net::IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
    let mut request = mesh.request(&server, echo);
    request.source_ip = Some(pod);
    let mut open = pool.connect(request.clone()).await.unwrap();
    assert_eq!(pool.connections(), 1);

    let other: std::net::IpAddr = "10.244.9.9".parse().unwrap();
    assert_eq!(pool.retire_source(other), 0, "another pod's address");
    assert_eq!(pool.retire_source(pod), 1);
    assert_eq!(pool.connections(), 0);
    // The open tunnel goes on; the next request dials a connection of its own.
    assert_eq!(round_trip(&mut open, b"still").await, b"still");
    let mut next = pool.connect(request).await.unwrap();
    assert_eq!(round_trip(&mut next, b"new").await, b"new");
    assert_eq!(server.accepted(), 2);
    drop(open);
    eventually("the retired connection to close", || server.finished() == 1).await;
}

// ---- the scenario's parts ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_windows_come_from_the_budget_and_go_back_to_it() {
    const KIB: u32 = 1024;
    let mesh = Mesh::new();
    // One full window from half the budget, four floors from the rest.
    let budget = u64::from(2048 * KIB);
    let windows = Windows::new(64 * KIB, 1024 * KIB, 256 * KIB, 100, budget);
    let server = mesh.server_with(windows.clone()).await;
    let echo = echo_server().await;
    // A pool each: a connection each.
    let mut pools: Vec<HbonePool> = (0..6).map(|_| pool(PoolConfig::default())).collect();

    let mut tunnels = Vec::new();
    for pool in &pools[..5] {
        tunnels.push(pool.connect(mesh.request(&server, echo)).await.unwrap());
    }
    assert_eq!(windows.reserved(), budget);
    let refused = within(
        "the sixth connection",
        pools[5].connect(mesh.request(&server, echo)),
    )
    .await;
    assert!(refused.is_err(), "no window left, yet a tunnel opened");

    // The full window and a floor both carry more than they are.
    let bulk: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    for tunnel in &mut tunnels[..2] {
        let (mut read, mut write) = tokio::io::split(&mut *tunnel);
        let sending = async {
            write.write_all(&bulk).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let receiving = read.read_to_end(&mut echoed);
        let (_, received) =
            within("the bulk echo", async { tokio::join!(sending, receiving) }).await;
        received.unwrap();
        assert!(echoed == bulk, "the echo differs");
    }

    // A connection's window goes back when it closes.
    let finished = server.finished();
    drop(tunnels.remove(0));
    drop(pools.remove(0));
    eventually("the first connection to end", || {
        server.finished() > finished
    })
    .await;
    let retry = pool(PoolConfig::default());
    let mut again = retry.connect(mesh.request(&server, echo)).await.unwrap();
    assert_eq!(round_trip(&mut again, b"room again").await, b"room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_window_budget_dials_nothing() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let echo = echo_server().await;
    let config = PoolConfig {
        windows: Windows::new(65_535, 65_535, 65_535, 100, 1000),
        ..PoolConfig::default()
    };

    let error = pool(config)
        .connect(mesh.request(&server, echo))
        .await
        .unwrap_err();

    assert_eq!(error.reason(), "window_budget", "{error}");
    assert_eq!(server.accepted(), 0);
}
