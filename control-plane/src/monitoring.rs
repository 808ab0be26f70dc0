//! The monitoring port (15014): health, Prometheus metrics, the dashboard
//! ([`crate::dashboard`]), and debug pages that show what the control
//! plane believes (connected proxies and the versions they applied,
//! manifest problems).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::dashboard::Dashboard;
use crate::listeners::{ListenerLimits, PerSource, Rejections};
use crate::manifests::ManifestProblem;

/// What the monitoring pages show.
pub struct Monitoring {
    /// Prometheus metrics.
    pub metrics: Registry,
    /// The dashboard and what it reads (connected proxies among it).
    pub dashboard: Dashboard,
    /// Current manifest problems.
    pub problems: watch::Receiver<Vec<ManifestProblem>>,
    /// The configuration, as shown at start.
    pub config_json: String,
    /// True once this replica is shutting down: `/ready` says so.
    pub shutting_down: watch::Receiver<bool>,
}

/// Serves the monitoring pages on `listener` until the task is dropped,
/// within `limits`: at most so many connections (more are reset), and a
/// deadline for each request's headers (a slowloris client is closed).
pub async fn serve(
    listener: TcpListener,
    monitoring: Arc<Monitoring>,
    limits: ListenerLimits,
    rejections: Rejections,
) {
    let open = PerSource::http_connections(&limits);
    let header_timeout = Duration::from_millis(limits.http_header_read_timeout_ms);
    loop {
        let (stream, peer) = crate::listeners::accept(&listener, "monitoring").await;
        let permit = match open.hold(peer.ip()) {
            Ok(permit) => permit,
            Err(reason) => {
                rejections.count("monitoring", reason);
                crate::listeners::reset(&stream);
                continue;
            }
        };
        let (monitoring, rejections) = (monitoring.clone(), rejections.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let monitoring = monitoring.clone();
                let (method, uri) = (request.method().clone(), request.uri().clone());
                async move {
                    // Off the async workers: a page of a large mesh takes a
                    // while to make, and those workers answer the proxies'
                    // keepalives.
                    let answer =
                        tokio::task::spawn_blocking(move || route(&monitoring, &method, &uri))
                            .await
                            .unwrap_or_else(|error| {
                                reply(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    "text/plain",
                                    format!("the page failed: {error}\n"),
                                )
                            });
                    Ok::<_, Infallible>(answer)
                }
            });
            match hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                Err(error) if error.is_timeout() => {
                    rejections.count("monitoring", "header_timeout");
                    debug!(%peer, "monitoring: the request's headers did not come in time");
                }
                Err(error) => debug!(%peer, %error, "monitoring connection failed"),
                Ok(()) => {}
            }
        });
    }
}

fn route(monitoring: &Monitoring, method: &Method, uri: &hyper::Uri) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match uri.path() {
        "/ready" if *monitoring.shutting_down.borrow() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".into(),
        ),
        "/healthz" | "/ready" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &monitoring.metrics) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/debug/nodes" => json(&monitoring.dashboard.nodes.snapshot()),
        "/debug/manifests" => {
            let problems: Vec<String> = monitoring
                .problems
                .borrow()
                .iter()
                .map(ToString::to_string)
                .collect();
            json(&problems)
        }
        // What the status conditions say, also where there is no API
        // server to write them to (local manifests).
        "/debug/policies" => json(&monitoring.dashboard.policies()),
        "/debug/config" => reply(
            StatusCode::OK,
            "application/json",
            monitoring.config_json.clone(),
        ),
        path => match monitoring.dashboard.answer(path, uri.query()) {
            Some((status, content_type, body)) => reply(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                content_type,
                body,
            ),
            None => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        },
    }
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    // The pages load only their own assets, and nothing here may be framed
    // or sniffed into another type.
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
