//! Inbound HBONE (15008): tunnels arriving for this node's pods. The
//! connection's local address says which pod is addressed; the proxy
//! presents that pod's certificate, verifies the client, and opens each
//! CONNECT to the pod from the source pod's IP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};
use weft_certs::{Identity, WorkloadCertificate};

use super::DataPlane;
use super::gate::{self, GateRequest, Path};
use super::routes::RouteTable;
use super::telemetry::{ConnectionRecord, Direction, Metered, Peer, Security};
use crate::certificates::CertificateMap;

use crate::hbone::{self, HboneError, InboundHandler, InboundRequest, Refusal};

/// What a cached server config was built from: the certificate (by its
/// issue time) and the config version whose roots it trusts.
type ConfigKey = (std::time::SystemTime, u64);

/// Server configs per local identity, built once per certificate and roots.
#[derive(Default)]
pub struct ServerConfigs {
    by_identity: Mutex<HashMap<Identity, (ConfigKey, Arc<ServerConfig>)>>,
}

impl ServerConfigs {
    /// The config presenting `certificate`, cached until the certificate changes.
    fn get(
        &self,
        certificate: &WorkloadCertificate,
        routes: &RouteTable,
        certificates: &CertificateMap,
        key_exchange: weft_certs::KeyExchange,
    ) -> Result<Arc<ServerConfig>, weft_certs::Error> {
        let mut cache = self
            .by_identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Identities that left the node take their configs (and keys) along.
        cache.retain(|identity, _| certificates.contains_key(identity));
        let key = (certificate.not_before(), routes.generation);
        if let Some((cached, config)) = cache.get(certificate.identity())
            && *cached == key
        {
            return Ok(config.clone());
        }
        let certificate = match &routes.trust {
            Some(trust) => certificate.with_trust(trust.clone()),
            None => certificate.clone(),
        };
        let config = weft_certs::hbone_server_config(&certificate, key_exchange)?;
        cache.insert(certificate.identity().clone(), (key, config.clone()));
        Ok(config)
    }
}

/// Serves captured connections (see [`super::next_connection`] for the drain).
pub async fn serve(listener: TcpListener, plane: Arc<DataPlane>, pod: super::ListenerPod) {
    super::serve_captured(listener, plane, "hbone", pod, accept_tunnel).await;
}

async fn accept_tunnel(
    plane: Arc<DataPlane>,
    pod: super::ListenerPod,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    // Anyone who reaches the pod can open a connection here and say
    // nothing: from the first byte to the end of the handshake, a
    // connection holds a handshake slot of its source's and the node's,
    // and has a deadline to start and one to finish.
    let handshaking = match plane.admission.handshake(peer.ip()) {
        Ok(handshaking) => handshaking,
        Err(refused) => {
            if let Some(suppressed) = plane.warnings.allow(refused.reason()) {
                warn!(
                    reason = refused.reason(),
                    suppressed, "inbound: too many TLS handshakes; refused"
                );
            }
            crate::copy::reset_on_close(&tcp);
            return;
        }
    };
    let (routes, workload) = plane.with_local_pod(&pod, local.ip()).await;
    let Some(workload) = workload else {
        warn!("inbound: no meshed local pod has this address");
        plane
            .metrics
            .failure(Direction::Inbound, "no_local_workload");
        return;
    };
    let certificates = plane
        .certificates_with(workload.identity())
        .await
        .unwrap_or_default();
    let Some(certificate) = certificates.get(workload.identity()) else {
        warn!(identity = %workload.identity(), "inbound: no certificate for the addressed pod");
        plane.metrics.failure(Direction::Inbound, "no_certificate");
        return;
    };
    let config = match plane.server_configs.get(
        certificate,
        &routes,
        &certificates,
        plane.hbone.key_exchange,
    ) {
        Ok(config) => config,
        Err(error) => {
            warn!(%error, "inbound: cannot build the TLS config");
            plane.metrics.failure(Direction::Inbound, "tls_config");
            return;
        }
    };
    let limits = plane.admission.limits();
    let deadlines = hbone::HandshakeDeadlines {
        start: limits.handshake_start_timeout(),
        finish: limits.handshake_timeout(),
    };
    let tls = match hbone::accept_tls_within(tcp, config, deadlines).await {
        Ok(tls) => tls,
        Err(HboneError::TlsAccept { failure, .. }) => {
            let reason = handshake_failure(&failure);
            if let Some(suppressed) = plane.warnings.allow(reason) {
                warn!(error = %failure, reason, suppressed, "inbound: TLS handshake refused");
            }
            plane.metrics.failure(Direction::Inbound, reason);
            return;
        }
        Err(error @ HboneError::HandshakeTimeout { .. }) => {
            if let Some(suppressed) = plane.warnings.allow("handshake_timeout") {
                warn!(%error, suppressed, "inbound: TLS handshake timed out");
            }
            plane
                .admission
                .count_rejection("hbone", "handshake_timeout");
            return;
        }
        Err(error) => {
            if let Some(suppressed) = plane.warnings.allow("handshake_failed") {
                warn!(%error, suppressed, "inbound: TLS handshake failed");
            }
            plane
                .metrics
                .failure(Direction::Inbound, "handshake_failed");
            return;
        }
    };
    drop(handshaking);
    // An authenticated peer holds connections within its identity's cap.
    let _peer = match weft_certs::peer_identity(tls.get_ref().1) {
        Ok(identity) => match plane.admission.peer(&identity) {
            Ok(admitted) => Some(admitted),
            Err(refused) => {
                if let Some(suppressed) = plane.warnings.allow(refused.reason()) {
                    warn!(peer_identity = %identity, reason = refused.reason(), suppressed,
                        "inbound: the peer holds too many connections; refused");
                }
                return;
            }
        },
        // `serve_connection` refuses it, saying why.
        Err(_) => None,
    };
    let handler = Arc::new(InboundTunnel {
        plane: plane.clone(),
        pod,
    });
    let served =
        hbone::serve_connection(tls, local, handler, plane.drain.signal(), &plane.hbone).await;
    match served {
        Ok(()) => {}
        Err(error @ HboneError::WindowBudget { .. }) => {
            if let Some(suppressed) = plane.warnings.allow("window_budget") {
                warn!(%error, suppressed, "inbound: the HBONE window budget is used up; refused");
            }
            plane.admission.count_rejection("hbone", "window_budget");
        }
        Err(error) => debug!(%error, "inbound: tunnel connection ended with an error"),
    }
}

/// Decides each CONNECT of an inbound connection: the addressed pod must be
/// a meshed pod of this node, and the source address must belong to the
/// identity that proved itself in the handshake.
struct InboundTunnel {
    plane: Arc<DataPlane>,
    /// The pod whose listener accepted the tunnel.
    pod: super::ListenerPod,
}

impl InboundHandler for InboundTunnel {
    type Upstream = Metered<TcpStream>;

    async fn connect(&self, request: &InboundRequest) -> Result<Metered<TcpStream>, Refusal> {
        let plane = &self.plane;
        let routes = plane.routes.current();
        let Some(workload) = self
            .pod
            .workload(&routes, request.target.ip())
            .filter(|w| w.meshed())
            .cloned()
        else {
            plane
                .metrics
                .failure(Direction::Inbound, "no_local_workload");
            return Err(Refusal::Unavailable(
                "no meshed pod with this address on this node".into(),
            ));
        };
        // The tunnel carries the source pod's IP: a workload with another
        // identity's certificate must not speak for that address.
        let peer = request.peer_address;
        let source = routes.workload(peer.ip()).cloned();
        if source.as_ref().map(|w| w.identity()) != Some(&request.peer_identity) {
            warn!(
                peer = %peer,
                peer_identity = %request.peer_identity,
                address_owner = source.as_ref().map(|w| w.identity().to_string()).unwrap_or_default(),
                "inbound: the peer's identity does not own its source address"
            );
            plane
                .metrics
                .failure(Direction::Inbound, "identity_address_mismatch");
            return Err(Refusal::Denied(format!(
                "{} does not own source address {}",
                request.peer_identity,
                peer.ip()
            )));
        }
        let principal = request.peer_identity.to_string();
        let gate = GateRequest {
            path: Path::Hbone,
            principal: Some(&principal),
            source: peer,
            destination: request.target,
        };
        if let Err(decision) = gate::admit(&routes, &plane.metrics, &workload, &gate) {
            return Err(Refusal::Denied(decision.to_string()));
        }
        // Each stream is a connection to the pod: counted like one, so a
        // peer's streams take the pod's and the source's share, not more.
        let admitted = plane
            .admission
            .connection("hbone", &self.pod.admission_key(), Some(peer.ip()))
            .map_err(|refused| {
                if let Some(suppressed) = plane.warnings.allow(refused.reason()) {
                    warn!(%peer, destination = %request.target, reason = refused.reason(),
                        suppressed, "inbound: a connection limit was reached; stream refused");
                }
                Refusal::Unavailable(format!(
                    "a connection limit was reached: {}",
                    refused.reason()
                ))
            })?;
        let upstream = match plane.pods.connect(Some(peer.ip()), request.target).await {
            Ok(upstream) => upstream,
            Err(error) => {
                plane.metrics.failure(Direction::Inbound, "connect_failed");
                return Err(Refusal::Unavailable(format!("the pod refused: {error}")));
            }
        };
        let registration = plane.inbound.register_admitted(
            &plane.routes,
            &plane.metrics,
            (routes.generation, &workload.uid),
            &upstream,
            &gate,
        );
        let registration = match registration {
            Ok(registration) => registration,
            Err(decision) => return Err(Refusal::Denied(decision.to_string())),
        };
        let claimed = super::baggage::vouched_by(
            request.baggage.clone(),
            &request.peer_identity,
            source.as_deref(),
        );
        let source = Peer {
            workload: source,
            principal: Some(principal),
            claimed,
        };
        // The Service the client says it addressed, if the config agrees
        // that this pod and port are behind it (a peer can still name
        // another Service with the same pod and port behind it).
        let service = request
            .service_host
            .as_deref()
            .and_then(|host| routes.service_with_endpoint(host, request.target));
        let record = ConnectionRecord::open(
            &plane.metrics,
            Direction::Inbound,
            Security::MutualTls,
            (peer, &source),
            (request.target, &Peer::workload(&workload)),
            service.as_deref(),
        )
        .traced(request.trace);
        Ok(Metered::new(upstream, record)
            .keeping(registration)
            .admitted(admitted))
    }
}

/// A short, label-safe reason for a failed server handshake.
fn handshake_failure(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "handshake_io";
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "handshake_unknown_issuer"
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired) => "handshake_expired",
        rustls::Error::InvalidCertificate(_) => match weft_certs::refusal_reason(tls) {
            Some(weft_certs::Error::PeerTrustDomain { .. }) => "handshake_trust_domain",
            Some(weft_certs::Error::CertificateIdentity { .. }) => "handshake_no_identity",
            _ => "handshake_bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "handshake_no_certificate",
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon) => {
            "handshake_no_shared_key_exchange"
        }
        rustls::Error::InvalidMessage(_) => "handshake_garbage",
        _ => "handshake_failed",
    }
}
