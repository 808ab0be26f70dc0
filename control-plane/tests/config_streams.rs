//! The config stream service over real TLS on loopback: a node's full
//! state and deltas, who may open which stream and how many, a replica that
//! stops, a connection that never authenticates.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Code;
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;
use weft_certs::CertificateRequest;

use support::*;

#[tokio::test]
async fn a_node_gets_its_full_state_then_only_what_changed() {
    let cp = start_control_plane().await;
    let (tx, mut updates) = open_stream(&cp, "node-1", TOKEN_1).await.unwrap();

    let full = next_update(&mut updates).await;
    assert!(full.full_state);
    assert_eq!(full.version, 1);
    let local: Vec<_> = full
        .local_workloads
        .iter()
        .map(|w| w.uid.as_str())
        .collect();
    assert_eq!(local, ["shop/batch-1", "shop/web-1"]);
    let remote: Vec<_> = full
        .remote_workloads
        .iter()
        .map(|w| w.uid.as_str())
        .collect();
    assert_eq!(remote, ["shop/db-1"]);
    assert_eq!(full.trust.as_ref().unwrap().roots_pem, cp.trust.to_pem());
    tx.send(message(Kind::Ack(pb::Ack { version: 1 })))
        .await
        .unwrap();

    // Move web-1 to a new IP: node-1 receives exactly that pod, as version 2.
    std::fs::write(cp.manifests.join("cluster.yaml"), manifests("10.244.1.9")).unwrap();
    let delta = next_update(&mut updates).await;
    assert!(!delta.full_state);
    assert_eq!(delta.version, 2);
    assert_eq!(delta.local_workloads.len(), 1);
    assert_eq!(delta.local_workloads[0].ips, vec!["10.244.1.9"]);
    assert!(
        delta.remote_workloads.is_empty() && delta.services.is_empty() && delta.trust.is_none()
    );
    tx.send(message(Kind::Nack(pb::Nack {
        version: 2,
        reason: "test refuses".into(),
        applied: false,
    })))
    .await
    .unwrap();

    // The control plane records what the proxy said.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = cp.debug_page("/debug/nodes").await;
        if page.contains("\"acked_version\": 1") && page.contains("test refuses") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_proxy_cannot_claim_another_nodes_stream() {
    let cp = start_control_plane().await;
    let status = open_stream(&cp, "node-2", TOKEN_1).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = open_stream(&cp, "node-1", "not-a-token-of-any-node")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_node_holds_a_bounded_number_of_config_streams() {
    let cp = start_control_plane_with(&["--max-config-streams-per-node", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, mut updates) = open_stream(&cp, "node-1", TOKEN_1).await.unwrap();
        assert!(next_update(&mut updates).await.full_state);
        held.push((tx, updates));
    }
    // A third, with the same (perhaps stolen) token, is refused: each
    // stream holds the node's whole view.
    let status = open_stream(&cp, "node-1", TOKEN_1).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // One closes: there is room again.
    drop(held.pop());
    let reopened = async {
        loop {
            match open_stream(&cp, "node-1", TOKEN_1).await {
                Ok(stream) => return stream,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (_tx, mut updates) = tokio::time::timeout(WAIT, reopened).await.unwrap();
    assert!(next_update(&mut updates).await.full_state);
}

#[tokio::test]
async fn a_replica_told_to_stop_serves_on_then_ends_its_streams_and_stops() {
    // Long enough that the requests below come within it on a busy machine.
    let mut cp = start_control_plane_with(&["--shutdown-delay-seconds", "10"]).await;
    let (_tx, mut updates) = open_stream(&cp, "node-1", TOKEN_1).await.unwrap();
    assert!(next_update(&mut updates).await.full_state);
    assert!(cp.debug_page("/ready").await.starts_with("HTTP/1.1 200"));

    cp.terminate();
    // It says it is leaving, and still answers new connections: a stream,
    // and a signing request.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cp.debug_page("/ready").await.starts_with("HTTP/1.1 503") {
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_late_tx, mut late) = open_stream(&cp, "node-1", TOKEN_1).await.unwrap();
    assert!(next_update(&mut late).await.full_state);
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let request = CertificateRequest::generate(&web.parse().unwrap()).unwrap();
    sign(&cp, TOKEN_1, web, request.csr_der().to_vec())
        .await
        .unwrap();

    // Then its streams end (the proxies reconnect elsewhere), cleanly,
    // and it stops.
    for stream in [&mut updates, &mut late] {
        let end = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap();
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
    let stopped = tokio::time::timeout(Duration::from_secs(60), cp.stopped())
        .await
        .unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_authenticates_is_closed_even_if_it_stops_reading() {
    let cp = start_control_plane_with(&["--grpc-authenticate-within-ms", "500"]).await;
    let tls = cp.tls();
    let tcp = TcpStream::connect(cp.grpc).await.unwrap();
    let mut stream = tls.connect(cp.grpc.ip().into(), tcp).await.unwrap();
    // HTTP/2's preface and SETTINGS, then PINGs, and never a read: the
    // server's answers fill the socket buffers until it cannot write, so
    // it stops reading too.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.unwrap();
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let pings = ping.repeat(1024);
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(error) = stream.write_all(&pings).await {
                return error;
            }
        }
    })
    .await
    .expect("the connection was never closed");
    assert!(
        matches!(
            closed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{closed}"
    );
    let metrics = cp.debug_page("/metrics").await;
    assert!(
        metrics.contains(r#"reason="no_authenticated_call"} 1"#),
        "{metrics}"
    );
}
