//! Early data: the client's first bytes sent right behind the `CONNECT`,
//! before the answer. They must arrive first and in order when the tunnel
//! opens, and come to nothing when it is refused, without eating the
//! connection's flow-control window. (That refused early data never reaches
//! the pod, with the real policy check, is in `tests/tests/policy.rs`.)
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::dataplane::outbound::EARLY_DATA_LIMIT;
use weft_proxy::hbone::{CONNECTION_WINDOW, PoolConfig, TunnelStats};

mod hbone_support;
use hbone_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_arrives_first_and_in_order() {
    let mesh = Mesh::new();
    let server = mesh.server().await;
    let upstream = echo_server().await;
    let pool = pool(PoolConfig::default());

    let early = Bytes::from_static(b"GET / HTTP/1.1\r\n");
    let connect = pool.connect_sending(mesh.request(&server, upstream), early);
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
    // holds: if the server kept any of it unreleased, the connection would
    // stall before the end.
    let early = Bytes::from(vec![b'x'; EARLY_DATA_LIMIT]);
    let streams = CONNECTION_WINDOW as usize / EARLY_DATA_LIMIT + 64;
    for _ in 0..streams {
        let refused = pool.connect_sending(mesh.request(&server, denied), early.clone());
        let error = within("a refusal", refused).await.unwrap_err();
        assert_refused(&error, StatusCode::UNAUTHORIZED);
    }

    // The same connection still carries a tunnel, early data and all.
    let echo = echo_server().await;
    let connect = pool.connect_sending(mesh.request(&server, echo), Bytes::from_static(b"first "));
    let mut tunnel = within("the tunnel", connect).await.unwrap();
    tunnel.write_all(b"then").await.unwrap();
    let mut echoed = [0u8; 10];
    within("the echo", tunnel.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"first then");
    assert_eq!(server.accepted(), 1, "one connection throughout");
}
