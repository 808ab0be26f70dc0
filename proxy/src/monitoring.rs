//! The proxy's Prometheus port (15020) and readiness port (15021).
//!
//! Readiness is answered from the data plane's own state: ready means a
//! config has been applied (the proxy knows where traffic goes), the
//! capture rules steer that config's pods, and the proxy is not draining,
//! so "ready" means "forwarding".
//!
//! During an upgrade two proxy pods share the node's port 15021, and until
//! the new process has taken the socket over, the old one answers. So the
//! DaemonSet's probe ([`probe_ready`], run in the pod's container) names
//! its pod, and a proxy of another pod says it is not that pod's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

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
/// 503 before that and while draining. With `?pod=<uid>`, also 503 unless
/// this process runs in that pod (`own_pod_uid`).
pub(crate) fn readiness(
    routes: watch::Receiver<Arc<RouteTable>>,
    programmed: watch::Receiver<u64>,
    drain: Drain,
    own_pod_uid: String,
) -> Handler {
    Arc::new(move |request| match request.uri().path() {
        "/healthz/ready" => {
            let asked_for = request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|pair| pair.strip_prefix("pod="));
            if let Some(pod) = asked_for.filter(|pod| *pod != own_pod_uid) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!(
                        "the node's readiness port is served by the proxy of pod {own_pod_uid:?}, not of pod {pod:?}\n"
                    ),
                )
            } else if drain.is_draining() {
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

/// The DaemonSet's readiness probe: asks the node's readiness port at
/// `addr` whether it is ready and is the proxy of pod `pod_uid`. Returns
/// the answer's body, as `Err` unless it was 200.
pub fn probe_ready(addr: SocketAddr, pod_uid: &str, timeout: Duration) -> Result<String, String> {
    let addr = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let exchange = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET /healthz/ready?pod={pod_uid} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
        )?;
        let mut answer = String::new();
        // The answers are a line of text: anything longer is not ours.
        stream
            .take(PROBE_ANSWER_LIMIT)
            .read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer = exchange().map_err(|error| format!("asking {addr}: {error}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    let body = body.trim().to_owned();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(body),
        _ => Err(format!("{addr} answered {status:?}: {body}")),
    }
}

/// The most of an answer [`probe_ready`] reads.
const PROBE_ANSWER_LIMIT: u64 = 4096;
