//! The small HTTP/1.1 server behind the proxy's local endpoints (admin,
//! metrics, readiness): accept, answer GETs with a plain function, repeat.
//! Within [`HttpLimits`]: connections per endpoint, a deadline for each
//! request's headers (and for a kept-alive connection's next request), and
//! a lifetime per connection; refusals count in
//! `weft_proxy_rejected_total{listener=<endpoint>}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
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
    /// The client's address.
    pub(crate) peer: std::net::SocketAddr,
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
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        let handler = handler.clone();
        // Unknown only if the socket is already broken; handlers that need
        // it then refuse.
        let about = stream
            .local_addr()
            .ok()
            .map(|local| Connection { peer, local });
        let (listening, limits, rejections) =
            (listening.clone(), limits.clone(), rejections.clone());
        let connection = async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let handler = handler.clone();
                if let Some(about) = about {
                    request.extensions_mut().insert(about);
                }
                async move { Ok::<_, Infallible>(handler(&request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout())
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = listening.node_endpoints_left() => {
                    // A kept-alive client (a metrics scraper) would go on
                    // asking this process, not the one serving the node:
                    // finish the request under way, then close, so that it
                    // reconnects to the successor.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = tokio::time::sleep(limits.max_connection_age()) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
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
        };
        tokio::spawn(connection.instrument(info_span!("http", endpoint = name, %peer)));
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
