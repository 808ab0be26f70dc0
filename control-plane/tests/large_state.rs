//! A full state larger than gRPC's default message limit (4 MiB), served by
//! the real config stream service: a proxy that accepts parts gets it in
//! small messages and puts it together; one that does not gets it whole.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use weft_api::parts::Assembler;
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;
use weft_certs::Identity;
use weft_control_plane::config_stream::ConfigStreamService;
use weft_control_plane::fanout::Published;
use weft_control_plane::mesh::{Mesh, MeshWorkload};
use weft_control_plane::node_auth::{NodeAuthenticator, NodeTokens};
use weft_control_plane::registry::NodeRegistry;

const TOKEN: &str = "node-1-token-0123456789";
const PODS: usize = 36_000;
const PART_BYTES: usize = 16 * 1024;

/// A mesh of `PODS` pods with long names (about 160 bytes each in their
/// remote form), the first three on node-1.
fn large_mesh() -> Mesh {
    let mut mesh = Mesh::default();
    for i in 0..PODS {
        let name = format!("{}-{i}", "checkout-service-replica".repeat(3));
        let uid = format!("shop/{name}");
        let workload = pb::Workload {
            uid: uid.clone(),
            namespace: "shop".into(),
            name,
            service_account: "checkout".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/checkout".into(),
            node: if i < 3 {
                "node-1".into()
            } else {
                format!("node-{}", 2 + i % 500)
            },
            ips: vec![format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)],
            meshed: true,
            workload_name: "checkout".into(),
            ..pb::Workload::default()
        };
        let identity = Identity::new("cluster.local", "shop", "checkout").unwrap();
        mesh.workloads.insert(
            uid,
            Arc::new(MeshWorkload {
                workload,
                identity,
                has_ip: true,
            }),
        );
    }
    mesh
}

/// Serves `mesh` on a loopback port; returns its address.
async fn serve(mesh: Mesh) -> String {
    let (_, rx) = watch::channel(Arc::new(Published::first(mesh)));
    let tokens = NodeTokens::parse(&format!("node-1 {TOKEN}")).unwrap();
    let registry = NodeRegistry::new(&mut prometheus_client::registry::Registry::default());
    let service = ConfigStreamService::new(
        rx,
        Arc::new(NodeAuthenticator::Tokens(tokens)),
        registry,
        128 * 1024 * 1024,
    )
    .with_part_bytes(PART_BYTES);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                weft_api::encoded::node_config_server::NodeConfigServer::new(service)
                    .max_encoding_message_size(128 * 1024 * 1024),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

/// Opens node-1's stream, saying whether it `accepts_parts`, with gRPC's
/// default limit on the size of a message it reads (4 MiB), or `limit`.
async fn open(
    address: &str,
    accepts_parts: bool,
    limit: Option<usize>,
) -> (
    mpsc::Sender<pb::ProxyMessage>,
    tonic::Streaming<pb::ConfigUpdate>,
) {
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        node: "node-1".into(),
        proxy_version: "test".into(),
        accepts_parts,
    };
    tx.send(pb::ProxyMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut client = pb::node_config_client::NodeConfigClient::connect(address.to_owned())
        .await
        .unwrap();
    if let Some(limit) = limit {
        client = client.max_decoding_message_size(limit);
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let updates = client.stream(request).await.unwrap().into_inner();
    (tx, updates)
}

#[tokio::test]
async fn a_full_state_over_4_mib_reaches_a_proxy_that_accepts_parts_in_small_messages() {
    let address = serve(large_mesh()).await;
    let (_tx, mut updates) = open(&address, true, None).await;
    let mut assembler = Assembler::default();
    let (mut messages, mut largest, mut total) = (0, 0, 0);
    let full = loop {
        let part = updates.message().await.unwrap().unwrap();
        let bytes = part.encoded_len();
        (messages, largest, total) = (messages + 1, largest.max(bytes), total + bytes);
        if let Some(full) = assembler.push(part, bytes, usize::MAX).unwrap() {
            break full;
        }
    };
    assert!(total > 4 * 1024 * 1024, "the full state is {total} bytes");
    assert!(largest <= PART_BYTES, "a part of {largest} bytes");
    assert!(messages > total / PART_BYTES, "{messages} messages");
    assert!(full.full_state);
    assert_eq!(full.version, 1);
    assert_eq!(full.local_workloads.len(), 3);
    assert_eq!(full.remote_workloads.len(), PODS - 3);
    assert!(full.trust.is_some() && full.uninstalling == Some(false));
    let mut uids: Vec<_> = full.remote_workloads.iter().map(|w| &w.uid).collect();
    uids.dedup();
    assert_eq!(uids.len(), PODS - 3, "every pod once");
}

#[tokio::test]
async fn a_proxy_that_does_not_accept_parts_gets_the_full_state_whole() {
    let address = serve(large_mesh()).await;
    // With gRPC's default limit, it cannot read it (that is why parts exist).
    let (_tx, mut updates) = open(&address, false, None).await;
    let status = updates.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");

    // With its limit raised, as weft's proxies before parts had it.
    let (_tx, mut updates) = open(&address, false, Some(64 * 1024 * 1024)).await;
    let full = updates.message().await.unwrap().unwrap();
    assert!(full.full_state && !full.more_follows);
    assert!(full.encoded_len() > 4 * 1024 * 1024);
    assert_eq!(full.remote_workloads.len(), PODS - 3);
}
