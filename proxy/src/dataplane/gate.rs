//! The one authorization gate. Every path that carries a connection into a
//! meshed local pod asks it, and nothing reaches such a pod without it:
//!
//! - HBONE inbound ([`super::inbound`]): the principal proven by mutual TLS;
//! - plaintext inbound ([`super::plaintext`]): no principal, so STRICT
//!   refuses it and identity rules cannot match it;
//! - node-local ([`super::outbound`]): both pods on this node; the source's
//!   identity is the one the node's config gives its address (the proxy
//!   captured the connection from that pod, so it needs no handshake to
//!   know it);
//! - open connections, decided again when policy changes
//!   ([`super::reauthorize`]).
//!
//! The decision itself is [`weft_api::authorization::decide`], the same
//! code `explain` runs; here it is applied: counted
//! (`weft_authorization_decisions_total`), logged with the policy that
//! decided, and turned into admit or refuse.

use std::net::SocketAddr;

use tracing::{info, warn};
use weft_api::authorization::{Connection, Decision, Outcome};

use super::routes::RouteTable;
use super::telemetry::{Direction, Security, TrafficMetrics, workload_key};
use crate::node_view::Workload;
use crate::traffic_ledger::EdgeKey;

/// How a connection reaches the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Through an HBONE tunnel from another node.
    Hbone,
    /// Plaintext, from outside the mesh.
    Plaintext,
    /// From a meshed pod on the same node.
    NodeLocal,
}

impl Path {
    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Hbone => "hbone",
            Path::Plaintext => "plaintext",
            Path::NodeLocal => "node_local",
        }
    }
}

/// A connection to a meshed local pod, as the gate sees it.
#[derive(Clone, Copy, Debug)]
pub struct GateRequest<'a> {
    /// How it arrives.
    pub path: Path,
    /// The source's identity: proven by mutual TLS, or (node-local) the
    /// one the config gives the source pod. `None`: plaintext.
    pub principal: Option<&'a str>,
    /// The source address the pod sees.
    pub source: SocketAddr,
    /// The pod's address and port.
    pub destination: SocketAddr,
}

/// Decides a connection to the local `workload`.
pub fn decide(routes: &RouteTable, workload: &Workload, request: &GateRequest<'_>) -> Decision {
    routes.authorize(
        workload,
        &Connection {
            source_principal: request.principal,
            source_ip: request.source.ip(),
            destination_port: request.destination.port(),
        },
    )
}

/// Decides a new connection and records the decision: counts and logs AUDIT
/// matches and refusals, naming the policy. `Err` with the decision when it
/// is refused.
pub fn admit(
    routes: &RouteTable,
    metrics: &TrafficMetrics,
    workload: &Workload,
    request: &GateRequest<'_>,
) -> Result<(), Decision> {
    let decision = decide(routes, workload, request);
    let source = routes.workload(request.source.ip()).map(|w| &**w);
    record(
        metrics,
        &decision,
        (source, workload),
        request,
        "inbound connection denied",
    );
    if decision.allowed() {
        Ok(())
    } else {
        Err(decision)
    }
}

/// Counts and logs a decision on a connection from `source` (the pod at its
/// address, if known) to `workload`; `what` says what a refusal does
/// ("inbound connection denied", "closing an open connection").
pub fn record(
    metrics: &TrafficMetrics,
    decision: &Decision,
    (source, workload): (Option<&Workload>, &Workload),
    request: &GateRequest<'_>,
    what: &str,
) {
    let edge = EdgeKey {
        reporter: Direction::Inbound.reporter(),
        source_workload: source.map(workload_key).unwrap_or_default(),
        destination_workload: workload_key(workload),
        source_principal: request.principal.unwrap_or_default().to_owned(),
        destination_service: String::new(),
        security: match request.path {
            Path::Hbone => Security::MutualTls,
            Path::NodeLocal => Security::NodeLocal,
            Path::Plaintext => Security::None,
        }
        .label(),
    };
    metrics.authorization(decision, workload, &edge);
    let path = request.path.as_str();
    let (source, destination) = (request.source, request.destination);
    for audit in &decision.audits {
        info!(
            %source, %destination, path, pod = %workload.uid, policy = %audit.policy, rule = audit.rule,
            allowed = decision.allowed(),
            "authorization audit: an AUDIT policy matched"
        );
    }
    if decision.allowed() {
        return;
    }
    warn!(
        %source, %destination, path, pod = %workload.uid, policy = %decision.policy(),
        "{what}: {decision}"
    );
    let reason = match decision.outcome {
        Outcome::PlaintextRefused(_) => "plaintext_refused_strict",
        _ => "denied_by_policy",
    };
    metrics.failure(Direction::Inbound, reason);
}
