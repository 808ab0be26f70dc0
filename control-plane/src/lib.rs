//! The weft control plane: turns cluster state into what each node proxy
//! needs, streams it, and is the only party that vouches for identities.
//!
//! Data flows one way: a source (the local manifests directory,
//! [`manifests`], or the API server, [`kubernetes`]) produces a
//! [`cluster::ClusterState`]; [`mesh::Mesh::derive`] turns it into workloads
//! and services, off the async workers; [`fanout`] computes once what
//! changed and publishes it beside the mesh; each proxy's stream
//! ([`config_stream`]) sends its node's share of that change, as
//! [`view::NodeView`] defines what a node sees. [`signing`] signs CSRs for
//! identities that run on the caller's node. Start reading at [`app::run`].
//!
//! Not here: the node proxy (crate `weft-proxy`), certificate mechanics
//! (crate `weft-certs`), and the wire types (crate `weft-api`).

pub mod app;
pub mod check;
pub mod cluster;
pub mod config;
pub mod config_stream;
pub mod crd;
pub mod dashboard;
mod error;
pub mod explain;
pub mod fanout;
mod forms;
pub mod full_state;
pub mod grpc_connections;
mod http_get;
pub mod kubernetes;
pub mod listeners;
mod manifest_file;
pub mod manifests;
pub mod mesh;
pub mod mesh_change;
pub mod mesh_update;
pub mod monitoring;
pub mod node_auth;
pub mod node_delta;
pub mod node_health;
pub mod policy;
pub mod registry;
pub mod reported_traffic;
pub mod serving_cert;
pub mod signing;
pub mod status;
#[cfg(any(test, feature = "test-clusters"))]
pub mod test_clusters;
pub mod traffic;
pub mod view;

pub use error::Error;
