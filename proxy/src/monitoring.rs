//! The proxy's Prometheus port (15020) and readiness port (15021).
//!
//! Readiness is answered from the data plane's own state: ready means a
//! config has been applied (the proxy knows where traffic goes), the
//! capture rules steer that config's pods, and the proxy is not draining,
//! so "ready" means "forwarding".

use std::sync::Arc;

use hyper::StatusCode;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::dataplane::drain::Drain;
use crate::dataplane::routes::RouteTable;
use crate::http_server::{Handler, respond, text};

/// `GET /metrics` (also `/stats/prometheus`, where Istio keeps them).
pub(crate) fn metrics(registry: Arc<Registry>) -> Handler {
    Arc::new(move |request| match request.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding metrics failed\n",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    })
}

/// `GET /healthz/ready`: 200 once a config is applied and its pods are
/// captured (`programmed` is the config version the capture rules follow),
/// 503 before that and while draining.
pub(crate) fn readiness(
    routes: watch::Receiver<Arc<RouteTable>>,
    programmed: watch::Receiver<u64>,
    drain: Drain,
) -> Handler {
    Arc::new(move |request| match request.uri().path() {
        "/healthz/ready" => {
            if drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if routes.borrow().generation == 0 {
                text(StatusCode::SERVICE_UNAVAILABLE, "no config applied yet\n")
            } else if *programmed.borrow() == 0 {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "capture rules not programmed yet\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        // `weft-control-plane uninstall` asks every proxy this before the
        // mesh is deleted: 200 once this proxy knows, and so will remove its
        // capture when it stops.
        "/uninstall" => {
            if routes.borrow().uninstalling {
                text(StatusCode::OK, "the capture goes when this proxy stops\n")
            } else {
                text(
                    StatusCode::CONFLICT,
                    "not told of an uninstall: the capture stays when this proxy stops\n",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /healthz/ready\n"),
    })
}
