//! Inbound plaintext (15006): TCP for a meshed local pod that did not come
//! through a tunnel, from an unmeshed client. The gate ([`super::gate`])
//! decides it as a source without a principal: refused when the pod's mTLS
//! mode is STRICT, otherwise (PERMISSIVE) by its authorization policies;
//! admitted connections are counted and logged as unauthenticated. A
//! refusal closes the connection: plaintext has no way to say why.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::DataPlane;
use super::gate::{self, GateRequest, Path};
use super::telemetry::{ConnectionRecord, Direction, Metered, Peer, Security};

/// Serves captured connections (see [`super::next_connection`] for the drain).
pub async fn serve(listener: TcpListener, plane: Arc<DataPlane>, pod: super::ListenerPod) {
    super::serve_captured(listener, plane, "plaintext", pod, proxy).await;
}

async fn proxy(
    plane: Arc<DataPlane>,
    pod: super::ListenerPod,
    mut client: TcpStream,
    client_addr: SocketAddr,
    destination: SocketAddr,
) {
    let mut routes = plane.routes.current();
    let mut workload = pod.workload(&routes, destination.ip()).cloned();
    if workload.is_none() {
        // Captured for a pod whose config has not arrived yet.
        (routes, workload) = plane.with_local_pod(&pod, destination.ip()).await;
    }
    let Some(workload) = workload else {
        debug!("inbound plaintext: not a local pod");
        plane
            .metrics
            .failure(Direction::Inbound, "no_local_workload");
        return;
    };
    // No principal: STRICT refuses it, and identity rules cannot match it.
    let gate = GateRequest {
        path: Path::Plaintext,
        principal: None,
        source: client_addr,
        destination,
    };
    if gate::admit(&routes, &plane.metrics, &workload, &gate).is_err() {
        return;
    }
    info!(pod = %workload.uid, "accepting unauthenticated plaintext for a meshed pod (PERMISSIVE)");
    let upstream = match plane
        .pods
        .connect(Some(client_addr.ip()), destination)
        .await
    {
        Ok(upstream) => upstream,
        Err(error) => {
            debug!(%error, "inbound plaintext: the pod refused");
            plane.metrics.failure(Direction::Inbound, "connect_failed");
            return;
        }
    };
    let registration = plane.inbound.register_admitted(
        &plane.routes,
        &plane.metrics,
        (routes.generation, &workload.uid),
        &upstream,
        &gate,
    );
    let Ok(registration) = registration else {
        return;
    };
    let record = ConnectionRecord::open(
        &plane.metrics,
        Direction::Inbound,
        Security::None,
        // Unauthenticated: the pod may be named from its address, but there
        // is no principal.
        (
            client_addr,
            &Peer {
                workload: routes.workload(client_addr.ip()).cloned(),
                principal: None,
                claimed: None,
            },
        ),
        (destination, &Peer::workload(&workload)),
        None,
    );
    super::relay(
        &mut client,
        Metered::new(upstream, record).keeping(registration),
    )
    .await;
}
