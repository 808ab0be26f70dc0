//! The test scaffolding of `hbone.rs`: a CA and workloads, a test HBONE
//! server with a scripted handler, dialers, and small loopback servers.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use weft_certs::{CertificateRequest, Identity, MeshCa, WorkloadCertificate};
use weft_proxy::hbone::{
    Dialer, HboneError, HbonePool, HboneRequest, InboundHandler, InboundRequest, PoolConfig,
    Refusal, ServerSettings, TunnelStats, Windows, accept_tls, direct_dialer, serve_connection,
};

pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
pub const PAYMENTS: &str = "spiffe://cluster.local/ns/bank/sa/payments";

/// Ports the test handler refuses, standing for policy and a missing pod.
pub const DENIED_PORT: u16 = 1;
pub const UNAVAILABLE_PORT: u16 = 2;

/// A CA and the two workloads: `frontend` calls, `checkout` serves.
pub struct Mesh {
    pub ca: MeshCa,
    pub frontend: WorkloadCertificate,
    pub checkout: WorkloadCertificate,
}

impl Mesh {
    pub fn new() -> Mesh {
        let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
        Mesh {
            frontend: workload_at(&ca, FRONTEND, SystemTime::now()),
            checkout: workload_at(&ca, CHECKOUT, SystemTime::now()),
            ca,
        }
    }

    /// An HBONE server on 127.0.0.1 presenting checkout's certificate.
    pub async fn server(&self) -> TestServer {
        self.server_with(Windows::default()).await
    }

    /// [`Mesh::server`] granting receive windows from `windows`.
    pub async fn server_with(&self, windows: Windows) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config =
            weft_certs::hbone_server_config(&self.checkout, weft_certs::KeyExchange::default())
                .unwrap();
        let (drain, drain_rx) = watch::channel(false);
        let server = TestServer {
            addr: listener.local_addr().unwrap(),
            drain,
            handler: Arc::new(TestHandler::default()),
            counts: Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
        };
        let (handler, counts) = (server.handler.clone(), server.counts.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let local = tcp.local_addr().unwrap();
                let (config, handler, drain) = (config.clone(), handler.clone(), drain_rx.clone());
                let settings = ServerSettings {
                    windows: windows.clone(),
                    ..ServerSettings::default()
                };
                let counts = counts.clone();
                tokio::spawn(async move {
                    let Ok(tls) = accept_tls(tcp, config).await else {
                        return;
                    };
                    counts.0.fetch_add(1, Ordering::SeqCst);
                    let _ = serve_connection(tls, local, handler, drain, &settings).await;
                    counts.1.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        server
    }

    /// A tunnel from frontend to `target` through `server`.
    pub fn request(&self, server: &TestServer, target: SocketAddr) -> HboneRequest {
        self.request_to(server.addr, target)
    }

    /// A tunnel from frontend to `target` through whatever is at `hbone_addr`.
    pub fn request_to(&self, hbone_addr: SocketAddr, target: SocketAddr) -> HboneRequest {
        HboneRequest {
            certificate: self.frontend.clone(),
            destination_identity: id(CHECKOUT),
            hbone_addr,
            target,
            source_ip: None,
            forwarded_for: None,
            service_host: None,
            headers: http::HeaderMap::new(),
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub drain: watch::Sender<bool>,
    pub handler: Arc<TestHandler>,
    /// HBONE connections past TLS, and those whose serving has ended.
    pub counts: Arc<(AtomicUsize, AtomicUsize)>,
}

impl TestServer {
    pub fn accepted(&self) -> usize {
        self.counts.0.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.counts.1.load(Ordering::SeqCst)
    }
}

/// Connects tunnels to their target on loopback, except the refused ports;
/// remembers what it was asked and what each tunnel carried.
#[derive(Default)]
pub struct TestHandler {
    pub requests: Mutex<Vec<InboundRequest>>,
    pub stats: Mutex<Vec<TunnelStats>>,
}

impl TestHandler {
    pub fn requests(&self) -> Vec<InboundRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub async fn wait_for_stats(&self, count: usize) -> Vec<TunnelStats> {
        eventually("tunnel stats", || self.stats.lock().unwrap().len() >= count).await;
        self.stats.lock().unwrap().clone()
    }
}

impl InboundHandler for TestHandler {
    type Upstream = TcpStream;

    async fn connect(&self, request: &InboundRequest) -> Result<TcpStream, Refusal> {
        self.requests.lock().unwrap().push(request.clone());
        match request.target.port() {
            DENIED_PORT => Err(Refusal::unauthorized("policy says no")),
            UNAVAILABLE_PORT => Err(Refusal::service_unavailable("no such pod")),
            _ => TcpStream::connect(request.target)
                .await
                .map_err(|e| Refusal::service_unavailable(e.to_string())),
        }
    }

    fn tunnel_closed(&self, _: &InboundRequest, stats: TunnelStats, _: Option<&std::io::Error>) {
        self.stats.lock().unwrap().push(stats);
    }
}

pub fn pool(config: PoolConfig) -> HbonePool {
    HbonePool::new(direct_dialer(), config)
}

/// A plain dialer that counts its dials and takes `delay` for each.
pub fn counting_dialer(delay: Duration) -> (Dialer, Arc<AtomicUsize>) {
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    let plain = direct_dialer();
    let dialer: Dialer = Arc::new(move |source_ip, address| {
        counted.fetch_add(1, Ordering::SeqCst);
        let dial = plain(source_ip, address);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            dial.await
        })
    });
    (dialer, dials)
}

pub fn id(uri: &str) -> Identity {
    uri.parse().unwrap()
}

/// A workload certificate obtained the way a node proxy obtains one,
/// signed as if the clock showed `at`.
pub fn workload_at(ca: &MeshCa, identity: &str, at: SystemTime) -> WorkloadCertificate {
    let identity = id(identity);
    let request = CertificateRequest::generate(&identity).unwrap();
    let chain = ca.sign_csr(request.csr_der(), &identity, at).unwrap();
    request
        .complete(chain, ca.trust_bundle().clone(), at)
        .unwrap()
}

/// Echoes everything, then half-closes when the client does.
pub async fn echo_server() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let (mut read, mut write) = tcp.split();
        if tokio::io::copy(&mut read, &mut write).await.is_ok() {
            let _ = write.shutdown().await;
        }
    })
    .await
}

/// Reads until the client's EOF, then says how much it got.
pub async fn answers_after_eof() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let mut request = Vec::new();
        tcp.read_to_end(&mut request).await.unwrap();
        let answer = format!("received {} bytes", request.len());
        tcp.write_all(answer.as_bytes()).await.unwrap();
        tcp.shutdown().await.unwrap();
    })
    .await
}

/// Sends a banner and half-closes at once, then reports what it reads.
pub async fn banner_then_listens() -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
    let (report, received) = oneshot::channel();
    let report = Arc::new(Mutex::new(Some(report)));
    let addr = serve_each(move |mut tcp| {
        let report = report.lock().unwrap().take();
        async move {
            tcp.write_all(b"banner").await.unwrap();
            tcp.shutdown().await.unwrap();
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.unwrap();
            if let Some(report) = report {
                let _ = report.send(got);
            }
        }
    })
    .await;
    (addr, received)
}

pub async fn serve_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// Writes `message` and reads back as many bytes.
pub async fn round_trip<S>(tunnel: &mut S, message: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tunnel.write_all(message).await.unwrap();
    let mut back = vec![0; message.len()];
    within("the echo", tunnel.read_exact(&mut back))
        .await
        .unwrap();
    back
}

pub fn assert_refused(error: &HboneError, expected: StatusCode) {
    match error {
        HboneError::Refused { status, .. } => assert_eq!(*status, expected),
        other => panic!("expected a refusal with {expected}, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(expected.as_str()), "{message}");
}

/// Incompressible, reproducible bytes (xorshift).
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

const DEADLINE: Duration = Duration::from_secs(30);

/// Waits for `future`, failing the test with `what` after [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `condition` until it holds, within [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
