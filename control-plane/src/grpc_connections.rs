//! The connections of the gRPC port (15012), from accept to what tonic
//! serves: TLS handshakes run concurrently within their caps
//! ([`crate::listeners::PerSource`]); an established connection holds a
//! place within the connection cap, and, until a call on it carries a
//! node token that checks out, one within the caps of unauthenticated
//! connections (in all and per source); it must do so within a deadline,
//! or it is closed. Anyone who reaches
//! the Service can complete a handshake (the server does not ask for a
//! client certificate: a proxy proves itself with its token), so without
//! these bounds a client could hold connections without ever calling.
//!
//! A served connection tells its calls who it is through [`Caller`]
//! (tonic puts it in each request's extensions); node authentication marks
//! it authenticated, which lifts the deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::listeners::{Held, ListenerLimits, PerSource, Rejections};

/// Who is at the other end of a served connection, for its calls.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The client's address.
    pub peer: SocketAddr,
    authenticated: Arc<AtomicBool>,
}

impl Caller {
    /// Notes that a call on the connection carried a valid node token:
    /// the connection may stay.
    pub fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Release);
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }
}

/// An established connection, as tonic serves it.
pub struct GrpcConnection {
    tls: TlsStream<TcpStream>,
    caller: Caller,
    /// Until a call authenticates: when the connection is closed.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The deadline passed without an authenticated call.
    expired: bool,
    rejections: Rejections,
    _place: Held,
    /// Its place among the unauthenticated, until a call authenticates.
    unauthenticated: Option<Held>,
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl GrpcConnection {
    /// Whether the connection is past its deadline without an
    /// authenticated call. Checked on every read and write (a peer that
    /// stops reading stalls hyper's reads, not its writes), so the timer's
    /// waker stays registered while the connection waits for its first call.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(deadline) = self.deadline.as_mut() {
            if self.caller.is_authenticated() {
                self.deadline = None;
                self.unauthenticated = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                self.deadline = None;
                self.expired = true;
                self.rejections.count("grpc", "no_authenticated_call");
                debug!(peer = %self.caller.peer, "no authenticated call in time: closed");
            }
        }
        self.expired
    }
}

fn closed_for_no_call<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no authenticated call in time",
    )))
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return closed_for_no_call();
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return closed_for_no_call();
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return closed_for_no_call();
        }
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return closed_for_no_call();
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The bounds and counters [`tls_connections`] works with.
pub struct GrpcBounds {
    handshakes: Arc<PerSource>,
    connections: Arc<PerSource>,
    unauthenticated: Arc<PerSource>,
    handshake_timeout: Duration,
    authenticate_within: Duration,
    rejections: Rejections,
}

impl GrpcBounds {
    /// The bounds of `limits`; refusals counted in `rejections`.
    pub fn new(limits: &ListenerLimits, rejections: Rejections) -> GrpcBounds {
        GrpcBounds {
            handshakes: PerSource::handshakes(limits),
            connections: PerSource::grpc_connections(limits),
            unauthenticated: PerSource::unauthenticated_grpc_connections(limits),
            handshake_timeout: limits.handshake_timeout(),
            authenticate_within: limits.grpc_authenticate_within(),
            rejections,
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so
/// one slow or hostile client cannot hold up the others, within the
/// bounds: beyond them a connection is reset at once.
pub fn tls_connections(
    listener: TcpListener,
    tls: TlsAcceptor,
    bounds: GrpcBounds,
) -> ReceiverStream<Result<GrpcConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let bounds = Arc::new(bounds);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = crate::listeners::accept(&listener, "grpc").await;
            let ip = peer.ip();
            let held = bounds.connections.hold(ip).and_then(|place| {
                let unauthenticated = bounds.unauthenticated.hold(ip)?;
                Ok((place, unauthenticated, bounds.handshakes.hold(ip)?))
            });
            let (place, unauthenticated, handshaking) = match held {
                Ok(held) => held,
                Err(reason) => {
                    bounds.rejections.count("grpc", reason);
                    debug!(%peer, reason, "a gRPC connection limit was reached: reset");
                    crate::listeners::reset(&stream);
                    continue;
                }
            };
            let (tls, ready, bounds) = (tls.clone(), tx.clone(), bounds.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(bounds.handshake_timeout, tls.accept(stream));
                let handshake = handshake.await;
                drop(handshaking);
                match handshake {
                    Ok(Ok(tls)) => {
                        let connection = GrpcConnection {
                            tls,
                            caller: Caller {
                                peer,
                                authenticated: Arc::default(),
                            },
                            deadline: Some(Box::pin(tokio::time::sleep(
                                bounds.authenticate_within,
                            ))),
                            expired: false,
                            rejections: bounds.rejections.clone(),
                            _place: place,
                            unauthenticated: Some(unauthenticated),
                        };
                        let _ = ready.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => {
                        bounds.rejections.count("grpc", "handshake_timeout");
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}
