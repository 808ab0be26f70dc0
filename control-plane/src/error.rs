//! The control plane library's error type.

use std::path::PathBuf;

/// Everything that can stop the control plane (problems in single objects
/// or requests are reported, not raised).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The manifests directory cannot be listed.
    #[error("reading the manifests directory {path}: {source}")]
    ReadManifests {
        /// The directory.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The manifests directory cannot be watched for changes.
    #[error("watching the manifests directory {path}: {source}")]
    WatchManifests {
        /// The directory.
        path: PathBuf,
        /// The underlying failure.
        source: notify::Error,
    },

    /// The node token file is unreadable or malformed.
    #[error("loading node tokens from {path}: {reason}")]
    NodeTokens {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line number where it applies.
        reason: String,
    },

    /// Certificate or CA work failed.
    #[error(transparent)]
    Certs(#[from] weft_certs::Error),

    /// A listening socket could not be opened.
    #[error("listening on {addr} for {what}: {source}")]
    Listen {
        /// What the socket is for.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),

    /// A call to the Kubernetes API server failed.
    #[error("{operation}: {source}")]
    Kubernetes {
        /// What the control plane was doing.
        operation: String,
        /// The underlying failure.
        source: kube::Error,
    },

    /// The CA Secret exists but cannot be used.
    #[error("loading the mesh CA from Secret {secret}: {reason}")]
    CaSecret {
        /// `<namespace>/<name>`.
        secret: String,
        /// What is wrong.
        reason: String,
    },

    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),

    /// Writing a file for others to read (e.g. the root certificate) failed.
    #[error("writing {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },
}
