//! The one error type of `weft-certs`: each variant names the operation that
//! failed and carries the values that explain it.

use std::path::PathBuf;

use crate::Identity;
use crate::identity::IdentityProblem;

/// Everything that can go wrong in `weft-certs`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid SPIFFE ID.
    #[error("parsing SPIFFE ID {input:?}: {problem}")]
    InvalidIdentity {
        /// The input (shortened if long).
        input: String,
        /// What is wrong with it.
        problem: IdentityProblem,
    },

    /// A configured trust domain is not valid.
    #[error("checking trust domain {input:?}: {problem}")]
    InvalidTrustDomain {
        /// The input (shortened if long).
        input: String,
        /// What is wrong with it.
        problem: IdentityProblem,
    },

    /// Generating a key pair failed.
    #[error("generating an ECDSA P-256 key: {source}")]
    GenerateKey {
        /// The underlying failure.
        source: rcgen::Error,
    },

    /// Building a CSR on the workload side failed.
    #[error("building a CSR for {identity}: {source}")]
    BuildCsr {
        /// The identity the CSR was for.
        identity: Identity,
        /// The underlying failure.
        source: rcgen::Error,
    },

    /// A CSR could not be decoded.
    #[error("signing CSR for {requested}: cannot parse the CSR: {reason}")]
    ParseCsr {
        /// The identity the caller asked for.
        requested: Identity,
        /// Why parsing failed.
        reason: String,
    },

    /// A CSR's self-signature does not verify: whoever sent it does not hold the key.
    #[error("signing CSR for {requested}: the CSR's signature does not verify: {reason}")]
    CsrSignature {
        /// The identity the caller asked for.
        requested: Identity,
        /// Why verification failed.
        reason: String,
    },

    /// A CSR carries a key type the mesh does not issue for.
    #[error("signing CSR for {requested}: key must be ECDSA P-256, the CSR has {found}")]
    CsrKeyAlgorithm {
        /// The identity the caller asked for.
        requested: Identity,
        /// The key algorithm (and curve) found.
        found: String,
    },

    /// A CSR's subject alternative names are not exactly the requested identity.
    #[error(
        "signing CSR for {requested}: SAN mismatch, the CSR must name exactly this identity \
         and nothing else, it asks for {found:?}"
    )]
    CsrIdentityMismatch {
        /// The identity the caller asked for.
        requested: Identity,
        /// The SANs found in the CSR, as text.
        found: Vec<String>,
    },

    /// The CA was asked to sign for an identity outside its trust domain.
    #[error("signing CSR for {requested}: this CA issues only for trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The identity the caller asked for.
        requested: Identity,
        /// The CA's trust domain.
        trust_domain: String,
    },

    /// Building or signing a certificate failed.
    #[error("issuing a certificate for {subject}: {source}")]
    IssueCertificate {
        /// What was being issued (an identity, or "root CA").
        subject: String,
        /// The underlying failure.
        source: rcgen::Error,
    },

    /// CA material (generated, loaded or supplied by the operator) is unusable.
    #[error("loading the mesh CA: {reason}")]
    InvalidCa {
        /// What is wrong with it.
        reason: String,
    },

    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// PEM input could not be decoded.
    #[error("decoding PEM {what}: {reason}")]
    ParsePem {
        /// What the PEM was supposed to hold.
        what: &'static str,
        /// Why decoding failed.
        reason: String,
    },

    /// A DER certificate could not be decoded.
    #[error("parsing certificate: {reason}")]
    ParseCertificate {
        /// Why parsing failed.
        reason: String,
    },

    /// A certificate does not carry exactly one SPIFFE ID as URI SAN.
    #[error("reading the identity of a certificate: {reason}")]
    CertificateIdentity {
        /// What is wrong (no URI SAN, several, or one that is not a valid SPIFFE ID).
        reason: String,
    },

    /// A certificate chain does not verify against the mesh roots.
    #[error("verifying a {usage} certificate chain against the mesh roots: {source}")]
    ChainInvalid {
        /// "client" or "server".
        usage: &'static str,
        /// The failure reported by the path builder.
        source: webpki::Error,
    },

    /// A leaf certificate lacks the extended key usage it is used for.
    #[error("verifying a {usage} certificate: extendedKeyUsage does not list {usage}Auth")]
    UsageNotGranted {
        /// "client" or "server".
        usage: &'static str,
    },

    /// The TLS peer is not the identity the caller meant to reach.
    #[error("verifying the TLS peer: expected {expected}, the peer is {found}")]
    PeerIdentityMismatch {
        /// The identity the caller expected.
        expected: Identity,
        /// The identity in the peer's certificate.
        found: Identity,
    },

    /// The TLS peer belongs to another trust domain.
    #[error("verifying the TLS peer: {found} is not in trust domain {expected:?}")]
    PeerTrustDomain {
        /// The local trust domain.
        expected: String,
        /// The identity in the peer's certificate.
        found: Identity,
    },

    /// The TLS connection has no verified peer certificate.
    #[error("reading the TLS peer identity: the peer presented no certificate")]
    NoPeerCertificate,

    /// A certificate bundle does not fit together (key, leaf and identity).
    #[error("assembling the certificate for {identity}: {reason}")]
    BundleMismatch {
        /// The identity the bundle is for.
        identity: Identity,
        /// What does not fit.
        reason: String,
    },

    /// rustls refused a configuration.
    #[error("building the HBONE TLS {side} config: {source}")]
    TlsConfig {
        /// "client" or "server".
        side: &'static str,
        /// The underlying failure.
        source: rustls::Error,
    },

    /// A key-exchange policy name that weft does not know.
    #[error(
        "reading the key exchange policy {given:?}: expected post-quantum-preferred or post-quantum-required"
    )]
    UnknownKeyExchange {
        /// The name given (shortened if long).
        given: String,
    },
}
