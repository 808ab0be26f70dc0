//! The control plane's gRPC services, spoken to over real TLS on loopback:
//! config streaming per node and the certificate authority's node check.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Parser;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;
use weft_certs::{CertificateRequest, Identity, TrustBundle};
use weft_control_plane::config::ControlPlaneConfig;

const TOKEN_1: &str = "node-1-token-0123456789";
const TOKEN_2: &str = "node-2-token-0123456789";
const WAIT: Duration = Duration::from_secs(20);

fn manifests(web_ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{weft.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node-1, serviceAccountName: web, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {web_ip}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: db-1, namespace: shop}}
spec: {{nodeName: node-2, serviceAccountName: db, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 10.244.2.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: batch-1, namespace: shop, labels: {{weft.dev/mesh: disabled}}}}
spec: {{nodeName: node-1, serviceAccountName: batch, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 10.244.1.3}}
"#
    )
}

/// A control plane running in this test's runtime on loopback ports.
struct ControlPlane {
    grpc: SocketAddr,
    monitoring: SocketAddr,
    manifests: PathBuf,
    trust: TrustBundle,
    /// Sends SIGTERM, as it were (dropped: the same).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The running control plane.
    task: tokio::task::JoinHandle<Result<(), weft_control_plane::Error>>,
    _dir: tempfile::TempDir,
}

async fn start_control_plane() -> ControlPlane {
    start_control_plane_with(&[]).await
}

/// Starts a control plane with extra command-line flags.
async fn start_control_plane_with(extra: &[&str]) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir(&manifests_dir).unwrap();
    std::fs::write(manifests_dir.join("cluster.yaml"), manifests("10.244.1.2")).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("node-1 {TOKEN_1}\nnode-2 {TOKEN_2}\n")).unwrap();
    let state = dir.path().join("state");
    let mut args = vec![
        "weft-control-plane",
        "--manifests",
        manifests_dir.to_str().unwrap(),
        "--node-tokens",
        tokens.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let config = ControlPlaneConfig::parse_from(args);
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let monitoring = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, monitoring_addr) =
        (grpc.local_addr().unwrap(), monitoring.local_addr().unwrap());
    let (shutdown, terminated) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(weft_control_plane::app::run_on(
        config,
        grpc,
        monitoring,
        async move {
            let _ = terminated.await;
        },
    ));
    let roots = wait_for_file(&state.join("root-cert.pem")).await;
    ControlPlane {
        grpc: grpc_addr,
        monitoring: monitoring_addr,
        manifests: manifests_dir,
        trust: TrustBundle::from_pem(&roots).unwrap(),
        shutdown: Some(shutdown),
        task,
        _dir: dir,
    }
}

async fn wait_for_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl ControlPlane {
    /// A gRPC channel that verifies the control plane's SPIFFE identity.
    async fn channel(&self) -> Channel {
        let expected: Identity = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane"
            .parse()
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(
            weft_certs::control_plane_client_config(
                &self.trust,
                &expected,
                weft_certs::KeyExchange::default(),
            )
            .unwrap(),
        );
        let addr = self.grpc;
        Endpoint::from_static("http://control-plane")
            .connect_with_connector(tower::service_fn(move |_| {
                let tls = tls.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let stream = tls.connect(addr.ip().into(), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .unwrap()
    }

    /// What SIGTERM does.
    fn terminate(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits until the control plane has stopped; how it ended.
    async fn stopped(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn debug_page(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.monitoring).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
}

fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn message(kind: Kind) -> pb::ProxyMessage {
    pb::ProxyMessage { kind: Some(kind) }
}

/// Opens a config stream as `node` with `token`; returns the sender of the
/// proxy's messages and the stream of updates.
async fn open_stream(
    cp: &ControlPlane,
    node: &str,
    token: &str,
) -> Result<
    (
        mpsc::Sender<pb::ProxyMessage>,
        tonic::Streaming<pb::ConfigUpdate>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(message(Kind::Hello(pb::Hello {
        node: node.into(),
        proxy_version: "test".into(),
        accepts_parts: true,
    })))
    .await
    .unwrap();
    let mut client = pb::node_config_client::NodeConfigClient::new(cp.channel().await);
    let response = client
        .stream(authorized(ReceiverStream::new(rx), token))
        .await?;
    Ok((tx, response.into_inner()))
}

async fn next_update(updates: &mut tonic::Streaming<pb::ConfigUpdate>) -> pb::ConfigUpdate {
    let mut assembler = weft_api::parts::Assembler::default();
    loop {
        let part = tokio::time::timeout(WAIT, updates.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(update) = assembler.push(part, 0, usize::MAX).unwrap() {
            return update;
        }
    }
}

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

async fn sign(
    cp: &ControlPlane,
    token: &str,
    identity: &str,
    csr: Vec<u8>,
) -> Result<pb::SignResponse, tonic::Status> {
    let mut client = pb::certificates_client::CertificatesClient::new(cp.channel().await);
    client
        .sign(authorized(
            pb::SignRequest {
                identity: identity.into(),
                csr_der: csr,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn the_ca_signs_only_identities_running_on_the_callers_node() {
    // Refusals wait this long for a pod to show up.
    let cp = start_control_plane_with(&["--sign-wait-for-pod-ms", "100"]).await;
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let request = CertificateRequest::generate(&web.parse().unwrap()).unwrap();

    // node-1 runs web-1: signed, and the chain verifies against the roots.
    let response = sign(&cp, TOKEN_1, web, request.csr_der().to_vec())
        .await
        .unwrap();
    let trust = TrustBundle::from_pem(&response.trust.unwrap().roots_pem).unwrap();
    let chain = response.chain_der.into_iter().map(Into::into).collect();
    let cert = request.complete(chain, trust, SystemTime::now()).unwrap();
    assert_eq!(cert.identity().to_string(), web);

    // node-2 does not run web: refused, whatever the CSR.
    let again = CertificateRequest::generate(&web.parse().unwrap()).unwrap();
    let status = sign(&cp, TOKEN_2, web, again.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node node-2"),
        "{}",
        status.message()
    );

    // batch-1 runs on node-1 but is not meshed: refused.
    let batch = "spiffe://cluster.local/ns/shop/sa/batch";
    let batch_csr = CertificateRequest::generate(&batch.parse().unwrap()).unwrap();
    let status = sign(&cp, TOKEN_1, batch, batch_csr.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A CSR for db (on node-2) sent as a request for web from node-1: refused.
    let db_csr =
        CertificateRequest::generate(&"spiffe://cluster.local/ns/shop/sa/db".parse().unwrap())
            .unwrap();
    let status = sign(&cp, TOKEN_1, web, db_csr.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("SAN mismatch"),
        "{}",
        status.message()
    );

    // Garbage, a bad identity, and no token.
    let status = sign(&cp, TOKEN_1, web, vec![0x30, 0x03, 1, 2, 3])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sign(&cp, TOKEN_1, "spiffe://cluster.local/ns/shop", vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sign(&cp, "wrong-token-0123456789", web, vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let metrics = cp.debug_page("/metrics").await;
    assert!(
        metrics.contains("weft_control_plane_certificates_total{outcome=\"issued\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_control_plane_certificates_total{outcome=\"denied\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_for_a_pod_not_seen_yet_waits_for_it() {
    let cp = start_control_plane_with(&["--sign-wait-for-pod-ms", "600000"]).await;
    let api = "spiffe://cluster.local/ns/shop/sa/api";
    let request = CertificateRequest::generate(&api.parse().unwrap()).unwrap();
    let signed = sign(&cp, TOKEN_1, api, request.csr_der().to_vec());
    let pod_shows_up = async {
        // Once the request waits, the kubelet reports api-1's IP.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cp
            .debug_page("/metrics")
            .await
            .contains("weft_control_plane_certificate_requests_waiting 1")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let api_pod = "---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: api, containers: [{name: c, image: x}]}
status: {phase: Pending, podIP: 10.244.1.9}
";
        std::fs::write(
            cp.manifests.join("cluster.yaml"),
            manifests("10.244.1.2") + api_pod,
        )
        .unwrap();
    };
    let (signed, ()) = tokio::join!(signed, pod_shows_up);
    let chain = signed
        .unwrap()
        .chain_der
        .into_iter()
        .map(Into::into)
        .collect();
    let cert = request
        .complete(chain, cp.trust.clone(), SystemTime::now())
        .unwrap();
    assert_eq!(cert.identity().to_string(), api);
    let metrics = cp.debug_page("/metrics").await;
    assert!(
        metrics.contains("weft_control_plane_certificate_requests_waiting 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_operator_intermediate_signs_and_is_presented_in_chains() {
    // The operator's CA: a root kept offline and an intermediate for weft.
    let dir = tempfile::tempdir().unwrap();
    let ca_params = |name: &str| {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params
    };
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_params = ca_params("operator root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let intermediate = ca_params("weft intermediate")
        .signed_by(&key, &root_issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    std::fs::write(&cert_file, format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let cp = start_control_plane_with(&[
        "--ca-cert",
        cert_file.to_str().unwrap(),
        "--ca-key",
        key_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        cp.trust.roots(),
        [root.der().clone()],
        "proxies trust the operator root"
    );

    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let request = CertificateRequest::generate(&web.parse().unwrap()).unwrap();
    let response = sign(&cp, TOKEN_1, web, request.csr_der().to_vec())
        .await
        .unwrap();
    assert_eq!(response.chain_der.len(), 2, "leaf and intermediate");
    assert_eq!(response.chain_der[1], intermediate.der().to_vec());
    let chain = response.chain_der.into_iter().map(Into::into).collect();
    request
        .complete(chain, cp.trust.clone(), SystemTime::now())
        .unwrap();
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
    let expected: Identity = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane"
        .parse()
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(
        weft_certs::control_plane_client_config(
            &cp.trust,
            &expected,
            weft_certs::KeyExchange::default(),
        )
        .unwrap(),
    );
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
