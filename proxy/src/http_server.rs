//! The small HTTP/1.1 server behind the proxy's local endpoints (admin,
//! metrics, readiness): accept, answer GETs with a plain function, repeat.
//! Within [`HttpLimits`]: connections per endpoint, a deadline for each
//! request's headers (and for a kept-alive connection's next request), and
//! a lifetime per connection; refusals count in
//! `weft_proxy_rejected_total{listener=<endpoint>}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use crate::limits::HttpLimits;
use crate::listening::Listening;
use crate::rejections::Rejections;

/// One endpoint: its name (`admin`, `metrics`, `readiness`; the
/// `listener` label of its refusals), limits and refusal counter.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) name: &'static str,
    pub(crate) limits: HttpLimits,
    pub(crate) rejections: Rejections,
}

/// The connection a request came on (a request extension), for handlers
/// that care who is asking.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connection {
    /// The address the client connected to.
    pub(crate) local: std::net::SocketAddr,
}

/// Answers one request.
pub(crate) type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on `listener` while it is this process's turn (see
/// [`Listening`]); returns once the listener went to a successor.
pub(crate) async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    handler: Handler,
    listening: Listening,
) {
    let Endpoint {
        name,
        limits,
        rejections,
    } = endpoint;
    let open = Arc::new(OpenConnections::default());
    let mut failed_accepts = 0u32;
    while let Some(accepted) = listening.node_endpoint_accept(|| listener.accept()).await {
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failed_accepts = 0;
                accepted
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, longer each
                // time it fails again, do not spin.
                failed_accepts = failed_accepts.saturating_add(1);
                let wait = Duration::from_millis(10 << failed_accepts.min(7));
                warn!(reason = %e, endpoint = name, ?wait, "accepting a connection failed");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let permit = match open.admit(peer.ip(), &limits) {
            Ok(permit) => permit,
            Err(reason) => {
                rejections.count(name, reason);
                debug!(%peer, endpoint = name, reason, "too many connections: reset");
                crate::copy::reset_on_close(&stream);
                continue;
            }
        };
        // Unknown only if the socket is already broken; handlers that need
        // it then refuse.
        let about = stream.local_addr().ok().map(|local| Connection { local });
        let span = info_span!("http", endpoint = name, %peer);
        let connection = serve_connection(
            stream,
            about,
            (name, limits.clone(), rejections.clone()),
            handler.clone(),
            Some(listening.clone()),
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                connection.await;
            }
            .instrument(span),
        );
    }
}

/// Serves `handler` on the Unix socket `listener`, each connection's
/// requests carrying what [`LocalCaller::of`] found out about the process
/// on the other end. A connection beyond the endpoint's cap is closed.
pub(crate) async fn serve_unix(listener: UnixListener, endpoint: Endpoint, handler: Handler) {
    let Endpoint {
        name,
        limits,
        rejections,
    } = endpoint;
    let open = Arc::new(Semaphore::new(limits.http_max_connections as usize));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(reason = %e, endpoint = name, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            rejections.count(name, "connection_limit");
            continue;
        };
        let caller = LocalCaller::of(&stream);
        let span = info_span!("http", endpoint = name, caller = ?caller);
        let connection = serve_connection(
            stream,
            Some(caller),
            (name, limits.clone(), rejections.clone()),
            handler.clone(),
            None,
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                connection.await;
            }
            .instrument(span),
        );
    }
}

/// Who is on the other end of an admin-socket connection, as the kernel
/// says (`SO_PEERCRED`), and whether that process may change the proxy:
/// only one running as the proxy's user inside the proxy's own container
/// (its mount namespace), such as `kubectl exec` into it. A root process
/// elsewhere on the node that found its way to the socket is not.
#[derive(Clone, Debug)]
pub(crate) enum LocalCaller {
    /// May change the proxy.
    Trusted { pid: i32, uid: u32 },
    /// May not, and why.
    Untrusted(String),
}

impl LocalCaller {
    fn of(stream: &tokio::net::UnixStream) -> LocalCaller {
        match crate::local_peer::check(stream) {
            Ok((pid, uid)) => LocalCaller::Trusted { pid, uid },
            Err(why) => LocalCaller::Untrusted(why),
        }
    }
}

/// Serves one connection until it ends, the endpoint's limits bite, or
/// (with `listening`) the node's endpoints went to a successor; each
/// request carries `about` as an extension.
async fn serve_connection<S, T>(
    stream: S,
    about: Option<T>,
    (name, limits, rejections): (&'static str, HttpLimits, Rejections),
    handler: Handler,
    listening: Option<Listening>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let handler = handler.clone();
        if let Some(about) = &about {
            request.extensions_mut().insert(about.clone());
        }
        async move { Ok::<_, Infallible>(handler(&request)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let handed_over = async {
        match &listening {
            Some(listening) => listening.node_endpoints_left().await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = handed_over => {
            // A kept-alive client (a metrics scraper) would go on asking
            // this process, not the one serving the node: finish the
            // request under way, then close, so that it reconnects to the
            // successor.
            connection.as_mut().graceful_shutdown();
            finish(connection, &limits).await
        }
        () = tokio::time::sleep(limits.max_connection_age()) => {
            connection.as_mut().graceful_shutdown();
            finish(connection, &limits).await
        }
    };
    match ended {
        Err(e) if e.is_timeout() => {
            rejections.count(name, "header_timeout");
            debug!("closed: the request's headers did not come in time");
        }
        Err(e) => debug!(reason = %e, "connection ended with an error"),
        Ok(()) => {}
    }
}

/// The request under way on a connection told to shut down, within the
/// header deadline: a client that stopped reading its answer must not
/// hold its place for good.
async fn finish<F>(connection: Pin<&mut F>, limits: &HttpLimits) -> Result<(), hyper::Error>
where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
{
    match tokio::time::timeout(limits.header_read_timeout(), connection).await {
        Ok(ended) => ended,
        Err(_) => {
            debug!("closed: the client did not take its answer in time");
            Ok(())
        }
    }
}

/// An endpoint's open connections, in all and by source address.
#[derive(Default)]
struct OpenConnections {
    counts: Mutex<(u32, HashMap<IpAddr, u32>)>,
}

/// One open connection; dropping it gives its place back.
struct OpenConnection {
    open: Arc<OpenConnections>,
    source: IpAddr,
}

impl OpenConnections {
    fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        limits: &HttpLimits,
    ) -> Result<OpenConnection, &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, by_source) = &mut *counts;
        if *total >= limits.http_max_connections {
            return Err("connection_limit");
        }
        let from_source = by_source.entry(source).or_default();
        if *from_source >= limits.http_max_connections_per_source {
            return Err("source_limit");
        }
        *from_source += 1;
        *total += 1;
        Ok(OpenConnection {
            open: self.clone(),
            source,
        })
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut counts = self
            .open
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, by_source) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(count) = by_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A response with a body and content type.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}
