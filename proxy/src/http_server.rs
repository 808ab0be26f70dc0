//! The small HTTP/1.1 server behind the proxy's local endpoints (admin,
//! metrics, readiness): accept, answer GETs with a plain function, repeat.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info_span, warn};

use crate::listening::Listening;

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
    name: &'static str,
    handler: Handler,
    listening: Listening,
) {
    while let Some(accepted) = listening.node_endpoint_accept(|| listener.accept()).await {
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                warn!(reason = %e, endpoint = name, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
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
        let listening = listening.clone();
        let connection = async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let handler = handler.clone();
                if let Some(about) = about {
                    request.extensions_mut().insert(about);
                }
                async move { Ok::<_, Infallible>(handler(&request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
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
            };
            if let Err(e) = ended {
                debug!(reason = %e, "connection ended with an error");
            }
        };
        tokio::spawn(connection.instrument(info_span!("http", endpoint = name, %peer)));
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
