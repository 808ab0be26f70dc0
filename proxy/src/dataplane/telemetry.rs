//! What the data plane reports about each connection: Prometheus metrics
//! under Istio's names and labels (so existing dashboards work), and one
//! access-log line when the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use weft_api::authorization::{Decision, Outcome};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::hbone::{Baggage, TraceParent};
use crate::node_view::Workload;
use crate::traffic_ledger::{EdgeKey, TrafficLedger};

/// Which way a connection crosses this proxy, as Istio's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured leaving a local pod; this proxy reports as the source.
    Outbound,
    /// Arriving for a local pod; this proxy reports as the destination.
    Inbound,
}

impl Direction {
    /// Istio's `reporter` label: which end this proxy serves.
    pub fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// How the bytes travelled, as Istio's `connection_security_policy` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Inside an HBONE tunnel: mutual TLS between verified identities.
    MutualTls,
    /// Between two pods of this node, never leaving it; identities come
    /// from the node's own config, not from a handshake.
    NodeLocal,
    /// Plaintext: an unmeshed peer, or plaintext arriving for a meshed pod.
    None,
}

impl Security {
    /// Istio's `connection_security_policy` label.
    pub fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::NodeLocal => "node_local",
            Security::None => "none",
        }
    }
}

/// The labels of Istio's TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: String,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    connection_security_policy: String,
}

/// Labels of failures that never became a proxied connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: String,
    reason: String,
}

/// Labels of an outlier ejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    /// The Service, `<namespace>/<name>`.
    service: String,
}

/// Labels of an authorization decision that a policy made.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthorizationLabels {
    /// `deny` or `audit`.
    decision: String,
    /// `<namespace>/<name>` of the policy.
    policy: String,
    destination_workload: String,
    destination_workload_namespace: String,
}

/// The data plane's metric families, and the ledger of who talked to
/// whom that the control plane's dashboard is made of.
#[derive(Debug)]
pub struct TrafficMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    authorization: Family<AuthorizationLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    ledger: Arc<TrafficLedger>,
}

impl TrafficMetrics {
    /// The families, registered in `registry`; connections are also
    /// counted in `ledger`.
    pub fn new(registry: &mut Registry, ledger: Arc<TrafficLedger>) -> Arc<TrafficMetrics> {
        let metrics = TrafficMetrics {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            failures: Family::default(),
            authorization: Family::default(),
            ejections: Family::default(),
            ledger,
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            metrics.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            metrics.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the client of a TCP connection",
            metrics.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client of a TCP connection",
            metrics.received_bytes.clone(),
        );
        registry.register(
            "weft_tcp_failures",
            "Connections refused or failed before any byte was proxied, by reason",
            metrics.failures.clone(),
        );
        registry.register(
            "weft_authorization_decisions",
            "Connections denied by an AuthorizationPolicy, or matched by an AUDIT one, by policy",
            metrics.authorization.clone(),
        );
        registry.register(
            "weft_outlier_ejections",
            "Endpoints a TrafficPolicy's outlier detection took out of load balancing, by Service",
            metrics.ejections.clone(),
        );
        Arc::new(metrics)
    }

    /// Counts what policy did to a connection between `edge`'s ends, to
    /// `destination`: the denial (naming the deciding policy) and every
    /// AUDIT match.
    pub fn authorization(&self, decision: &Decision, destination: &Workload, edge: &EdgeKey) {
        let count = |kind: &str, policy: String| {
            self.authorization
                .get_or_create(&AuthorizationLabels {
                    decision: kind.to_owned(),
                    policy,
                    destination_workload: destination.workload_name().to_string(),
                    destination_workload_namespace: destination.namespace().to_string(),
                })
                .inc();
        };
        if !decision.allowed() {
            self.ledger.denied(edge, &decision.policy());
        }
        // Plaintext refused by STRICT is an MtlsPolicy's doing, counted
        // as a failure (`plaintext_refused_strict`), not here.
        if !decision.allowed() && !matches!(decision.outcome, Outcome::PlaintextRefused(_)) {
            count("deny", decision.policy());
        }
        for audit in &decision.audits {
            self.ledger.audited(edge, &audit.policy);
            count("audit", audit.policy.clone());
        }
    }

    /// Counts an outlier ejection of an endpoint of `service`.
    pub fn ejection(&self, service: &str) {
        self.ejections
            .get_or_create(&EjectionLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a connection that failed before it was proxied, e.g.
    /// `handshake_unknown_issuer` or `connect_refused`.
    pub fn failure(&self, direction: Direction, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                direction: direction.reporter().to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Who is at one end of a connection, as far as the proxy knows.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The pod, if known.
    pub workload: Option<Arc<Workload>>,
    /// Its verified SPIFFE identity, if any.
    pub principal: Option<String>,
    /// What it said about itself in its baggage, as far as its identity
    /// vouches for it (inbound tunnels only): the access log's
    /// `src.cluster`, `src.service` and `src.revision`. Never a metric
    /// label: a peer's word must not mint label values.
    pub claimed: Option<Baggage>,
}

impl Peer {
    /// `<namespace>/<workload name>` of its pod, empty when unknown: how
    /// traffic reports name it.
    pub fn workload_key(&self) -> String {
        self.workload
            .as_ref()
            .map(|w| workload_key(w))
            .unwrap_or_default()
    }

    /// A known pod, with its identity as principal.
    pub fn workload(workload: &Arc<Workload>) -> Peer {
        Peer {
            principal: Some(workload.identity().to_string()),
            workload: Some(workload.clone()),
            claimed: None,
        }
    }
}

/// `<namespace>/<workload name>` of `workload`: how traffic reports name it.
pub fn workload_key(workload: &Workload) -> String {
    format!("{}/{}", workload.namespace(), workload.workload_name())
}

/// One proxied connection, from open to close.
pub struct ConnectionRecord {
    metrics: Arc<TrafficMetrics>,
    labels: TcpLabels,
    edge: EdgeKey,
    client: SocketAddr,
    target: SocketAddr,
    started: Instant,
    trace: Option<TraceParent>,
    source_claimed: Option<Baggage>,
}

impl ConnectionRecord {
    /// Counts the connection as opened.
    pub fn open(
        metrics: &Arc<TrafficMetrics>,
        direction: Direction,
        security: Security,
        (client, source): (SocketAddr, &Peer),
        (target, destination): (SocketAddr, &Peer),
        service: Option<&str>,
    ) -> ConnectionRecord {
        let name = |peer: &Peer| {
            peer.workload
                .as_ref()
                .map(|w| w.workload_name().to_string())
        };
        let namespace = |peer: &Peer| peer.workload.as_ref().map(|w| w.namespace().to_string());
        let unknown = || "unknown".to_owned();
        let labels = TcpLabels {
            reporter: direction.reporter().to_owned(),
            source_workload: name(source).unwrap_or_else(unknown),
            source_workload_namespace: namespace(source).unwrap_or_else(unknown),
            source_principal: source.principal.clone().unwrap_or_else(unknown),
            destination_workload: name(destination).unwrap_or_else(unknown),
            destination_workload_namespace: namespace(destination).unwrap_or_else(unknown),
            destination_principal: destination.principal.clone().unwrap_or_else(unknown),
            destination_service: service.map(str::to_owned).unwrap_or_else(unknown),
            connection_security_policy: security.label().to_owned(),
        };
        metrics.opened.get_or_create(&labels).inc();
        let edge = EdgeKey {
            reporter: direction.reporter(),
            source_workload: source.workload_key(),
            destination_workload: destination.workload_key(),
            source_principal: source.principal.clone().unwrap_or_default(),
            destination_service: service.map(str::to_owned).unwrap_or_default(),
            security: security.label(),
        };
        metrics.ledger.opened(&edge);
        ConnectionRecord {
            metrics: metrics.clone(),
            labels,
            edge,
            client,
            target,
            started: Instant::now(),
            trace: None,
            source_claimed: source.claimed.clone(),
        }
    }

    /// Logs `trace`'s id with the connection: the one its tunnel's
    /// `traceparent` carries, so both ends' lines can be joined.
    pub fn traced(mut self, trace: TraceParent) -> ConnectionRecord {
        self.trace = Some(trace);
        self
    }

    /// Counts the connection as closed with the bytes it carried
    /// (`received` from the client, `sent` to it) and writes its access-log line.
    pub fn close(self, received: u64, sent: u64, error: Option<&str>) {
        self.metrics.closed.get_or_create(&self.labels).inc();
        self.metrics.ledger.closed(&self.edge, received, sent);
        self.metrics
            .sent_bytes
            .get_or_create(&self.labels)
            .inc_by(sent);
        self.metrics
            .received_bytes
            .get_or_create(&self.labels)
            .inc_by(received);
        let l = &self.labels;
        let trace_id = self.trace.map(|t| t.trace_id_hex()).unwrap_or_default();
        let claimed = self.source_claimed.unwrap_or_default();
        fn claim(value: &Option<String>) -> &str {
            value.as_deref().unwrap_or("")
        }
        info!(
            target: "weft::access",
            direction = l.reporter.as_str(),
            src.addr = %self.client,
            src.workload = l.source_workload.as_str(),
            src.namespace = l.source_workload_namespace.as_str(),
            src.principal = l.source_principal.as_str(),
            src.cluster = claim(&claimed.cluster),
            src.service = claim(&claimed.service),
            src.revision = claim(&claimed.revision),
            dst.addr = %self.target,
            dst.workload = l.destination_workload.as_str(),
            dst.namespace = l.destination_workload_namespace.as_str(),
            dst.principal = l.destination_principal.as_str(),
            dst.service = l.destination_service.as_str(),
            security = l.connection_security_policy.as_str(),
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = error.unwrap_or(""),
            trace_id = trace_id.as_str(),
            "connection closed"
        );
    }
}

/// The upstream side of a proxied connection (a pod, a tunnel), counting
/// what passes through it. Dropping it closes its [`ConnectionRecord`], so
/// the connection is accounted for however it ends, even when the bytes are
/// copied by code that knows nothing of metrics.
pub struct Metered<S> {
    inner: S,
    /// Read from upstream: sent towards the client.
    read: u64,
    /// Written to upstream: received from the client.
    written: u64,
    record: Option<ConnectionRecord>,
    error: Option<String>,
    /// Held for the connection's life (its policy registration).
    _keep: Option<super::reauthorize::Registration>,
    /// Held for the connection's life: its place within the limits.
    _admitted: Option<super::admission::AdmittedConnection>,
}

impl<S: crate::copy::Abort> crate::copy::Abort for Metered<S> {
    fn abort(&mut self) {
        self.inner.abort();
    }
}

impl<S> Metered<S> {
    /// Wraps `inner`; `record` is closed when this is dropped.
    pub fn new(inner: S, record: ConnectionRecord) -> Metered<S> {
        Metered {
            inner,
            read: 0,
            written: 0,
            record: Some(record),
            error: None,
            _keep: None,
            _admitted: None,
        }
    }

    /// Counts `bytes` from the client that reached upstream before it was
    /// wrapped (early data sent with a tunnel's `CONNECT`).
    pub fn already_written(mut self, bytes: usize) -> Metered<S> {
        self.written += bytes as u64;
        self
    }

    /// Keeps `registration` until the connection ends.
    pub fn keeping(mut self, registration: Option<super::reauthorize::Registration>) -> Metered<S> {
        self._keep = registration;
        self
    }

    /// Holds the connection's place within the limits (see
    /// [`super::admission`]) until it ends.
    pub fn admitted(mut self, admitted: super::admission::AdmittedConnection) -> Metered<S> {
        self._admitted = Some(admitted);
        self
    }

    /// Notes why the connection ended badly, for the access log.
    pub fn failed(&mut self, error: impl std::fmt::Display) {
        self.error = Some(error.to_string());
    }

    /// Whether a policy change refused the connection since it opened: the
    /// copy then fails, which aborts both ends.
    fn revoked(&self) -> bool {
        self._keep
            .as_ref()
            .is_some_and(super::reauthorize::Registration::revoked)
    }
}

/// What a copy through a revoked connection fails with.
fn revoked_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "closed: a policy change refused this open connection",
    )
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.close(self.written, self.read, self.error.as_deref());
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        match poll {
            std::task::Poll::Ready(Ok(())) if self.revoked() => {
                std::task::Poll::Ready(Err(revoked_error()))
            }
            poll => poll,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        match poll {
            std::task::Poll::Ready(Ok(_)) if self.revoked() => {
                std::task::Poll::Ready(Err(revoked_error()))
            }
            poll => poll,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
