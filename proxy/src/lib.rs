//! The weft node proxy: one per Kubernetes node, it will capture the TCP
//! traffic of the node's pods and carry it between nodes in HBONE tunnels.
//!
//! This crate is, for now, the proxy's control side only: the conversation
//! with the control plane (a config stream it acknowledges version by
//! version, and certificate signing), the certificates of the node's meshed
//! workloads, and the admin endpoint. It does not capture or forward any
//! traffic yet; the data plane will read the [`NodeView`] and the
//! certificates published here. It never talks to the Kubernetes API: all
//! it knows comes from the control plane.
//!
//! Where to start reading: [`NodeProxy::start`] wires everything together;
//! [`NodeView::apply`] is the heart of it, the rules by which an update is
//! applied or refused; [`ControlPlaneClient`] keeps the stream alive and
//! [`NodeCertificates`] keeps a valid certificate per meshed identity.
//!
//! Modules, from the leaves up: `backoff`, `wall_clock`, `node_view` (with
//! `error`), `config` → `transport` → `control_plane` → `certificates` →
//! `admin` → `node_proxy`; nothing points back down.

mod admin;
mod backoff;
pub mod capture;
mod certificates;
mod config;
mod control_plane;
pub mod dataplane;
mod error;
pub mod hbone;
mod http_server;
mod monitoring;
mod node_proxy;
mod node_view;
pub mod sockets;
mod transport;
mod wall_clock;

pub use backoff::Backoff;
pub use certificates::{CertificateMap, NodeCertificates};
pub use config::{DEFAULT_CONTROL_PLANE_IDENTITY, LogFormat, ProxyConfig};
pub use control_plane::{ControlPlaneClient, ControlPlaneStatus, RefusedUpdate, ViewReceiver};
pub use error::{Error, error_chain};
pub use node_proxy::NodeProxy;
pub use node_view::{
    Endpoint, EntryKind, NodeView, Service, ServicePort, Trust, UpdateProblem, Workload,
};
pub use transport::{BearerToken, ControlPlaneTransport};
