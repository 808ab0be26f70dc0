//! The admin endpoint (localhost:15000 by default): what the proxy was told
//! and what it holds, for the operator at 3 a.m., and the two knobs they
//! need then. Plain HTTP/1.1. Anyone on the node can read it on the TCP
//! port, if the request names it as its host (a web page that rebound its
//! own name to 127.0.0.1 is refused). Changes (the POSTs) are taken only
//! on the admin socket (`--admin-socket`), from a process in the proxy's
//! own container running as its user, as the kernel vouches
//! (`local_peer`): a drain stops the node's meshed traffic, so no other
//! process on the node, root or not, may ask for one. `weft-proxy admin`
//! is the client.
//!
//! - `GET /config_dump`: the proxy's settings, the control-plane link, the
//!   applied config version (and the last refused one), trust domain, and
//!   every local workload, remote workload and service with all fields.
//! - `GET /certs`: the workload certificates the node holds, with validity
//!   and renewal times.
//! - `GET /logging`: the log filter in force; `POST /logging?level=<filter>`
//!   replaces it (EnvFilter syntax, e.g. `info,weft_proxy::dataplane=debug`).
//! - `POST /drain`: what SIGTERM does: stop accepting, let open connections
//!   finish within the drain deadline, exit (the pods' capture stays: their
//!   TCP is refused until a proxy serves them again).
//! - `GET /healthz`: `ok`.

use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ProxyConfig;
use crate::certificates::CertificateMap;
use crate::control_plane::{ControlPlaneStatus, ViewReceiver};
use crate::http_server::{self, Connection, LocalCaller, text};
use crate::listening::Listening;
use crate::logging::LogFilter;
use crate::node_view::NodeView;
use crate::wall_clock::{rfc3339, seconds_until};

/// What the admin endpoint reads from; each part is a live view.
pub(crate) struct AdminState {
    /// The proxy's settings.
    pub(crate) config: Arc<ProxyConfig>,
    /// The applied config.
    pub(crate) view: ViewReceiver,
    /// The link to the control plane.
    pub(crate) status: watch::Receiver<ControlPlaneStatus>,
    /// The workload certificates.
    pub(crate) certificates: watch::Receiver<CertificateMap>,
    /// The process's log filter, when the proxy installed the subscriber.
    pub(crate) log_filter: Option<LogFilter>,
    /// Set to true to ask the proxy to drain and exit.
    pub(crate) drain_requested: watch::Sender<bool>,
    /// Where the endpoint counts what it refuses.
    pub(crate) rejections: crate::rejections::Rejections,
    /// How often refusals are logged.
    pub(crate) warnings: Arc<crate::warnings::WarningLimiter>,
    /// The admin socket (non-blocking), served beside the TCP port.
    pub(crate) socket: Option<std::os::unix::net::UnixListener>,
}

/// Serves admin requests on `listener` (non-blocking) while it is this
/// process's turn (see [`Listening`]).
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    mut state: AdminState,
    listening: Listening,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin endpoint: cannot use its listener");
            return;
        }
    };
    let endpoint = http_server::Endpoint {
        name: "admin",
        limits: state.config.http_limits.clone(),
        rejections: state.rejections.clone(),
    };
    let socket = state.socket.take();
    let state = Arc::new(state);
    let handler: http_server::Handler = Arc::new(move |request| respond(request, &state));
    if let Some(socket) = socket.and_then(|socket| {
        tokio::net::UnixListener::from_std(socket)
            .inspect_err(|error| tracing::error!(%error, "admin socket: cannot use its listener"))
            .ok()
    }) {
        let unix_endpoint = http_server::Endpoint {
            name: "admin_socket",
            ..endpoint.clone()
        };
        tokio::spawn(http_server::serve_unix(
            socket,
            unix_endpoint,
            handler.clone(),
        ));
    }
    http_server::serve(listener, endpoint, handler, listening).await;
}

fn respond(request: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let method = request.method();
    if let Err(refusal) = host_is_local(request) {
        if let Some(suppressed) = state.warnings.allow("admin_host") {
            tracing::warn!(reason = %refusal, suppressed, "admin: refused a request");
        }
        return http_server::respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            format!("{refusal}\n"),
        );
    }
    if method == Method::POST
        && let Err(refusal) = may_change(request)
    {
        if let Some(suppressed) = state.warnings.allow("admin_post") {
            tracing::warn!(reason = %refusal, path = request.uri().path(), suppressed,
                "admin: refused a POST");
        }
        return http_server::respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            format!("{refusal}\n"),
        );
    }
    match (request.uri().path(), method) {
        ("/healthz", &Method::GET) => text(StatusCode::OK, "ok"),
        ("/config_dump", &Method::GET) => json_response(config_dump(state)),
        ("/certs", &Method::GET) => {
            json_response(certs(&state.certificates.borrow(), SystemTime::now()))
        }
        ("/logging", &Method::GET) => match &state.log_filter {
            Some(filter) => json_response(json!({ "level": filter.current() })),
            None => no_log_filter(),
        },
        ("/logging", &Method::POST) => set_log_level(request.uri().query(), state),
        ("/drain", &Method::POST) => {
            state.drain_requested.send_replace(true);
            tracing::info!("drain requested on the admin endpoint");
            text(
                StatusCode::ACCEPTED,
                "draining: new connections are refused, open ones get the drain \
                 deadline, then the capture rules go and the proxy exits\n",
            )
        }
        ("/healthz" | "/config_dump" | "/certs", _) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n")
        }
        ("/logging", _) => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
        ("/drain", _) => text(StatusCode::METHOD_NOT_ALLOWED, "only POST is served here\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /config_dump, /certs, /logging, /drain or /healthz\n",
        ),
    }
}

/// Whether `request` may change the proxy: only on the admin socket, from
/// a caller [`crate::local_peer`] trusts.
fn may_change(request: &Request<Incoming>) -> Result<(), String> {
    match request.extensions().get::<LocalCaller>() {
        Some(LocalCaller::Trusted { pid, uid }) => {
            tracing::info!(pid, uid, "admin: a change from the proxy's container");
            Ok(())
        }
        Some(LocalCaller::Untrusted(why)) => Err(why.clone()),
        None => Err(
            "refused: the proxy is changed only through its admin socket \
             (--admin-socket), from its own container: `weft-proxy admin drain`"
                .into(),
        ),
    }
}

/// Whether a request on the TCP port names this endpoint as its host: a
/// web page that had the browser resolve its own name to 127.0.0.1 (DNS
/// rebinding) sends its own name, and is refused before it can read
/// anything. A request without a Host header (HTTP/1.0) is taken.
fn host_is_local(request: &Request<Incoming>) -> Result<(), String> {
    let Some(connection) = request.extensions().get::<Connection>() else {
        return Ok(()); // the admin socket
    };
    let Some(host) = request.headers().get(hyper::header::HOST) else {
        return Ok(());
    };
    let host = host.to_str().unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
            if port.parse::<u16>().is_ok() {
                name
            } else {
                host
            }
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let local = connection.local.ip().to_string();
    if name.eq_ignore_ascii_case("localhost")
        || name == local
        || name == "127.0.0.1"
        || name == "::1"
    {
        Ok(())
    } else {
        Err(format!(
            "refused: Host {host:?} is not this endpoint (localhost or {local})"
        ))
    }
}

/// `POST /logging?level=<filter>`.
fn set_log_level(query: Option<&str>, state: &AdminState) -> Response<Full<Bytes>> {
    let Some(filter) = &state.log_filter else {
        return no_log_filter();
    };
    let level = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "level")
        .map(|(_, value)| value.into_owned());
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "say which filter: POST /logging?level=<filter>, e.g. level=info,weft_proxy=debug\n",
        );
    };
    let before = filter.current();
    match filter.set(&level) {
        Ok(()) => {
            tracing::info!(%before, after = %level, "log filter changed on the admin endpoint");
            json_response(json!({ "level": level, "before": before }))
        }
        Err(error) => {
            tracing::warn!(%error, "refused a log filter from the admin endpoint");
            http_server::respond(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                format!("{error}\n"),
            )
        }
    }
}

fn no_log_filter() -> Response<Full<Bytes>> {
    text(
        StatusCode::NOT_IMPLEMENTED,
        "this process did not install its log subscriber through weft-proxy\n",
    )
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
        "log_level": state.log_filter.as_ref().map(LogFilter::current),
        "drain_requested": *state.drain_requested.borrow(),
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
        "authorization_policies": view.map_or(json!({}), |v| {
            v.authorization_policies()
                .iter()
                .map(|(key, policy)| (key.to_string(), crate::node_view::policy_summary(policy)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        }),
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
fn listed<T: Serialize + crate::node_view::HasKey + PartialEq>(
    map: &crate::node_view::Keyed<T>,
) -> Value {
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
