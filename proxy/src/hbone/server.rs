//! The server side of HBONE: one inbound connection's `CONNECT` streams,
//! each checked, handed to an [`InboundHandler`] for a decision and an
//! upstream connection, answered, and then copied both ways.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::FORWARDED;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;
use weft_certs::Identity;

use super::error::HboneError;
use super::headers::{BAGGAGE, Baggage, TRACEPARENT, TraceParent, parse_forwarded};
use super::stream::{HboneStream, TunnelStats, copy_tunnel};
use super::tuning::{
    HANDSHAKE_TIMEOUT, HboneSocket, IDLE_TIMEOUT, Keepalive, TLS_WRITE_BUFFER, hbone_socket,
    keepalive, server_builder,
};
use super::windows::Windows;

/// One `CONNECT` that passed the protocol checks, for the handler to decide.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The client workload, as its verified certificate names it.
    pub peer_identity: Identity,
    /// The client end of the HBONE connection (the source pod's IP when the
    /// source proxy dials transparently).
    pub peer_address: SocketAddr,
    /// What the client asked to reach: an IP of this connection's local
    /// address, and a port.
    pub target: SocketAddr,
    /// The original client from the `forwarded` header, if sent (port 0
    /// when the header names an IP only).
    pub forwarded_for: Option<SocketAddr>,
    /// The Service the client says it addressed (the `forwarded` header's
    /// `host`): a claim, to be checked against the config before use.
    pub service_host: Option<String>,
    /// Who the client says it is (`baggage`): a claim, to be checked
    /// against its identity before use.
    pub baggage: Baggage,
    /// The client's `traceparent`, or a new one when it sent none that is
    /// valid: both ends of a tunnel log the same trace id.
    pub trace: TraceParent,
    /// All request headers.
    pub headers: HeaderMap,
}

/// Why a handler turns a `CONNECT` away; the reason is for logs only, the
/// peer sees just the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Denied by policy: 401.
    Denied(String),
    /// No such workload, or the workload refused the connection: 503.
    Unavailable(String),
}

impl Refusal {
    /// The status sent to the peer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Denied by policy (401), for the logs: `reason`.
    pub fn unauthorized(reason: impl Into<String>) -> Refusal {
        Refusal::Denied(reason.into())
    }

    /// No such workload or it refused (503), for the logs: `reason`.
    pub fn service_unavailable(reason: impl Into<String>) -> Refusal {
        Refusal::Unavailable(reason.into())
    }

    /// Why, for the logs.
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Denied(reason) | Refusal::Unavailable(reason) => reason,
        }
    }
}

/// What the data plane decides for each inbound tunnel.
pub trait InboundHandler: Send + Sync + 'static {
    /// The connection a tunnel is copied to (a `TcpStream` to the pod).
    /// A failed copy aborts it ([`crate::copy::Abort`]).
    type Upstream: AsyncRead + AsyncWrite + crate::copy::Abort + Unpin + Send + 'static;

    /// Checks policy and connects to the target, or says why not. Called
    /// concurrently for the streams of a connection.
    fn connect(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send;

    /// Called once a tunnel has ended, with the bytes it carried (as the
    /// tunnel saw them: `sent` to the client, `received` from it) and the
    /// copy's error if it did not end cleanly. For metrics and access logs.
    fn tunnel_closed(
        &self,
        request: &InboundRequest,
        stats: TunnelStats,
        error: Option<&io::Error>,
    ) {
        let _ = (request, stats, error);
    }
}

/// Any `async` closure taking the request is a handler (with no
/// `tunnel_closed` report): `Arc::new(move |request: InboundRequest| async
/// move { .. })`.
impl<F, Fut, U> InboundHandler for F
where
    F: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, Refusal>> + Send,
    U: AsyncRead + AsyncWrite + crate::copy::Abort + Unpin + Send + 'static,
{
    type Upstream = U;

    fn connect(&self, request: &InboundRequest) -> impl Future<Output = Result<U, Refusal>> + Send {
        self(request.clone())
    }
}

/// How a served HBONE connection runs.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Its receive windows, and the budget they come from.
    pub windows: Windows,
    /// How it notices a client that stopped answering.
    pub keepalive: Keepalive,
    /// How long the HTTP/2 handshake may take (after TLS).
    pub handshake_timeout: Duration,
    /// How long it may carry no stream before it is closed.
    pub idle_timeout: Duration,
    /// The TLS key exchange it accepts.
    pub key_exchange: weft_certs::KeyExchange,
}

impl Default for ServerSettings {
    /// ztunnel's windows with no budget, and the default timeouts.
    fn default() -> ServerSettings {
        ServerSettings {
            windows: Windows::default(),
            keepalive: Keepalive::default(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            key_exchange: weft_certs::KeyExchange::default(),
        }
    }
}

/// The TLS handshake of an inbound HBONE connection, bounded by
/// [`HANDSHAKE_TIMEOUT`]. `config` is [`weft_certs::hbone_server_config`] of
/// the workload the connection is addressed to.
pub async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Result<TlsStream<HboneSocket>, HboneError> {
    let deadlines = HandshakeDeadlines {
        start: HANDSHAKE_TIMEOUT,
        finish: HANDSHAKE_TIMEOUT,
    };
    accept_tls_within(tcp, config, deadlines).await
}

/// How long an inbound connection may take over its TLS handshake.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeDeadlines {
    /// Until the client's first byte (its ClientHello) arrives.
    pub start: Duration,
    /// Until the handshake is done, counted from the start.
    pub finish: Duration,
}

/// [`accept_tls`] within `deadlines`: a client that says nothing is given
/// up after `deadlines.start`, a slow one after `deadlines.finish`.
pub async fn accept_tls_within(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    deadlines: HandshakeDeadlines,
) -> Result<TlsStream<HboneSocket>, HboneError> {
    let peer = peer_address(&tcp);
    let started = tokio::time::Instant::now();
    let timed_out = |after| HboneError::HandshakeTimeout {
        peer,
        step: "TLS",
        after,
    };
    // Readable: a first byte, or the end of the connection (which the
    // handshake then reports).
    if tokio::time::timeout(deadlines.start, tcp.readable())
        .await
        .is_err()
    {
        return Err(timed_out(deadlines.start));
    }
    let handshake = TlsAcceptor::from(config).accept(hbone_socket(tcp));
    match tokio::time::timeout_at(started + deadlines.finish, handshake).await {
        Ok(Ok(tls)) => {
            super::key_exchange::count(super::key_exchange::Side::Server, tls.get_ref().1);
            Ok(tls)
        }
        Ok(Err(failure)) => Err(HboneError::TlsAccept { peer, failure }),
        Err(_) => Err(timed_out(deadlines.finish)),
    }
}

/// Serves one HBONE connection until the client closes it, it fails, or,
/// once `drain` turns true, its open streams have finished (GOAWAY tells
/// the client to open new streams elsewhere). `local_addr` is the address
/// the client dialed; a `CONNECT` to any other IP is refused with 400.
///
/// The connection's receive windows come out of `settings.windows`'
/// budget; when not even its floor is left, the connection is refused
/// ([`HboneError::WindowBudget`]).
///
/// For a deadline on draining, drop this future when it passes.
pub async fn serve_connection<H: InboundHandler>(
    mut tls: TlsStream<HboneSocket>,
    local_addr: SocketAddr,
    handler: Arc<H>,
    mut drain: watch::Receiver<bool>,
    settings: &ServerSettings,
) -> Result<(), HboneError> {
    tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
    let (socket, session) = tls.get_ref();
    let tcp = socket.get_ref();
    let peer = peer_address(tcp);
    let _ = tcp.set_nodelay(true);
    let peer_identity = weft_certs::peer_identity(session)
        .map_err(|source| HboneError::PeerIdentity { peer, source })?;
    let window = settings
        .windows
        .reserve()
        .ok_or(HboneError::WindowBudget { peer })?;
    let max_streams = settings.windows.max_streams;
    let (handshake_timeout, keepalive_settings) = (settings.handshake_timeout, settings.keepalive);
    let idle_timeout = settings.idle_timeout;
    let span = tracing::debug_span!(
        "hbone_inbound",
        %peer,
        peer_identity = %peer_identity,
        local = %local_addr,
    );
    let context = Arc::new(ConnectionContext {
        peer_identity,
        peer,
        local_addr,
    });
    async move {
        let builder = server_builder(window.sizes(), max_streams);
        // Held, and given back to the budget, for as long as the connection.
        let _window = window;
        let handshake = builder.handshake::<_, Bytes>(tls);
        let mut connection = match tokio::time::timeout(handshake_timeout, handshake).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(source)) => return Err(HboneError::Http2Handshake { peer, source }),
            Err(_) => {
                return Err(HboneError::HandshakeTimeout {
                    peer,
                    step: "HTTP/2",
                    after: handshake_timeout,
                });
            }
        };
        let ping_pong = connection.ping_pong();
        let pings = async {
            match ping_pong {
                Some(ping_pong) => keepalive(ping_pong, keepalive_settings).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(pings);
        let mut draining = false;
        let mut drain_open = true;
        // The connection's streams live and die with it: when this future
        // ends (an error, or dropped at a drain deadline) they are aborted.
        let mut streams = tokio::task::JoinSet::new();
        // A connection that carries no stream for the idle timeout is
        // closed (GOAWAY): it holds a receive window from the budget.
        let mut last_active = tokio::time::Instant::now();
        loop {
            if !draining && *drain.borrow_and_update() {
                tracing::debug!("draining: no new streams");
                connection.graceful_shutdown();
                draining = true;
            }
            tokio::select! {
                next = connection.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let (context, handler) = (Arc::clone(&context), Arc::clone(&handler));
                        let stream = serve_stream(request, respond, context, handler);
                        streams.spawn(crate::lanes::movable(stream.in_current_span()));
                        last_active = tokio::time::Instant::now();
                    }
                    Some(Err(source)) => return Err(HboneError::Connection { peer, source }),
                    None => {
                        // Closed cleanly: let the streams finish their copies.
                        while streams.join_next().await.is_some() {}
                        return Ok(());
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {
                    // A stream ended; reaping it keeps the set small.
                    last_active = tokio::time::Instant::now();
                }
                () = tokio::time::sleep_until(last_active + idle_timeout),
                    if streams.is_empty() && !draining =>
                {
                    tracing::debug!("idle: closing");
                    connection.graceful_shutdown();
                    draining = true;
                }
                changed = drain.changed(), if drain_open && !draining => {
                    // A dropped sender can no longer ask for a drain.
                    drain_open = changed.is_ok();
                }
                () = &mut pings => {
                    let after = keepalive_settings.timeout;
                    return Err(HboneError::KeepaliveTimeout { peer, after });
                }
            }
        }
    }
    .instrument(span)
    .await
}

struct ConnectionContext {
    peer_identity: Identity,
    peer: SocketAddr,
    local_addr: SocketAddr,
}

/// One `CONNECT`: check, decide, answer, copy.
async fn serve_stream<H: InboundHandler>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    context: Arc<ConnectionContext>,
    handler: Arc<H>,
) {
    let target = match check_connect(&request, context.local_addr) {
        Ok(target) => target,
        Err((status, problem)) => {
            tracing::debug!(%status, problem, uri = %request.uri(), "malformed CONNECT");
            answer(&mut respond, status);
            return;
        }
    };
    let (parts, recv) = request.into_parts();
    let forwarded = parts
        .headers
        .get(FORWARDED)
        .map(parse_forwarded)
        .unwrap_or_default();
    let inbound = InboundRequest {
        peer_identity: context.peer_identity.clone(),
        peer_address: context.peer,
        target,
        forwarded_for: forwarded.client,
        service_host: forwarded.host,
        baggage: Baggage::parse(parts.headers.get_all(BAGGAGE)),
        trace: parts
            .headers
            .get(TRACEPARENT)
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::random),
        headers: parts.headers,
    };
    let span = tracing::debug_span!(
        "tunnel",
        source = %inbound.peer_identity,
        destination = %target,
        client = ?inbound.forwarded_for,
        trace_id = %inbound.trace.trace_id_hex(),
    );
    async move {
        let mut upstream = match handler.connect(&inbound).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                tracing::debug!(status = %refusal.status(), reason = refusal.reason(), "refused");
                answer(&mut respond, refusal.status());
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(error) => {
                tracing::debug!(%error, "the client went away before the answer");
                return;
            }
        };
        let mut tunnel = HboneStream::new(send, recv, None);
        let (stats, result) = copy_tunnel(&mut tunnel, &mut upstream).await;
        match &result {
            Ok(()) => tracing::debug!(stats.sent, stats.received, "tunnel closed"),
            Err(error) => tracing::debug!(stats.sent, stats.received, %error, "tunnel failed"),
        }
        handler.tunnel_closed(&inbound, stats, result.as_ref().err());
    }
    .instrument(span)
    .await;
}

/// The target of a well-formed `CONNECT` to this connection's local IP, or
/// the status to refuse it with and why.
pub fn check_connect<B>(
    request: &Request<B>,
    local_addr: SocketAddr,
) -> Result<SocketAddr, (StatusCode, &'static str)> {
    if request.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "not a CONNECT"));
    }
    let target: SocketAddr = request
        .uri()
        .authority()
        .and_then(|authority| authority.as_str().parse().ok())
        .ok_or((StatusCode::BAD_REQUEST, "the authority is not <ip>:<port>"))?;
    if target.ip().to_canonical() != local_addr.ip().to_canonical() {
        return Err((
            StatusCode::BAD_REQUEST,
            "the authority is not the connection's local address",
        ));
    }
    Ok(target)
}

/// A refusal: the status, no body.
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, "the client went away before the answer");
    }
}

fn peer_address(tcp: &TcpStream) -> SocketAddr {
    tcp.peer_addr()
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
}
