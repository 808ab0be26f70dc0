//! What the gRPC tests share: a control plane on loopback ports with
//! manifests of two nodes, and the calls a proxy makes.
#![allow(dead_code)] // each test file uses some of it

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;
use weft_certs::{Identity, TrustBundle};
use weft_control_plane::config::ControlPlaneConfig;

pub const TOKEN_1: &str = "node-1-token-0123456789";
pub const TOKEN_2: &str = "node-2-token-0123456789";
pub const WAIT: Duration = Duration::from_secs(20);

pub fn manifests(web_ip: &str) -> String {
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
pub struct ControlPlane {
    pub grpc: SocketAddr,
    pub monitoring: SocketAddr,
    pub manifests: PathBuf,
    pub trust: TrustBundle,
    /// Sends SIGTERM, as it were (dropped: the same).
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The running control plane.
    pub task: tokio::task::JoinHandle<Result<(), weft_control_plane::Error>>,
    pub _dir: tempfile::TempDir,
}

pub async fn start_control_plane() -> ControlPlane {
    start_control_plane_with(&[]).await
}

/// Starts a control plane with extra command-line flags.
pub async fn start_control_plane_with(extra: &[&str]) -> ControlPlane {
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

pub async fn wait_for_file(path: &Path) -> String {
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
    /// A TLS client that verifies the control plane's SPIFFE identity.
    pub fn tls(&self) -> tokio_rustls::TlsConnector {
        let expected: Identity = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane"
            .parse()
            .unwrap();
        tokio_rustls::TlsConnector::from(
            weft_certs::control_plane_client_config(
                &self.trust,
                &expected,
                weft_certs::KeyExchange::default(),
            )
            .unwrap(),
        )
    }

    /// A gRPC channel that verifies the control plane's SPIFFE identity.
    pub async fn channel(&self) -> Channel {
        let tls = self.tls();
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
    pub fn terminate(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits until the control plane has stopped; how it ended.
    pub async fn stopped(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn debug_page(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.monitoring).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
}

pub fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

pub fn message(kind: Kind) -> pb::ProxyMessage {
    pb::ProxyMessage { kind: Some(kind) }
}

/// Opens a config stream as `node` with `token`; returns the sender of the
/// proxy's messages and the stream of updates.
pub async fn open_stream(
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

pub async fn next_update(updates: &mut tonic::Streaming<pb::ConfigUpdate>) -> pb::ConfigUpdate {
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

/// Asks the CA for `identity`'s certificate as the node of `token`.
pub async fn sign(
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
