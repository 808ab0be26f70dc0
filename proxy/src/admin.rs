//! The admin endpoint (localhost:15000 by default): what the proxy was told
//! and what it holds, for the operator at 3 a.m. Plain HTTP/1.1, read-only.
//!
//! - `GET /config_dump`: the proxy's settings, the control-plane link, the
//!   applied config version (and the last refused one), trust domain, and
//!   every local workload, remote workload and service with all fields.
//! - `GET /certs`: the workload certificates the node holds, with validity
//!   and renewal times.
//! - `GET /healthz`: `ok`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::certificates::CertificateMap;
use crate::control_plane::{ControlPlaneStatus, ViewReceiver};
use crate::http_server::{self, text};
use crate::node_view::NodeView;
use crate::wall_clock::{rfc3339, seconds_until};
use crate::{Error, ProxyConfig};

/// What the admin endpoint reads from; each part is a live view.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// The proxy's settings.
    pub(crate) config: Arc<ProxyConfig>,
    /// The applied config.
    pub(crate) view: ViewReceiver,
    /// The link to the control plane.
    pub(crate) status: watch::Receiver<ControlPlaneStatus>,
    /// The workload certificates.
    pub(crate) certificates: watch::Receiver<CertificateMap>,
}

/// Listens on `addr` (port 0 picks a free port; see `local_addr`). A std
/// listener, so that [`serve`] registers it with the runtime it runs on.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::BindAdmin { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::BindAdmin { addr, source })?;
    Ok(listener)
}

/// Serves admin requests on `listener` until the task is dropped.
pub(crate) async fn serve(listener: std::net::TcpListener, state: AdminState) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin endpoint: cannot use its listener");
            return;
        }
    };
    let state = Arc::new(state);
    let handler: http_server::Handler = Arc::new(move |request| respond(request, &state));
    http_server::serve(listener, "admin", handler).await;
}

fn respond(request: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/config_dump" => json_response(config_dump(state)),
        "/certs" => json_response(certs(&state.certificates.borrow(), SystemTime::now())),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /config_dump, /certs or /healthz\n",
        ),
    }
}

/// The `/config_dump` document.
fn config_dump(state: &AdminState) -> Value {
    let status = state.status.borrow().clone();
    let view = state.view.borrow().clone();
    let last_nack = status.last_nack.as_ref().map(|nack| {
        json!({
            "version": nack.version,
            "reason": nack.reason,
            "at": rfc3339(nack.at),
        })
    });
    let view = view.as_deref();
    json!({
        "proxy": &*state.config,
        "control_plane": {
            "address": state.config.control_plane,
            "identity": state.config.control_plane_identity.as_str(),
            "connected": status.connected,
            "since": rfc3339(status.since),
            "streams_opened": status.streams_opened,
            "last_error": status.last_error,
        },
        "applied_version": view.map(NodeView::version),
        "last_nack": last_nack,
        "trust": view.map(|v| to_json(v.trust())),
        "local_workloads": view.map_or(json!([]), |v| listed(v.local_workloads())),
        "remote_workloads": view.map_or(json!([]), |v| listed(v.remote_workloads())),
        "services": view.map_or(json!([]), |v| listed(v.services())),
    })
}

/// The `/certs` document at `now`.
fn certs(certificates: &CertificateMap, now: SystemTime) -> Value {
    certificates
        .values()
        .map(|cert| {
            json!({
                "identity": cert.identity().as_str(),
                "not_before": rfc3339(cert.not_before()),
                "not_after": rfc3339(cert.not_after()),
                "renew_at": rfc3339(cert.renew_at()),
                "seconds_until_expiry": seconds_until(cert.not_after(), now),
                "chain_len": cert.chain().len(),
            })
        })
        .collect()
}

/// The entries of a keyed map as a JSON list (each entry carries its key).
fn listed<T: Serialize>(map: &BTreeMap<String, Arc<T>>) -> Value {
    Value::Array(map.values().map(|entry| to_json(&**entry)).collect())
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

fn json_response(document: Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(&document).unwrap_or_default();
    body.push(b'\n');
    http_server::respond(StatusCode::OK, "application/json", body)
}
