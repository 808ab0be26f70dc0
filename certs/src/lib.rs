//! Identity for the weft mesh: SPIFFE IDs, the mesh certificate authority,
//! workload certificates, and the rustls configs that authenticate HBONE peers
//! by identity.
//!
//! Everything in weft that decides "who is this?" rests on this crate. It is a
//! library of pure functions over certificates and keys: it does no networking,
//! knows nothing of Kubernetes, gRPC or the proxy, and reads the clock only
//! where a caller does not pass one in.
//!
//! Where to start reading:
//! - [`Identity`], a SPIFFE ID of the form
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`MeshCa`]: the control plane's CA; [`MeshCa::sign_csr`] turns a workload's
//!   CSR into a chain, after checking the CSR asks for exactly one identity.
//! - [`CertificateRequest`] and [`WorkloadCertificate`]: the node proxy's side;
//!   the key is generated locally and never leaves the node.
//! - [`hbone_server_config`] and [`hbone_client_config`]: TLS 1.3 with both
//!   sides authenticated, the client pinning the identity it meant to reach;
//!   [`peer_identity`] names the client a server is talking to.
//! - [`TrustBundle`]: the roots, more than one during a root rotation.
//!
//! ```
//! # fn main() -> Result<(), weft_certs::Error> {
//! use std::time::SystemTime;
//! use weft_certs::{CertificateRequest, Identity, MeshCa};
//!
//! let now = SystemTime::now();
//! let ca = MeshCa::generate_root("cluster.local", now)?;
//! let id: Identity = "spiffe://cluster.local/ns/shop/sa/checkout".parse()?;
//!
//! // On the node: a key and a CSR. On the control plane: the signature.
//! let request = CertificateRequest::generate(&id)?;
//! let chain = ca.sign_csr(request.csr_der(), &id, now)?;
//! let cert = request.complete(chain, ca.trust_bundle().clone(), now)?;
//!
//! assert_eq!(cert.identity(), &id);
//! assert!(!cert.needs_renewal(now));
//! let _server = weft_certs::hbone_server_config(&cert, weft_certs::KeyExchange::default())?;
//! # Ok(())
//! # }
//! ```

mod ca;
mod csr;
mod error;
mod identity;
mod inspect;
mod pem;
mod provider;
mod tls;
mod trust;
mod verify;
mod workload;

pub use ca::{MeshCa, SigningPolicy};
pub use csr::MAX_CSR_LEN;
pub use error::Error;
pub use identity::{
    Identity, IdentityProblem, MAX_IDENTITY_LEN, MAX_TRUST_DOMAIN_LEN, validate_trust_domain_name,
};
pub use inspect::{CertificateFacts, identity_of, inspect};
pub use pem::{encode_certificates, parse_certificates};
pub use provider::{KeyExchange, hbone_crypto_provider, key_exchange_group};
pub use tls::{
    ALPN_H2, certified_key, control_plane_client_config, control_plane_server_config,
    hbone_client_config, hbone_server_config, peer_identity,
};
pub use trust::{TrustBundle, Usage};
pub use verify::{SpiffeClientVerifier, SpiffeServerVerifier, refusal_reason};
pub use workload::{CertificateRequest, WorkloadCertificate};

/// The trust domain weft uses unless configured otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
