//! A small but real control plane for the proxy's integration tests: a tonic
//! server on 127.0.0.1 speaking TLS with a certificate from a `MeshCa`,
//! serving `NodeConfig` (each stream handed to the test to script) and
//! `Certificates` (signing with `MeshCa::sign_csr`, recording every call).
//! Plus a proxy started the way the binary starts it, against that server.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::v1::certificates_server::{Certificates, CertificatesServer};
use weft_api::v1::node_config_server::{NodeConfig, NodeConfigServer};
use weft_api::v1::{self, ConfigUpdate, Hello, ProxyMessage, SignRequest, SignResponse};
use weft_certs::{CertificateRequest, Identity, MeshCa, SigningPolicy};
use weft_proxy::{DEFAULT_CONTROL_PLANE_IDENTITY, LogFormat, NodeProxy, ProxyConfig};

/// How long any awaited condition may take before the test fails. Generous:
/// nothing here is a timing assertion, only a bound on waiting.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const NODE: &str = "node-1";
pub const TOKEN: &str = "node-1-bootstrap-token";

/// Waits for `future`, failing the test with `what` after [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Waits until the watched value satisfies `condition`.
pub async fn wait_for<T>(what: &str, rx: &watch::Receiver<T>, condition: impl FnMut(&T) -> bool) {
    let mut rx = rx.clone();
    within(what, rx.wait_for(condition))
        .await
        .expect("the watch sender is gone");
}

/// Polls `condition` until it holds, for state no watch channel announces
/// (e.g. what the test control plane has recorded).
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` filters).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "weft_proxy=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A signing request the control plane received.
#[derive(Clone, Debug)]
pub struct SignCall {
    pub identity: String,
    pub token: Option<String>,
}

/// One config stream a proxy opened, for the test to script.
pub struct ProxyStream {
    pub hello: Hello,
    pub token: Option<String>,
    updates: mpsc::Sender<Result<ConfigUpdate, Status>>,
    replies: mpsc::Receiver<ProxyMessage>,
    reports: mpsc::Receiver<v1::TrafficReport>,
}

impl ProxyStream {
    /// Sends an update down the stream.
    pub async fn send(&self, update: ConfigUpdate) {
        self.updates.send(Ok(update)).await.unwrap();
    }

    /// The proxy's next Ack or Nack.
    pub async fn reply(&mut self) -> v1::proxy_message::Kind {
        let message = within("the proxy's reply", self.replies.recv())
            .await
            .expect("the proxy closed the stream instead of replying");
        message.kind.expect("a reply without a kind")
    }

    /// The proxy's next traffic report (reports are not replies).
    pub async fn report(&mut self) -> v1::TrafficReport {
        within("the proxy's traffic report", self.reports.recv())
            .await
            .expect("the proxy closed the stream before reporting")
    }

    /// Ends the stream the way a control plane going away does.
    pub fn drop_stream(self) {}
}

#[derive(Clone)]
struct Service {
    ca: Arc<MeshCa>,
    streams: mpsc::Sender<ProxyStream>,
    sign_calls: Arc<Mutex<Vec<SignCall>>>,
    denied: Arc<Mutex<HashSet<String>>>,
}

fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(weft_api::AUTHORIZATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

type UpdateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl NodeConfig for Service {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let token = bearer(request.metadata());
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ProxyMessage {
                kind: Some(v1::proxy_message::Kind::Hello(hello)),
            }) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "expected Hello, got {other:?}"
                )));
            }
        };
        let (updates, outbound) = mpsc::channel(16);
        let (replies_tx, replies) = mpsc::channel(16);
        // Reports are kept apart (and the newest few only): a test that
        // scripts Acks and Nacks does not see them.
        let (reports_tx, reports) = mpsc::channel(16);
        let (inbound_ended, inbound_closed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(v1::proxy_message::Kind::Traffic(report)) = message.kind {
                    let _ = reports_tx.try_send(report);
                    continue;
                }
                if replies_tx.send(message).await.is_err() {
                    break;
                }
            }
            drop(inbound_ended);
        });
        let stream = ProxyStream {
            hello,
            token,
            updates,
            replies,
            reports,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("test is over"))?;
        // Like the real control plane: when the proxy closes its side, the
        // stream is over.
        let updates = futures::StreamExt::take_until(ReceiverStream::new(outbound), inbound_closed);
        Ok(Response::new(Box::pin(updates)))
    }
}

#[tonic::async_trait]
impl Certificates for Service {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = bearer(request.metadata());
        let request = request.into_inner();
        self.sign_calls.lock().unwrap().push(SignCall {
            identity: request.identity.clone(),
            token,
        });
        if self.denied.lock().unwrap().contains(&request.identity) {
            return Err(Status::permission_denied(format!(
                "no running pod with identity {} on node {NODE}",
                request.identity
            )));
        }
        let identity = Identity::parse(&request.identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let chain = self
            .ca
            .sign_csr(&request.csr_der, &identity, SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(SignResponse {
            chain_der: chain.into_iter().map(|c| c.to_vec()).collect(),
            trust: Some(v1::TrustBundle {
                trust_domain: self.ca.trust_domain().to_owned(),
                roots_pem: self.ca.trust_bundle().to_pem(),
            }),
        }))
    }
}

/// The test control plane.
pub struct TestControlPlane {
    pub addr: SocketAddr,
    pub ca: Arc<MeshCa>,
    streams: mpsc::Receiver<ProxyStream>,
    sign_calls: Arc<Mutex<Vec<SignCall>>>,
    denied: Arc<Mutex<HashSet<String>>>,
    /// TLS connections accepted.
    connections: Arc<std::sync::atomic::AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
}

impl TestControlPlane {
    /// A control plane with a fresh CA, proving the default control-plane
    /// identity.
    pub async fn start() -> TestControlPlane {
        let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
        TestControlPlane::start_with(ca, DEFAULT_CONTROL_PLANE_IDENTITY).await
    }

    /// A control plane with `ca`, whose serving certificate is for
    /// `serving_identity`.
    pub async fn start_with(ca: MeshCa, serving_identity: &str) -> TestControlPlane {
        let ca = Arc::new(ca);
        let identity = Identity::parse(serving_identity).unwrap();
        let request = CertificateRequest::generate(&identity).unwrap();
        let now = SystemTime::now();
        let chain = ca.sign_csr(request.csr_der(), &identity, now).unwrap();
        let serving = request
            .complete(chain, ca.trust_bundle().clone(), now)
            .unwrap();
        let resolver =
            rustls::sign::SingleCertAndKey::from(weft_certs::certified_key(&serving).unwrap());
        let tls = weft_certs::control_plane_server_config(
            Arc::new(resolver),
            weft_certs::KeyExchange::default(),
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(tls);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (incoming_tx, incoming) = mpsc::channel(16);
        let mut tasks = tokio::task::JoinSet::new();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tasks.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, incoming_tx) = (acceptor.clone(), incoming_tx.clone());
                let counted = counted.clone();
                tokio::spawn(async move {
                    // A client that refuses our certificate ends here.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = incoming_tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                });
            }
        });

        let (streams_tx, streams) = mpsc::channel(16);
        let sign_calls = Arc::new(Mutex::new(Vec::new()));
        let denied = Arc::new(Mutex::new(HashSet::new()));
        let service = Service {
            ca: ca.clone(),
            streams: streams_tx,
            sign_calls: sign_calls.clone(),
            denied: denied.clone(),
        };
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(
                    NodeConfigServer::new(service.clone()).max_encoding_message_size(usize::MAX),
                )
                .add_service(CertificatesServer::new(service))
                .serve_with_incoming(ReceiverStream::new(incoming))
                .await
                .unwrap();
        });
        TestControlPlane {
            addr,
            ca,
            streams,
            sign_calls,
            denied,
            connections,
            tasks,
        }
    }

    /// How many TLS connections it accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A control plane whose CA signs with `policy` (e.g. short lifetimes).
    pub async fn start_with_policy(policy: SigningPolicy) -> TestControlPlane {
        let ca = MeshCa::generate_root("cluster.local", SystemTime::now())
            .unwrap()
            .with_policy(policy);
        TestControlPlane::start_with(ca, DEFAULT_CONTROL_PLANE_IDENTITY).await
    }

    /// The next config stream a proxy opens.
    pub async fn next_stream(&mut self) -> ProxyStream {
        within("the proxy to open a config stream", self.streams.recv())
            .await
            .unwrap()
    }

    /// Whether a proxy has opened a stream that the test has not taken.
    pub fn has_pending_stream(&mut self) -> bool {
        !self.streams.is_empty()
    }

    /// Refuses to sign for `identity` (PERMISSION_DENIED).
    pub fn deny(&self, identity: &str) {
        self.denied.lock().unwrap().insert(identity.to_owned());
    }

    /// Every signing request so far.
    pub fn sign_calls(&self) -> Vec<SignCall> {
        self.sign_calls.lock().unwrap().clone()
    }

    /// How many signing requests asked for `identity`.
    pub fn sign_calls_for(&self, identity: &str) -> usize {
        self.sign_calls()
            .iter()
            .filter(|call| call.identity == identity)
            .count()
    }

    /// The mesh roots as a full state carries them.
    pub fn trust(&self) -> v1::TrustBundle {
        v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: self.ca.trust_bundle().to_pem(),
        }
    }
}

/// A proxy's files (token, roots) in a temporary directory.
pub struct ProxyFiles {
    pub dir: tempfile::TempDir,
    pub token_file: PathBuf,
    pub root_cert: PathBuf,
}

impl ProxyFiles {
    /// Where the proxy's admin socket is.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn new(control_plane: &TestControlPlane) -> ProxyFiles {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        let root_cert = dir.path().join("roots.pem");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        std::fs::write(&root_cert, control_plane.ca.trust_bundle().to_pem()).unwrap();
        ProxyFiles {
            dir,
            token_file,
            root_cert,
        }
    }

    /// Replaces the token, as a rotation does.
    pub fn rotate_token(&self, token: &str) {
        let next = self.dir.path().join("token.next");
        std::fs::write(&next, token).unwrap();
        std::fs::rename(next, &self.token_file).unwrap();
    }

    /// The config the binary would parse, pointing at `control_plane`, with
    /// the admin endpoint on a free loopback port.
    pub fn config(&self, control_plane: &TestControlPlane) -> ProxyConfig {
        ProxyConfig {
            node: NODE.into(),
            control_plane: control_plane.addr.to_string(),
            token_file: self.token_file.clone(),
            root_cert: self.root_cert.clone(),
            control_plane_identity: DEFAULT_CONTROL_PLANE_IDENTITY.parse().unwrap(),
            cluster_name: "Kubernetes".into(),
            key_exchange: weft_certs::KeyExchange::default(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            admin_socket: Some(self.admin_socket()),
            // The control side alone: no listeners, no nftables.
            data_plane: false,
            capture: false,
            cni_socket: None,
            cni_bin_dir: None,
            cni_conf_dir: None,
            cni_plugin: None,
            cni_node_socket: "/var/run/weft/cni.sock".into(),
            cni_node_state_dir: "/var/lib/weft/proxy".into(),
            cni_exclude_namespaces: vec!["kube-system".into()],
            cni_recheck_seconds: 30,
            find_running_pods: false,
            netns_dir: "/run/netns".into(),
            pod_retry_ms: 1000,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            readiness_addr: "127.0.0.1:0".parse().unwrap(),
            drain_seconds: 1,
            handover_timeout_ms: 10_000,
            stop_drain_seconds: 1,
            pod_uid: String::new(),
            pending_connection_wait_ms: 5000,
            state_dir: None,
            state_write_interval_ms: 200,
            worker_threads: 1,
            event_interval: 2,
            // Read by the binary only: in process there is no bulk lane.
            bulk_lane_percent: 20,
            bulk_lane_window_ms: 50,
            limits: weft_proxy::limits::ConnectionLimits::default(),
            http_limits: weft_proxy::limits::HttpLimits::default(),
            memory_limits: weft_proxy::limits::MemoryLimits::default(),
            log_warnings_per_cause: 10,
            log_warnings_interval_ms: 10_000,
            log_buffer_lines: 16_384,
            log_format: LogFormat::Text,
            log_level: "debug".into(),
            max_config_message_bytes: weft_proxy::DEFAULT_MAX_CONFIG_MESSAGE_BYTES,
            traffic_report_interval_seconds: 1,
            certificate_report_settle_ms: 100,
            traffic_report_max_edges: 2_000,
        }
    }
}

/// A proxy started against `control_plane`, with its files.
pub async fn start_proxy(control_plane: &TestControlPlane) -> (NodeProxy, ProxyFiles) {
    init_logging();
    let files = ProxyFiles::new(control_plane);
    let proxy = NodeProxy::start(files.config(control_plane)).await.unwrap();
    (proxy, files)
}

/// A pod of this node (or of `node`, for a remote one).
pub fn workload(
    namespace: &str,
    pod: &str,
    sa: &str,
    node: &str,
    ip: &str,
    meshed: bool,
) -> v1::Workload {
    v1::Workload {
        uid: format!("{namespace}/{pod}"),
        namespace: namespace.into(),
        name: pod.into(),
        service_account: sa.into(),
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}"),
        node: node.into(),
        ips: vec![ip.into()],
        meshed,
        labels: [("app".to_owned(), pod.to_owned())].into(),
        workload_name: pod.into(),
        ..v1::Workload::default()
    }
}

/// A full state with the given local and remote workloads.
pub fn full_state(
    control_plane: &TestControlPlane,
    version: u64,
    local: Vec<v1::Workload>,
    remote: Vec<v1::Workload>,
) -> ConfigUpdate {
    ConfigUpdate {
        version,
        full_state: true,
        local_workloads: local,
        remote_workloads: remote,
        trust: Some(control_plane.trust()),
        ..Default::default()
    }
}

/// A delta on top of `version - 1`.
pub fn delta(version: u64) -> ConfigUpdate {
    ConfigUpdate {
        version,
        full_state: false,
        ..Default::default()
    }
}

/// `GET path` on the admin endpoint: the status code and the body.
pub async fn admin_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    admin_exchange(tcp, method, path).await
}

/// `POST path` on the proxy's admin socket: the status and body.
pub async fn admin_post(socket: &std::path::Path, path: &str) -> (u16, String) {
    let unix = tokio::net::UnixStream::connect(socket).await.unwrap();
    admin_exchange(unix, "POST", path).await
}

async fn admin_exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    method: &str,
    path: &str,
) -> (u16, String) {
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("the admin response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// `GET path` as JSON.
pub async fn admin_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = admin_get(addr, "GET", path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}
