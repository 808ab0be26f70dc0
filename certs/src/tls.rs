//! The rustls client and server configs for HBONE: TLS 1.3 only, the two
//! AES-GCM suites, ALPN `h2`, no SNI, certificates required on both sides and
//! verified by SPIFFE identity.

use std::sync::Arc;

use rustls::version::TLS13;
use rustls::{ClientConfig, CommonState, ServerConfig};

use crate::provider::{KeyExchange, hbone_crypto_provider};
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use crate::{Error, Identity, TrustBundle, WorkloadCertificate, inspect};

/// The ALPN protocol HBONE runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// The server side of an HBONE tunnel that presents `cert` (the certificate
/// of the workload the connection is addressed to) and accepts clients from
/// the same trust domain whose chain leads to `cert`'s roots.
///
/// The key exchange is `key_exchange`'s ([`KeyExchange`]). After the
/// handshake, [`peer_identity`] tells which workload connected.
/// Session resumption is off: pooled connections live long, and a resumed
/// session would skip the chain check of a rotated or revoked peer.
pub fn hbone_server_config(
    cert: &WorkloadCertificate,
    key_exchange: KeyExchange,
) -> Result<Arc<ServerConfig>, Error> {
    let tls_err = |source| Error::TlsConfig {
        side: "server",
        source,
    };
    let verifier = SpiffeClientVerifier::new(cert.trust().clone(), cert.identity().trust_domain());
    let mut config = ServerConfig::builder_with_provider(hbone_crypto_provider(key_exchange))
        .with_protocol_versions(&[&TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of an HBONE tunnel: presents `cert` (the source
/// workload's certificate) and accepts only a server that proves
/// `expected_server`. No SNI is sent; the server name given to rustls is
/// ignored by verification. The key exchange is `key_exchange`'s.
pub fn hbone_client_config(
    cert: &WorkloadCertificate,
    expected_server: &Identity,
    key_exchange: KeyExchange,
) -> Result<Arc<ClientConfig>, Error> {
    let tls_err = |source| Error::TlsConfig {
        side: "client",
        source,
    };
    let verifier = SpiffeServerVerifier::new(cert.trust().clone(), expected_server.clone());
    let mut config = ClientConfig::builder_with_provider(hbone_crypto_provider(key_exchange))
        .with_protocol_versions(&[&TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE identity of the peer of a completed handshake. With the configs
/// above, the peer's chain has already been verified when this is called.
pub fn peer_identity(connection: &CommonState) -> Result<Identity, Error> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::NoPeerCertificate)?;
    inspect::identity_of(leaf)
}

/// The control plane's gRPC server: TLS 1.3, ALPN `h2`, presenting whatever
/// certificate `certificate` resolves to (the control plane renews its own
/// serving certificate, so it is looked up per handshake). Proxies do not
/// present certificates here: they authenticate with tokens in the calls.
pub fn control_plane_server_config(
    certificate: Arc<dyn rustls::server::ResolvesServerCert>,
    key_exchange: KeyExchange,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(hbone_crypto_provider(key_exchange))
        .with_protocol_versions(&[&TLS13])
        .map_err(|source| Error::TlsConfig {
            side: "control-plane server",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A proxy's client for the control plane: accepts only a server that proves
/// `expected` (the control plane's SPIFFE identity) with a chain to `trust`.
pub fn control_plane_client_config(
    trust: &TrustBundle,
    expected: &Identity,
    key_exchange: KeyExchange,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = SpiffeServerVerifier::new(trust.clone(), expected.clone());
    let mut config = ClientConfig::builder_with_provider(hbone_crypto_provider(key_exchange))
        .with_protocol_versions(&[&TLS13])
        .map_err(|source| Error::TlsConfig {
            side: "control-plane client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A rustls signing key for a workload certificate, for servers that swap
/// certificates at run time (see [`control_plane_server_config`]).
pub fn certified_key(cert: &WorkloadCertificate) -> Result<Arc<rustls::sign::CertifiedKey>, Error> {
    let key = hbone_crypto_provider(KeyExchange::default())
        .key_provider
        .load_private_key(cert.private_key())
        .map_err(|source| Error::TlsConfig {
            side: "server",
            source,
        })?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        cert.chain().to_vec(),
        key,
    )))
}
