//! Open connections stay subject to policy. Every connection the proxy
//! forwards to a meshed local pod (HBONE, plaintext or node-local) is
//! registered here with what its authorization was decided on; when a new
//! config is applied, each is decided again by the gate
//! ([`super::gate`]), and the ones now refused (a new DENY, an ALLOW that no
//! longer matches, STRICT for plaintext) are closed.
//!
//! Closing marks the connection revoked and shuts down the socket to the
//! pod, which wakes the copy; the copy then fails on the mark (see
//! [`Registration::revoked`]) and aborts both ends, so the client reads a
//! reset, not the clean end of a transfer that policy cut. The registry
//! holds a duplicate of that socket's descriptor, so the socket it shuts
//! down is always the connection's own, never a reused descriptor.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tracing::warn;
use weft_api::authorization::{Decision, Outcome};

use super::gate::{self, GateRequest, Path};
use super::routes::RouteTable;
use super::telemetry::TrafficMetrics;
use crate::node_view::PodUid;

/// One open connection into a local pod.
struct OpenInbound {
    /// The pod it was admitted into (`<namespace>/<name>`).
    pod: PodUid,
    path: Path,
    principal: Option<String>,
    source: SocketAddr,
    destination: SocketAddr,
    upstream: socket2::Socket,
    /// Set when a policy change refused the connection.
    revoked: Arc<AtomicBool>,
}

/// The open inbound connections.
#[derive(Default)]
pub struct InboundRegistry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, OpenInbound>>,
}

/// Keeps a connection registered; dropped with the connection.
pub struct Registration {
    registry: Arc<InboundRegistry>,
    id: u64,
    revoked: Arc<AtomicBool>,
}

impl Registration {
    /// Whether a policy change refused the connection: its copy must end
    /// as a failure, whatever its sockets say.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl InboundRegistry {
    /// Registers a connection the gate admitted (`request`) on the table of
    /// version `decided_on`, forwarded on `upstream`. If a newer config was
    /// applied in between, its sweep ran before this registration and
    /// missed the connection: it is decided again on the newest table, and
    /// `Err` says that table refuses it (the caller must not carry it).
    /// `Ok(None)` when the socket cannot be duplicated (out of
    /// descriptors): the connection then runs unwatched, which is logged.
    pub fn register_admitted(
        self: &Arc<Self>,
        routes: &super::Routes,
        metrics: &TrafficMetrics,
        (decided_on, pod): (u64, &PodUid),
        upstream: &TcpStream,
        request: &GateRequest<'_>,
    ) -> Result<Option<Registration>, Decision> {
        let registration = self.register(
            pod,
            upstream,
            request.path,
            request.principal.map(str::to_owned),
            request.source,
            request.destination,
        );
        let current = routes.current();
        if current.generation == decided_on {
            return Ok(registration);
        }
        let what = "inbound connection denied by a config applied while it opened";
        let decision = decide_again(&current, metrics, pod, request, what);
        if decision.allowed() {
            Ok(registration)
        } else {
            Err(decision)
        }
    }

    /// Registers a connection from `source` (with the `principal` the gate
    /// admitted it with, `None` for plaintext) to `destination`, arriving
    /// by `path` and forwarded on `upstream`.
    fn register(
        self: &Arc<Self>,
        pod: &PodUid,
        upstream: &TcpStream,
        path: Path,
        principal: Option<String>,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Option<Registration> {
        let duplicate = match upstream.as_fd().try_clone_to_owned() {
            Ok(fd) => socket2::Socket::from(fd),
            Err(error) => {
                warn!(%source, %destination, %error, "cannot watch this connection for policy changes");
                return None;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(AtomicBool::new(false));
        let entry = OpenInbound {
            pod: pod.clone(),
            path,
            principal,
            source,
            destination,
            upstream: duplicate,
            revoked: revoked.clone(),
        };
        self.open.lock().ok()?.insert(id, entry);
        Some(Registration {
            registry: self.clone(),
            id,
            revoked,
        })
    }

    /// Decides every open connection against `routes`; closes and returns
    /// the number of those now refused.
    pub fn reauthorize(&self, routes: &RouteTable, metrics: &TrafficMetrics) -> usize {
        let Ok(open) = self.open.lock() else {
            return 0;
        };
        let mut closed = 0;
        for connection in open.values() {
            let request = GateRequest {
                path: connection.path,
                principal: connection.principal.as_deref(),
                source: connection.source,
                destination: connection.destination,
            };
            let what = "closing an open connection after a policy change";
            if decide_again(routes, metrics, &connection.pod, &request, what).allowed() {
                continue;
            }
            connection.revoked.store(true, Ordering::Release);
            let _ = connection.upstream.shutdown(Shutdown::Both);
            closed += 1;
        }
        closed
    }

    /// How many inbound connections are open.
    pub fn len(&self) -> usize {
        self.open.lock().map(|open| open.len()).unwrap_or(0)
    }

    /// Whether no inbound connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decides an already admitted connection again on `routes`, and records a
/// refusal (not the AUDIT matches, counted when it was admitted); `what`
/// says what the refusal does. A connection whose pod is no longer in this
/// node's config is refused: deleted pods take their connections along,
/// and a pod still there but out of the config (its entry refused, say)
/// is no longer vouched for; nor is `pod` once its address is another's.
fn decide_again(
    routes: &RouteTable,
    metrics: &TrafficMetrics,
    pod: &PodUid,
    request: &GateRequest<'_>,
    what: &str,
) -> Decision {
    let workload = routes.local_workload(request.destination.ip());
    let Some(workload) = workload.filter(|w| w.uid == *pod) else {
        let gone = Decision {
            outcome: Outcome::Quarantined("the pod is no longer in this node's config".into()),
            audits: Vec::new(),
        };
        warn!(source = %request.source, destination = %request.destination, "{what}: {gone}");
        return gone;
    };
    let decision = gate::decide(routes, workload, request);
    if !decision.allowed() {
        let source = routes.workload(request.source.ip()).map(|w| &**w);
        gate::record(metrics, &decision, (source, workload), request, what);
    }
    decision
}
