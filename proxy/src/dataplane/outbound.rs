//! Outbound (15001): TCP captured as it leaves a local pod. Find where it
//! was going, then carry it: through an HBONE tunnel to a meshed pod on
//! another node, straight to a meshed pod on this node, or as plain TCP to
//! anything outside the mesh. Every path dials from the source pod's IP, so
//! the destination sees the real client.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::DataPlane;
use super::telemetry::{ConnectionRecord, Direction, Metered, Peer, Security};
use crate::hbone::{HBONE_PORT, HboneError, HboneRequest};
use crate::sockets;

/// How long opening a tunnel (dial, TLS, HTTP/2, CONNECT and its answer)
/// may take.
const TUNNEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Serves captured connections (see [`super::next_connection`] for the drain).
pub async fn serve(listener: TcpListener, plane: Arc<DataPlane>) {
    super::serve_captured(listener, plane, "outbound", proxy).await;
}

async fn proxy(
    plane: Arc<DataPlane>,
    mut client: TcpStream,
    client_addr: SocketAddr,
    destination: SocketAddr,
) {
    let routes = plane.routes.borrow().clone();
    let source = routes.local_workload(client_addr.ip()).cloned();
    let route = match routes.route(destination) {
        Ok(route) => route,
        Err(reason) => {
            warn!(%reason, "outbound: no route");
            plane.metrics.failure(Direction::Outbound, "no_route");
            return;
        }
    };
    let source_peer = source.as_ref().map(Peer::workload).unwrap_or_default();
    let meshed_source = source.as_ref().filter(|w| w.meshed);
    let meshed_destination = route.workload.as_ref().filter(|w| w.meshed);
    let service = route.service.as_deref();

    match (meshed_source, meshed_destination) {
        (Some(src), Some(dst)) if !route.local => {
            let certificates = plane.certificates.borrow().clone();
            let Some(certificate) = certificates.get(&src.identity) else {
                warn!(identity = %src.identity, "outbound: no certificate yet for the source identity");
                plane.metrics.failure(Direction::Outbound, "no_certificate");
                return;
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
            // Dial, handshakes and the CONNECT's answer together; a peer
            // that never answers must not hold the client forever.
            let tunnel = match tokio::time::timeout(TUNNEL_TIMEOUT, plane.pool.connect(request))
                .await
            {
                Ok(Ok(tunnel)) => tunnel,
                Ok(Err(error)) => {
                    warn!(%error, "outbound: HBONE tunnel failed");
                    plane
                        .metrics
                        .failure(Direction::Outbound, failure_reason(&error));
                    return;
                }
                Err(_) => {
                    warn!(timeout = ?TUNNEL_TIMEOUT, "outbound: HBONE tunnel not answered in time");
                    plane.metrics.failure(Direction::Outbound, "tunnel_timeout");
                    return;
                }
            };

            let record = ConnectionRecord::open(
                &plane.metrics,
                Direction::Outbound,
                Security::MutualTls,
                (client_addr, &source_peer),
                (route.target, &Peer::workload(dst)),
                service,
            );
            super::relay(&mut client, Metered::new(tunnel, record)).await;
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
            let upstream = match sockets::connect_from(
                Some(client_addr.ip()),
                route.target,
                sockets::PROXY_MARK,
            )
            .await
            {
                Ok(upstream) => upstream,
                Err(error) => {
                    debug!(%error, target = %route.target, "outbound: connect failed");
                    plane.metrics.failure(Direction::Outbound, "connect_failed");
                    return;
                }
            };
            let destination_peer = route
                .workload
                .as_ref()
                .map(Peer::workload)
                .unwrap_or_default();
            let record = ConnectionRecord::open(
                &plane.metrics,
                Direction::Outbound,
                security,
                (client_addr, &source_peer),
                (route.target, &destination_peer),
                service,
            );
            super::relay(&mut client, Metered::new(upstream, record)).await;
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
