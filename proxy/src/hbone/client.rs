//! The client side of HBONE, one step at a time: a TCP connection from the
//! dialer, the TLS handshake that pins the destination's identity, the
//! HTTP/2 handshake, and a `CONNECT` on an established connection.
//! [`HbonePool`](super::HbonePool) decides which connection a request uses.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::header::FORWARDED;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft_certs::{Identity, KeyExchange, WorkloadCertificate};

use super::error::{HboneError, tls_problem};
use super::headers::forwarded;
use super::slots::SlotLease;
use super::stream::HboneStream;
use super::tuning::{HboneSocket, TLS_WRITE_BUFFER, client_builder, hbone_socket};
use super::windows::Window;

/// One tunnel to open: from which workload, to which workload, where.
#[derive(Debug, Clone)]
pub struct HboneRequest {
    /// The source workload's current certificate, presented to the peer.
    pub certificate: WorkloadCertificate,
    /// The identity the destination must prove.
    pub destination_identity: Identity,
    /// Where the destination's HBONE listener is: `<pod ip>:15008`.
    pub hbone_addr: SocketAddr,
    /// The `CONNECT` authority: the destination pod's IP and target port.
    pub target: SocketAddr,
    /// The local IP to dial from (the source pod's), if any; the dialer
    /// decides how (transparent socket, mark).
    pub source_ip: Option<IpAddr>,
    /// The original client, sent as `forwarded: for="<ip:port>"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The Service the client addressed (`<name>.<namespace>.svc.<domain>`),
    /// sent as the `forwarded` header's `host`, as ztunnel does.
    pub service_host: Option<String>,
    /// Further request headers, such as `baggage` and `traceparent`.
    pub headers: HeaderMap,
}

/// Bytes to send right behind a `CONNECT`, before its answer (see
/// [`HbonePool::connect_sending`](super::HbonePool::connect_sending)), and
/// whether they may have reached the destination.
///
/// The destination proxy forwards them to the pod only after it has
/// answered 200. So a failure that shows the answer was something else (a
/// refusal, a reset stream, an orderly GOAWAY: anything sent before it
/// would have arrived first) proves the pod never got them, and they may be
/// sent again elsewhere. A broken connection, or giving up while the answer
/// is on its way, proves nothing: the peer may have answered 200 and passed
/// the bytes on. Sending them again could then run a request twice.
#[derive(Default)]
pub struct EarlyData {
    bytes: Bytes,
    /// Sent on a stream whose answer has not ruled out delivery.
    in_flight: AtomicBool,
}

impl EarlyData {
    /// Early data of `bytes` (may be empty: then this is a plain `CONNECT`).
    pub fn new(bytes: Bytes) -> EarlyData {
        EarlyData {
            bytes,
            in_flight: AtomicBool::new(false),
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Whether the bytes may have reached the destination although no
    /// tunnel came of it: if so, no other attempt may send them.
    pub fn may_have_arrived(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn set_in_flight(&self, in_flight: bool) {
        self.in_flight.store(in_flight, Ordering::SeqCst);
    }
}

impl fmt::Debug for EarlyData {
    // Never the bytes themselves: they are the client's payload.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EarlyData")
            .field("len", &self.bytes.len())
            .field("may_have_arrived", &self.may_have_arrived())
            .finish()
    }
}

/// The HTTP/2 connection future the pool's driver task polls.
pub(crate) type ClientConnection = Connection<TlsStream<HboneSocket>, Bytes>;

/// An established HBONE connection, before it is pooled.
pub(crate) struct Handshaken {
    pub(crate) send_request: SendRequest<Bytes>,
    pub(crate) connection: ClientConnection,
    /// Its receive windows, held from the budget while it lives.
    pub(crate) window: Window,
}

/// TLS (with `key_exchange`) then HTTP/2 over a freshly dialed TCP
/// connection, receiving within `window`.
pub(crate) async fn handshake(
    tcp: TcpStream,
    request: &HboneRequest,
    window: Window,
    key_exchange: KeyExchange,
) -> Result<Handshaken, HboneError> {
    let address = request.hbone_addr;
    // Small writes (a request, a reply) must leave at once.
    let _ = tcp.set_nodelay(true);
    let config = weft_certs::hbone_client_config(
        &request.certificate,
        &request.destination_identity,
        key_exchange,
    )
    .map_err(|source| HboneError::TlsConfig {
        identity: request.certificate.identity().clone(),
        source,
    })?;
    // The name is only a placeholder: the config sends no SNI and verifies
    // the server by its SPIFFE identity.
    let name = ServerName::IpAddress(address.ip().into());
    let mut tls = TlsConnector::from(config)
        .connect(name, hbone_socket(tcp))
        .await
        .map_err(|e| HboneError::TlsHandshake {
            address,
            expected: request.destination_identity.clone(),
            problem: tls_problem(&e),
        })?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
    super::key_exchange::count(super::key_exchange::Side::Client, tls.get_ref().1);
    let (send_request, connection) = client_builder(window.sizes())
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| HboneError::Http2Handshake {
            peer: address,
            source,
        })?;
    Ok(Handshaken {
        send_request,
        connection,
        window,
    })
}

/// Why opening a stream failed, and what the pool may do about it (early
/// data that may have arrived forbids any retry: see [`EarlyData`]).
pub(crate) struct OpenFailure {
    pub(crate) error: HboneError,
    pub(crate) retry: Retry,
}

/// Whether a failed `CONNECT` may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// The answer stands (a refusal, a malformed request).
    Never,
    /// The peer refused the stream unprocessed (REFUSED_STREAM) on a
    /// connection that is otherwise fine.
    Again,
    /// The connection is closing (GOAWAY) or broken: not on this one.
    OnAnotherConnection,
}

/// Sends the `CONNECT` for `request` on `send_request`, then `early_data`
/// right behind it, and waits for the answer; the stream is the tunnel
/// once the peer says 200.
///
/// Early data is what the client had sent by the time its connection was
/// accepted (a request, a TLS ClientHello). Sending it without waiting for
/// the 200 takes a crossing between the nodes and two wake-ups off every
/// new connection's first exchange: it usually leaves in the same TLS
/// record as the `CONNECT`. HTTP/2 lets a client send DATA on a stream
/// before the response; the peer buffers it within the stream window.
pub(crate) async fn open_stream(
    send_request: &SendRequest<Bytes>,
    request: &HboneRequest,
    early: &EarlyData,
    lease: SlotLease,
) -> Result<HboneStream, OpenFailure> {
    let target = request.target;
    let address = request.hbone_addr;
    let failed = |source: h2::Error, retry: Retry| OpenFailure {
        error: HboneError::ConnectStream {
            target,
            address,
            source,
        },
        retry,
    };
    let connect = connect_request(request).map_err(|source| OpenFailure {
        error: HboneError::BuildRequest { target, source },
        retry: Retry::Never,
    })?;
    let mut ready = send_request
        .clone()
        .ready()
        .await
        .map_err(|e| failed(e, Retry::OnAnotherConnection))?;
    let (response, mut send) = ready.send_request(connect, false).map_err(|e| {
        // A connection-level refusal, or our own malformed headers.
        let retry = if e.is_go_away() || e.is_io() {
            Retry::OnAnotherConnection
        } else {
            Retry::Never
        };
        failed(e, retry)
    })?;
    if !early.bytes.is_empty() {
        // Set before the send: if this future is dropped from here on (a
        // connect timeout), the bytes may be on their way.
        early.set_in_flight(true);
        if let Err(e) = send.send_data(early.bytes.clone(), false) {
            // The stream or connection failed before the bytes left.
            early.set_in_flight(false);
            // On a busy machine the peer's answer can be here already (the
            // connection runs on another thread): a refusal, or a reset
            // such as REFUSED_STREAM, ended the stream before the bytes
            // could follow. Then that answer says why, and whether to try
            // again, not the dead stream the write found ("inactive
            // stream").
            return Err(match futures::FutureExt::now_or_never(response) {
                Some(Ok(answer)) if answer.status() != StatusCode::OK => OpenFailure {
                    error: HboneError::Refused {
                        target,
                        address,
                        status: answer.status(),
                    },
                    retry: Retry::Never,
                },
                Some(Err(answer)) => {
                    let retry = retry_after(&answer);
                    failed(answer, retry)
                }
                _ => {
                    let retry = retry_after(&e);
                    failed(e, retry)
                }
            });
        }
    }
    let response = match response.await {
        Ok(response) => response,
        Err(e) if e.is_io() => {
            // Broken mid-answer: a 200 may have been on its way.
            return Err(failed(e, Retry::OnAnotherConnection));
        }
        Err(e) => {
            // An orderly end (GOAWAY, a reset stream): a 200 would have
            // come first, so the peer forwarded nothing.
            early.set_in_flight(false);
            let retry = retry_after(&e);
            return Err(failed(e, retry));
        }
    };
    let status = response.status();
    if status != StatusCode::OK {
        early.set_in_flight(false);
        send.send_reset(h2::Reason::CANCEL);
        return Err(OpenFailure {
            error: HboneError::Refused {
                target,
                address,
                status,
            },
            retry: Retry::Never,
        });
    }
    Ok(HboneStream::new(send, response.into_body(), Some(lease)))
}

/// Whether a `CONNECT` that failed with `e` may be tried again, and where.
fn retry_after(e: &h2::Error) -> Retry {
    if e.is_go_away() || e.is_io() {
        Retry::OnAnotherConnection
    } else if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Retry::Again
    } else {
        Retry::Never
    }
}

/// `CONNECT <ip>:<port>` in authority form (`[v6]:port` for IPv6).
fn connect_request(request: &HboneRequest) -> Result<Request<()>, http::Error> {
    let authority = Uri::try_from(request.target.to_string())?;
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .version(Version::HTTP_2);
    if let Some(client) = request.forwarded_for {
        builder = builder.header(
            FORWARDED,
            forwarded(client, request.service_host.as_deref()),
        );
    }
    let mut connect = builder.body(())?;
    for (name, value) in &request.headers {
        connect.headers_mut().append(name, value.clone());
    }
    Ok(connect)
}
