//! The wire contract between the weft control plane and its node proxies:
//! protobuf messages and gRPC services, generated from
//! `proto/weft/v1/weft.proto` at build time.
//!
//! This crate is the contract and nothing else: no conversions to domain
//! types (those live next to the code that owns the domain), except for the
//! parts of the contract's meaning that both sides must read alike: how an
//! authorization policy decides a connection ([`authorization`]), shared by
//! the proxy that enforces it and the control plane that explains it, and
//! what a traffic policy's values are ([`traffic`]), which the control plane
//! checks with the proxy's own conversion before it sends an object. A
//! value that does not convert is an [`Error`] naming the field. Start
//! with [`v1::ConfigUpdate`], the message that carries a node's view of the
//! mesh, and [`v1::node_config_server::NodeConfig`], the stream that carries it.

/// Version 1 of the contract (protobuf package `weft.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// The `NodeConfig` server once more, sending updates that the caller
/// encoded ([`parts::EncodedUpdate`]): the control plane's. Every message
/// type is [`v1`]'s.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod encoded {
    include!(concat!(env!("OUT_DIR"), "/encoded/weft.v1.rs"));
}

pub mod authorization;
mod error;
pub mod parts;
pub mod traffic;

pub use error::Error;

/// The gRPC metadata key that carries a proxy's credential.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The control plane's gRPC port (TLS).
pub const CONTROL_PLANE_GRPC_PORT: u16 = 15012;

/// The control plane's metrics, health and dashboard port.
pub const CONTROL_PLANE_MONITORING_PORT: u16 = 15014;
