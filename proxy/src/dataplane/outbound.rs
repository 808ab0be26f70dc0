//! Outbound (15001): TCP captured as it leaves a local pod. Find where it
//! was going, then carry it: through an HBONE tunnel to a meshed pod on
//! another node, straight to a meshed pod on this node (after the
//! authorization gate, which the destination's proxy would otherwise have
//! run: here the destination's proxy is this one), or as plain TCP to
//! anything outside the mesh. Every path dials from the source pod's IP, so
//! the destination sees the real client.
//!
//! A connection to a Service follows the Service's TrafficPolicy: the
//! connection limit and split (in [`RouteTable::resolve`]), the endpoint
//! choice, the connect timeout, retries of a failed connect on endpoints not
//! tried yet, outlier ejection, and the idle timeout.
//!
//! A tunnel carries the client's first bytes with its `CONNECT` when they
//! are already there (early data, [`EARLY_DATA_LIMIT`]), so a new
//! connection's first request does not wait for the tunnel's answer to
//! cross back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::DataPlane;
use super::gate::{self, GateRequest, Path};
use super::idle::{Activity, idle_timeout};
use super::reauthorize::Registration;
use super::routes::{Destination, NoRoute, Route, RouteTable};
use super::telemetry::{ConnectionRecord, Direction, Metered, Peer, Security};
use crate::hbone::{
    BAGGAGE, EarlyData, HBONE_PORT, HboneError, HboneRequest, HboneStream, TRACEPARENT, TraceParent,
};
use crate::node_view::Workload;

/// How long opening a connection to one endpoint (for a tunnel: dial, TLS,
/// HTTP/2, CONNECT and its answer) may take, unless a TrafficPolicy says.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves captured connections (see [`super::next_connection`] for the drain).
pub async fn serve(listener: TcpListener, plane: Arc<DataPlane>, pod: super::ListenerPod) {
    super::serve_captured(listener, plane, "outbound", pod, proxy).await;
}

/// Early data: at most this much of what the client sent before its tunnel
/// opens goes with the `CONNECT`. A request or a TLS ClientHello fits; the
/// rest of a large upload follows the 200 as usual.
pub const EARLY_DATA_LIMIT: usize = 16 * 1024;

/// The captured connection and what is known of it.
struct Client {
    stream: TcpStream,
    addr: SocketAddr,
    /// The local workload it comes from, if the config knows it.
    source: Option<Arc<Workload>>,
    /// What the client had sent when the first tunnel was tried, read once
    /// without waiting (a server-first protocol sends nothing, and must not
    /// be held up). The bytes are out of the socket from then on, so every
    /// attempt after that must deliver them: a tunnel sends them with its
    /// `CONNECT`, a direct connection writes them first. And once they may
    /// have arrived somewhere, no attempt may follow.
    early: Option<EarlyData>,
}

impl Client {
    /// The early data, reading it on the first call.
    fn read_early(&mut self) -> &EarlyData {
        let stream = &self.stream;
        self.early.get_or_insert_with(|| {
            let mut buf = [0u8; EARLY_DATA_LIMIT];
            EarlyData::new(match stream.try_read(&mut buf) {
                Ok(n) => Bytes::copy_from_slice(&buf[..n]),
                // Nothing yet (WouldBlock), or an error the relay will
                // meet again on its first read.
                Err(_) => Bytes::new(),
            })
        })
    }

    /// The early bytes already read, if any.
    fn early_taken(&self) -> &[u8] {
        self.early.as_ref().map_or(&[], |early| early.bytes())
    }

    /// Whether a failed attempt may have delivered the early bytes, so
    /// that another attempt could deliver them twice.
    fn early_may_have_arrived(&self) -> bool {
        self.early.as_ref().is_some_and(EarlyData::may_have_arrived)
    }
}

/// An open connection towards the destination.
enum Upstream {
    /// A tunnel, and the trace id its `CONNECT` carried.
    Tunnel(HboneStream, Peer, TraceParent),
    /// A direct connection; one into a meshed pod of this node is watched
    /// for policy changes while the registration lives.
    Direct(TcpStream, Peer, Security, Option<Registration>),
}

/// Why a connect did not work: whether another endpoint may do better.
enum ConnectError {
    /// The endpoint failed (refused, unreachable, timed out, ...).
    Endpoint(&'static str),
    /// Nothing to do with the endpoint (no certificate yet).
    Local(&'static str),
    /// The destination pod's policy refuses the client (counted and
    /// logged where it was found). Another endpoint may admit it.
    Denied,
}

async fn proxy(
    plane: Arc<DataPlane>,
    pod: super::ListenerPod,
    stream: TcpStream,
    client_addr: SocketAddr,
    destination: SocketAddr,
) {
    let mut routes = plane.routes.current();
    let mut source = pod.workload(&routes, client_addr.ip()).cloned();
    if source.is_none() {
        // Captured, so a meshed pod as far as the capture knows, but not in
        // the applied config (none yet: a proxy that started on the sets
        // its predecessor left, without kept state). Never sent on as an
        // unknown client's (nor as the deleted pod whose address it took):
        // it waits for a config that knows it, or ends.
        let (table, pod) = plane.with_local_pod(&pod, client_addr.ip()).await;
        let Some(pod) = pod else {
            warn!("outbound: the source is no pod of this node's config; closing");
            plane.metrics.failure(Direction::Outbound, "unknown_source");
            return;
        };
        (routes, source) = (table, Some(pod));
    }
    if let Some(meshed) = source.as_ref().filter(|w| w.meshed())
        && routes.may_tunnel(destination)
    {
        // A pod's first connections (an init container's) can come before
        // its certificate: they wait for it here, before any endpoint's
        // connect timeout runs, and go meshed (or fail) once it is there.
        if plane.certificates_with(meshed.identity()).await.is_some() {
            routes = plane.routes.current();
        }
    }
    let mut client = Client {
        stream,
        addr: client_addr,
        source,
        early: None,
    };
    let mut connection = match routes.resolve(destination) {
        Ok(Destination::Service(connection)) => connection,
        Ok(Destination::Direct(route)) => {
            let connected = tokio::time::timeout(
                DEFAULT_CONNECT_TIMEOUT,
                connect(&plane, &routes, &mut client, &route),
            )
            .await
            .unwrap_or(Err(ConnectError::Endpoint("connect_timeout")));
            match connected {
                Ok(upstream) => {
                    relay(&plane, &mut client, &route, upstream, None).await;
                }
                Err(ConnectError::Endpoint(reason) | ConnectError::Local(reason)) => {
                    plane.metrics.failure(Direction::Outbound, reason);
                }
                Err(ConnectError::Denied) => {}
            }
            return;
        }
        Err(reason @ NoRoute::MaxConnections { .. }) => {
            info!(%reason, "outbound: refused");
            plane
                .metrics
                .failure(Direction::Outbound, "max_connections");
            return;
        }
        Err(reason) => {
            warn!(%reason, "outbound: no route");
            plane.metrics.failure(Direction::Outbound, "no_route");
            return;
        }
    };
    let policy = connection.policy.clone();
    let attempts = 1 + policy.as_ref().map_or(0, |p| p.retry_attempts);
    let timeout = policy
        .as_ref()
        .and_then(|p| p.connect_timeout)
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    for attempt in 0..attempts {
        let Some((route, lease)) = routes.next_endpoint(&mut connection, Instant::now()) else {
            debug!(attempt, "outbound: no endpoint left to try");
            break;
        };
        let started = Instant::now();
        let connected =
            tokio::time::timeout(timeout, connect(&plane, &routes, &mut client, &route))
                .await
                .unwrap_or_else(|_| {
                    debug!(?timeout, target = %route.target, "outbound: connect timed out");
                    Err(ConnectError::Endpoint("connect_timeout"))
                });
        match connected {
            Ok(upstream) => {
                lease.succeeded(started.elapsed());
                let idle = policy.as_ref().and_then(|p| p.idle_timeout);
                relay(&plane, &mut client, &route, upstream, idle).await;
                drop(lease);
                return;
            }
            Err(ConnectError::Local(reason)) => {
                plane.metrics.failure(Direction::Outbound, reason);
                return;
            }
            // As a tunnel's 401 would: the next endpoint may admit it, and
            // nothing of the client's has been sent anywhere.
            Err(ConnectError::Denied) => {}
            Err(ConnectError::Endpoint(reason)) => {
                plane.metrics.failure(Direction::Outbound, reason);
                let outlier = policy.as_ref().and_then(|p| p.outlier.as_ref());
                let ip = lease.ip();
                if lease.failed(outlier, connection.endpoints(), Instant::now()) {
                    warn!(endpoint = %ip, service = connection.target(), "outbound: endpoint ejected");
                    plane.metrics.ejection(connection.target());
                }
                if client.early_may_have_arrived() {
                    // Better to fail the connection than to run the
                    // client's first request twice.
                    info!(endpoint = %ip, "outbound: not retrying: the endpoint may have the client's first bytes");
                    return;
                }
            }
        }
    }
    debug!(service = %connection.addressed, "outbound: every attempt failed");
}

/// Opens the connection `route` decided on: a tunnel between meshed pods
/// on different nodes, else a direct connection from the client's address.
/// Either way the client's early bytes are on their way when it returns.
async fn connect(
    plane: &DataPlane,
    routes: &RouteTable,
    client: &mut Client,
    route: &Route,
) -> Result<Upstream, ConnectError> {
    let client_addr = client.addr;
    let meshed_source = client.source.as_ref().filter(|w| w.meshed());
    let meshed_destination = route.workload.as_ref().filter(|w| w.meshed());
    match (meshed_source, meshed_destination) {
        (Some(src), Some(dst)) if !route.local => {
            let certificates = plane.certificates.borrow().clone();
            let Some(certificate) = certificates.get(src.identity()) else {
                warn!(identity = %src.identity(), "outbound: no certificate for the source identity");
                return Err(ConnectError::Local("no_certificate"));
            };
            let trace = TraceParent::random();
            let request = HboneRequest {
                certificate: match &routes.trust {
                    Some(trust) => certificate.with_trust(trust.clone()),
                    None => certificate.clone(),
                },
                destination_identity: dst.identity().clone(),
                hbone_addr: SocketAddr::new(route.target.ip(), HBONE_PORT),
                target: route.target,
                source_ip: Some(client_addr.ip()),
                forwarded_for: Some(client_addr),
                service_host: route.service.clone(),
                headers: telemetry_headers(&plane.cluster_name, src, trace),
            };
            // Dial, handshakes and the CONNECT's answer together; the
            // caller bounds the time.
            let early = client.read_early();
            match plane.pool.connect_sending(request, early).await {
                Ok(tunnel) => Ok(Upstream::Tunnel(tunnel, Peer::workload(dst), trace)),
                Err(HboneError::Refused { status, .. })
                    if status == http::StatusCode::UNAUTHORIZED =>
                {
                    // The destination's policy refused this client: nothing
                    // wrong with the endpoint, so no outlier failure (a
                    // denied client must not get endpoints ejected for
                    // everyone on its node).
                    info!(destination = %route.target, "outbound: denied by the destination's policy");
                    plane.metrics.failure(Direction::Outbound, "connect_denied");
                    Err(ConnectError::Denied)
                }
                Err(error) => {
                    warn!(%error, "outbound: HBONE tunnel failed");
                    Err(ConnectError::Endpoint(failure_reason(&error)))
                }
            }
        }
        _ => {
            // Same node, or not both meshed: a direct connection from the
            // client's own address. Into a meshed pod of this node it passes
            // the gate first, with the source's identity from the node's
            // config (or none: plaintext), exactly as a tunnel would at the
            // destination; it never leaves the node.
            let (fresh, local_destination) = local_destination(plane, routes, route).await?;
            let routes = fresh.as_deref().unwrap_or(routes);
            let local_destination = local_destination.as_ref();
            let security = match (local_destination, meshed_source) {
                (Some(_), Some(_)) => Security::NodeLocal,
                _ => Security::None,
            };
            let principal = local_destination
                .and(meshed_source)
                .map(|w| w.identity().to_string());
            let request = local_destination.map(|workload| {
                let path = if principal.is_some() {
                    Path::NodeLocal
                } else {
                    Path::Plaintext
                };
                let request = GateRequest {
                    path,
                    principal: principal.as_deref(),
                    source: client_addr,
                    destination: route.target,
                };
                (workload, request)
            });
            if let Some((workload, request)) = &request
                && gate::admit(routes, &plane.metrics, workload, request).is_err()
            {
                return Err(ConnectError::Denied);
            }
            let mut upstream = match plane
                .pods
                .connect(Some(client_addr.ip()), route.target)
                .await
            {
                Ok(upstream) => upstream,
                Err(error) => {
                    debug!(%error, target = %route.target, "outbound: connect failed");
                    return Err(ConnectError::Endpoint("connect_failed"));
                }
            };
            // Watched for policy changes from now on, and decided again if
            // one was applied since the gate's decision; before any byte
            // of the client's is written.
            let registration = match &request {
                Some((workload, request)) => match plane.inbound.register_admitted(
                    &plane.routes,
                    &plane.metrics,
                    (routes.generation, &workload.uid),
                    &upstream,
                    request,
                ) {
                    Ok(registration) => registration,
                    Err(_) => return Err(ConnectError::Denied),
                },
                None => None,
            };
            // Bytes an earlier (tunnel) attempt took from the client.
            if let Err(error) = upstream.write_all(client.early_taken()).await {
                debug!(%error, target = %route.target, "outbound: connect failed");
                return Err(ConnectError::Endpoint("connect_failed"));
            }
            let peer = local_destination
                .or(route.workload.as_ref())
                .map(Peer::workload)
                .unwrap_or_default();
            Ok(Upstream::Direct(upstream, peer, security, registration))
        }
    }
}

/// The meshed pod of this node that `route` addresses directly, which the
/// gate decides for, and the table it was found in if newer than `routes`.
///
/// A pod this proxy serves is the pod that holds the address now: one the
/// config does not name yet (or still names as the deleted pod whose
/// address it took) is waited for, as its own listeners would wait, and
/// the connection refused if its config does not come. Without this, a
/// direct connection into a new pod would pass no gate at all.
async fn local_destination(
    plane: &DataPlane,
    routes: &RouteTable,
    route: &Route,
) -> Result<(Option<Arc<RouteTable>>, Option<Arc<Workload>>), ConnectError> {
    let ip = route.target.ip();
    let Some(pod) = plane.pods.served(ip) else {
        let configured = route
            .workload
            .as_ref()
            .filter(|w| route.local && w.meshed());
        return Ok((None, configured.cloned()));
    };
    if let Some(workload) = pod.workload(routes, ip).filter(|w| w.meshed()) {
        return Ok((None, Some(workload.clone())));
    }
    match plane.with_local_pod(&pod, ip).await {
        (table, Some(workload)) => Ok((Some(table), Some(workload))),
        (_, None) => {
            // This endpoint's failure: another endpoint of a Service may do.
            warn!(target = %route.target, pod = %pod.uid, "outbound: no config for the local pod addressed");
            Err(ConnectError::Endpoint("no_local_workload"))
        }
    }
}

/// Carries the connection until both directions end, or until it has been
/// idle for `idle`.
async fn relay(
    plane: &DataPlane,
    client: &mut Client,
    route: &Route,
    upstream: Upstream,
    idle: Option<Duration>,
) {
    let source_peer = client
        .source
        .as_ref()
        .map(Peer::workload)
        .unwrap_or_default();
    let client_addr = client.addr;
    // Already upstream: sent with the tunnel's CONNECT, or written first.
    let early_len = client.early_taken().len();
    let client = &mut client.stream;
    let open = |security, peer: &Peer| {
        ConnectionRecord::open(
            &plane.metrics,
            Direction::Outbound,
            security,
            (client_addr, &source_peer),
            (route.target, peer),
            route.service.as_deref(),
        )
    };
    let activity = Activity::default();
    let relayed = async {
        match upstream {
            Upstream::Tunnel(tunnel, peer, trace) => {
                let record = open(Security::MutualTls, &peer).traced(trace);
                let metered =
                    Metered::new(activity.watch(tunnel), record).already_written(early_len);
                super::relay(client, metered).await;
            }
            Upstream::Direct(stream, peer, security, registration) => {
                let record = open(security, &peer);
                let metered = Metered::new(activity.watch(stream), record)
                    .already_written(early_len)
                    .keeping(registration);
                super::relay(client, metered).await;
            }
        }
    };
    tokio::select! {
        () = relayed => {}
        () = idle_timeout(&activity, idle) => {
            debug!(?idle, "outbound: idle timeout, closing");
            plane.metrics.failure(Direction::Outbound, "idle_timeout");
        }
    }
}

/// The `baggage` (who `source` is) and `traceparent` a tunnel's `CONNECT`
/// carries.
fn telemetry_headers(cluster: &str, source: &Workload, trace: TraceParent) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Some(baggage) = super::baggage::for_source(cluster, source).header() {
        headers.insert(BAGGAGE, baggage);
    }
    headers.insert(TRACEPARENT, trace.header());
    headers
}

/// A short, label-safe reason for a tunnel that could not be opened.
fn failure_reason(error: &HboneError) -> &'static str {
    match error {
        HboneError::SharedDial(inner) => failure_reason(inner),
        HboneError::Dial { .. } => "connect_failed",
        HboneError::ConnectTimeout { .. } => "connect_timeout",
        HboneError::TlsConfig { .. } => "tls_config",
        HboneError::TlsHandshake { .. } | HboneError::TlsAccept { .. } => "handshake_failed",
        HboneError::PeerIdentity { .. } => "peer_identity",
        HboneError::Refused { .. } => "connect_refused",
        _ => "tunnel_failed",
    }
}
