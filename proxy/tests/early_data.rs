//! Early data: the client's first bytes sent right behind the `CONNECT`,
//! before the answer. They must arrive first and in order when the tunnel
//! opens; come to nothing when it is refused, without eating the
//! connection's flow-control window; and never be sent twice when a
//! connection breaks before its answer, since the peer may have passed
//! them on. (That refused early data never reaches the pod, with the real
//! policy check, is in `tests/tests/policy.rs`.)
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_proxy::dataplane::outbound::EARLY_DATA_LIMIT;
use weft_proxy::hbone::{
    CONNECTION_WINDOW, EarlyData, HboneError, PoolConfig, TunnelStats, accept_tls,
};

mod hbone_support;
use hbone_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_arrives_first_and_in_order() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let upstream = echo_server().await;
    let pool = pool(PoolConfig::default());

    let early = EarlyData::new(Bytes::from_static(b"GET / HTTP/1.1\r\n"));
    let connect = pool.connect_sending(mesh.request(&server, upstream), &early);
    let mut tunnel = within("the tunnel", connect).await.unwrap();
    tunnel.write_all(b"host: shop\r\n\r\n").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("the echo", tunnel.read_to_end(&mut echoed))
        .await
        .unwrap();

    assert_eq!(echoed, b"GET / HTTP/1.1\r\nhost: shop\r\n\r\n");
    let stats = server.handler.wait_for_stats(1).await;
    assert_eq!(
        stats[0],
        TunnelStats {
            sent: 30,
            received: 30
        },
        "the server counts early bytes like any other"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_early_data_reaches_nothing_and_does_not_use_up_the_window() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let pool = pool(PoolConfig::default());
    let denied = SocketAddr::new(server.addr.ip(), DENIED_PORT);

    // More early data, over refused streams, than the connection's window
    // holds: if the server kept any of it unreleased, the tunnel at the end
    // would stall.
    let early = EarlyData::new(Bytes::from(vec![b'x'; EARLY_DATA_LIMIT]));
    let streams = CONNECTION_WINDOW as usize / EARLY_DATA_LIMIT + 64;
    for _ in 0..streams {
        let refused = pool.connect_sending(mesh.request(&server, denied), &early);
        let error = within("a refusal", refused).await.unwrap_err();
        assert_refused(&error, StatusCode::UNAUTHORIZED);
        assert!(
            !early.may_have_arrived(),
            "a refusal proves the bytes went nowhere"
        );
    }

    // The same connection still carries a tunnel, early data and all.
    let echo = echo_server().await;
    let first = EarlyData::new(Bytes::from_static(b"first "));
    let connect = pool.connect_sending(mesh.request(&server, echo), &first);
    let mut tunnel = within("the tunnel", connect).await.unwrap();
    tunnel.write_all(b"then").await.unwrap();
    let mut echoed = [0u8; 10];
    within("the echo", tunnel.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"first then");
    assert_eq!(server.accepted(), 1, "one connection throughout");
}

/// An HBONE server that takes each `CONNECT` and its early data, then drops
/// the whole connection without answering: from the client's side, the
/// peer may or may not have passed the bytes on. Counts connections and
/// keeps what arrived.
async fn hangs_up_before_answering(
    mesh: &Mesh,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config =
        weft_certs::hbone_server_config(&mesh.checkout, weft_certs::KeyExchange::default())
            .unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (counted, kept) = (connections.clone(), Arc::clone(&received));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (config, kept) = (config.clone(), Arc::clone(&kept));
            tokio::spawn(async move {
                let tls = accept_tls(tcp, config).await.unwrap();
                let mut h2 = h2::server::handshake(tls).await.unwrap();
                let Some(Ok((request, _respond))) = h2.accept().await else {
                    return;
                };
                let mut body = request.into_body();
                // Keep the connection driven while early data comes in; a
                // plain CONNECT brings none, so do not wait long for it.
                let data = tokio::select! {
                    data = body.data() => data,
                    _ = h2.accept() => None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => None,
                };
                if let Some(Ok(data)) = data {
                    kept.lock().unwrap().extend_from_slice(&data);
                }
                // Dropping `h2` closes the TCP connection, no GOAWAY.
            });
        }
    });
    (addr, connections, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_is_not_sent_again_when_the_connection_breaks_before_the_answer() {
    let mesh = Mesh::new();
    let (addr, connections, received) = hangs_up_before_answering(&mesh).await;
    let target = SocketAddr::new(addr.ip(), 8080);
    let pool = pool(PoolConfig::default());

    let early = EarlyData::new(Bytes::from_static(b"POST /pay"));
    let broken = pool.connect_sending(mesh.request_to(addr, target), &early);
    let error = within("the failure", broken).await.unwrap_err();
    assert!(
        matches!(&error, HboneError::ConnectStream { source, .. } if source.is_io()),
        "{error:?}"
    );
    assert!(early.may_have_arrived(), "the bytes may be at the peer");
    assert_eq!(received.lock().unwrap().as_slice(), b"POST /pay");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "no retry on another connection"
    );

    // Without early data, the same failure is retried once elsewhere.
    let plain = pool.connect(mesh.request_to(addr, target));
    within("the failure", plain).await.unwrap_err();
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}
