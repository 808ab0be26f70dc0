//! The weft node proxy: one per Kubernetes node. It captures the TCP traffic
//! of the node's meshed pods without touching them and carries pod-to-pod
//! connections between nodes in HBONE tunnels (HTTP/2 CONNECT over mutual
//! TLS between the workloads' SPIFFE identities). It never talks to the
//! Kubernetes API: all it knows comes from the control plane.
//!
//! Two halves, sharing state through watch channels:
//! - the control side: [`ControlPlaneClient`] keeps the config stream alive
//!   and applies updates by [`NodeView::apply`]'s rules (or refuses them);
//!   [`NodeCertificates`] keeps a certificate per meshed local identity; the
//!   admin endpoint shows both.
//! - the data plane ([`dataplane`]): [`capture`] programs each meshed pod's
//!   nftables, [`sockets`] makes the proxy's sockets, [`hbone`] speaks the
//!   tunnel protocol, and the listeners [`dataplane`] opens in each pod
//!   carry connections, with metrics, access logs and a graceful drain.
//! - the pods of the node: [`pod_directory`] knows where each lives, filled
//!   by the CNI plugin's requests ([`cni_api`]; the plugin itself,
//!   `weft-cni`, is [`cni_plugin`]).
//!
//! Where to start reading: [`NodeProxy::start`] wires everything together;
//! then `dataplane/outbound.rs` and `dataplane/inbound.rs` follow one
//! connection from the source pod to the destination pod.
//!
//! - upgrades: [`handover`] passes the listening sockets of a running
//!   proxy to a new process on the node, and [`listening`] tells every
//!   accept loop whose turn it is.
//!
//! Modules, from the leaves up: `backoff`, `wall_clock`, `limits`, `rejections`, `warnings`, `sockets`, `listening`,
//! `lanes`, `copy`, `hbone`, `capture`, `pod_directory`, `packed_map`, `node_view` (with `error`), `node_state`
//! → `cni_api` → `cni_plugin`, `handover` → `node_sockets`, `config` → `logging`,
//! `transport` → `control_plane` → `certificates` → `dataplane` → `admin`/`monitoring`
//! → `node_proxy`; nothing points back down.

mod admin;
mod backoff;
pub mod capture;
mod certificates;
pub mod cni_api;
pub mod cni_install;
pub mod cni_plugin;
mod config;
mod control_plane;
pub mod copy;
pub mod dataplane;
mod error;
pub mod handover;
pub mod hbone;
mod http_server;
pub mod lanes;
pub mod limits;
pub mod listening;
mod local_peer;
pub mod logging;
mod monitoring;
mod node_proxy;
mod node_sockets;
mod node_state;
mod node_view;
mod packed_map;
pub mod pod_directory;
pub mod rejections;
pub mod sockets;
#[cfg(test)]
mod test_configs;
pub mod traffic_ledger;
mod transport;
mod wall_clock;
pub mod warnings;

pub use backoff::Backoff;
pub use certificates::{CertificateMap, NodeCertificates};
pub use config::{
    AdminAction, AdminCommand, DEFAULT_CONTROL_PLANE_IDENTITY, DEFAULT_MAX_CONFIG_MESSAGE_BYTES,
    LogFormat, ProxyConfig, ReadinessProbeConfig,
};
pub use control_plane::{ControlPlaneClient, ControlPlaneStatus, RefusedUpdate, ViewReceiver};
pub use error::{Error, error_chain};
pub use monitoring::probe_ready;
pub use node_proxy::NodeProxy;
pub use node_state::{NodeState, RefusedKeys, StoredConfig};
pub use node_view::{
    Addresses, Applied, Endpoint, EntryKind, LocalDetails, NodeView, Service, ServicePort,
    ServicePorts, TargetPorts, Trust, UpdateProblem, Workload,
};
pub use transport::{BearerToken, ControlPlaneTransport};
