//! Outbound (15001): TCP captured as it leaves a local pod. Find where it
//! was going, then carry it: through an HBONE tunnel to a meshed pod on
//! another node, straight to a meshed pod on this node, or as plain TCP to
//! anything outside the mesh. Every path dials from the source pod's IP, so
//! the destination sees the real client.
//!
//! A connection to a Service follows the Service's TrafficPolicy: the
//! connection limit and split (in [`RouteTable::resolve`]), the endpoint
//! choice, the connect timeout, retries of a failed connect on endpoints not
//! tried yet, outlier ejection, and the idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::DataPlane;
use super::idle::{Activity, idle_timeout};
use super::routes::{Destination, NoRoute, Route, RouteTable};
use super::telemetry::{ConnectionRecord, Direction, Metered, Peer, Security};
use crate::hbone::{HBONE_PORT, HboneError, HboneRequest, HboneStream};
use crate::node_view::Workload;
use crate::sockets;

/// How long opening a connection to one endpoint (for a tunnel: dial, TLS,
/// HTTP/2, CONNECT and its answer) may take, unless a TrafficPolicy says.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves captured connections (see [`super::next_connection`] for the drain).
pub async fn serve(listener: TcpListener, plane: Arc<DataPlane>) {
    super::serve_captured(listener, plane, "outbound", proxy).await;
}

/// An open connection towards the destination.
enum Upstream {
    Tunnel(HboneStream, Peer),
    Direct(TcpStream, Peer, Security),
}

/// Why a connect did not work: whether another endpoint may do better.
enum ConnectError {
    /// The endpoint failed (refused, unreachable, timed out, ...).
    Endpoint(&'static str),
    /// Nothing to do with the endpoint (no certificate yet).
    Local(&'static str),
}

async fn proxy(
    plane: Arc<DataPlane>,
    mut client: TcpStream,
    client_addr: SocketAddr,
    destination: SocketAddr,
) {
    let routes = plane.routes.borrow().clone();
    let source = routes.local_workload(client_addr.ip()).cloned();
    let mut connection = match routes.resolve(destination) {
        Ok(Destination::Service(connection)) => connection,
        Ok(Destination::Direct(route)) => {
            let connected = tokio::time::timeout(
                DEFAULT_CONNECT_TIMEOUT,
                connect(&plane, &routes, client_addr, source.as_ref(), &route),
            )
            .await
            .unwrap_or(Err(ConnectError::Endpoint("connect_timeout")));
            match connected {
                Ok(upstream) => {
                    relay(
                        &plane,
                        &mut client,
                        client_addr,
                        source.as_ref(),
                        &route,
                        upstream,
                        None,
                    )
                    .await;
                }
                Err(ConnectError::Endpoint(reason) | ConnectError::Local(reason)) => {
                    plane.metrics.failure(Direction::Outbound, reason);
                }
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
        let connected = tokio::time::timeout(
            timeout,
            connect(&plane, &routes, client_addr, source.as_ref(), &route),
        )
        .await
        .unwrap_or_else(|_| {
            debug!(?timeout, target = %route.target, "outbound: connect timed out");
            Err(ConnectError::Endpoint("connect_timeout"))
        });
        match connected {
            Ok(upstream) => {
                lease.succeeded(started.elapsed());
                let idle = policy.as_ref().and_then(|p| p.idle_timeout);
                relay(
                    &plane,
                    &mut client,
                    client_addr,
                    source.as_ref(),
                    &route,
                    upstream,
                    idle,
                )
                .await;
                drop(lease);
                return;
            }
            Err(ConnectError::Local(reason)) => {
                plane.metrics.failure(Direction::Outbound, reason);
                return;
            }
            Err(ConnectError::Endpoint(reason)) => {
                plane.metrics.failure(Direction::Outbound, reason);
                let outlier = policy.as_ref().and_then(|p| p.outlier.as_ref());
                let ip = lease.ip();
                if lease.failed(outlier, connection.endpoints(), Instant::now()) {
                    warn!(endpoint = %ip, service = connection.target(), "outbound: endpoint ejected");
                    plane.metrics.ejection(connection.target());
                }
            }
        }
    }
    debug!(service = %connection.addressed, "outbound: every attempt failed");
}

/// Opens the connection `route` decided on: a tunnel between meshed pods
/// on different nodes, else a direct connection from the client's address.
async fn connect(
    plane: &DataPlane,
    routes: &RouteTable,
    client_addr: SocketAddr,
    source: Option<&Arc<Workload>>,
    route: &Route,
) -> Result<Upstream, ConnectError> {
    let meshed_source = source.filter(|w| w.meshed);
    let meshed_destination = route.workload.as_ref().filter(|w| w.meshed);
    match (meshed_source, meshed_destination) {
        (Some(src), Some(dst)) if !route.local => {
            let certificates = plane.certificates.borrow().clone();
            let Some(certificate) = certificates.get(&src.identity) else {
                warn!(identity = %src.identity, "outbound: no certificate yet for the source identity");
                return Err(ConnectError::Local("no_certificate"));
            };
            let request = HboneRequest {
                certificate: match &routes.trust {
                    Some(trust) => certificate.with_trust(trust.clone()),
                    None => certificate.clone(),
                },
                destination_identity: dst.identity.clone(),
                hbone_addr: SocketAddr::new(route.target.ip(), HBONE_PORT),
                target: route.target,
                source_ip: Some(client_addr.ip()),
                forwarded_for: Some(client_addr),
                headers: Default::default(),
            };
            // Dial, handshakes and the CONNECT's answer together; the
            // caller bounds the time.
            match plane.pool.connect(request).await {
                Ok(tunnel) => Ok(Upstream::Tunnel(tunnel, Peer::workload(dst))),
                Err(error) => {
                    warn!(%error, "outbound: HBONE tunnel failed");
                    Err(ConnectError::Endpoint(failure_reason(&error)))
                }
            }
        }
        _ => {
            // Same node, or not both meshed: a direct connection from the
            // client's own address. Same-node meshed traffic never leaves the
            // node, and both identities are known from the node's config.
            let security = if route.local && meshed_source.is_some() && meshed_destination.is_some()
            {
                Security::NodeLocal
            } else {
                Security::None
            };
            let dialled =
                sockets::connect_from(Some(client_addr.ip()), route.target, sockets::PROXY_MARK)
                    .await;
            match dialled {
                Ok(upstream) => {
                    let peer = route
                        .workload
                        .as_ref()
                        .map(Peer::workload)
                        .unwrap_or_default();
                    Ok(Upstream::Direct(upstream, peer, security))
                }
                Err(error) => {
                    debug!(%error, target = %route.target, "outbound: connect failed");
                    Err(ConnectError::Endpoint("connect_failed"))
                }
            }
        }
    }
}

/// Carries the connection until both directions end, or until it has been
/// idle for `idle`.
async fn relay(
    plane: &DataPlane,
    client: &mut TcpStream,
    client_addr: SocketAddr,
    source: Option<&Arc<Workload>>,
    route: &Route,
    upstream: Upstream,
    idle: Option<Duration>,
) {
    let source_peer = source.map(Peer::workload).unwrap_or_default();
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
            Upstream::Tunnel(tunnel, peer) => {
                let record = open(Security::MutualTls, &peer);
                super::relay(client, Metered::new(activity.watch(tunnel), record)).await;
            }
            Upstream::Direct(stream, peer, security) => {
                let record = open(security, &peer);
                super::relay(client, Metered::new(activity.watch(stream), record)).await;
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
