//! rustls verifiers that authenticate HBONE peers by SPIFFE identity.
//!
//! Both check the peer's chain against the mesh roots (never the system
//! roots, never a DNS name) and then the identity in its URI SAN: the client
//! requires the exact identity it meant to reach, the server requires a client
//! from its own trust domain and leaves authorization to policy.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::debug;

use crate::provider::{KeyExchange, hbone_crypto_provider};
use crate::trust::{TrustBundle, Usage};
use crate::{Error, Identity};

/// Verifies HBONE servers for a client: the server must prove `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: TrustBundle,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts only a server proving `expected` with a chain
    /// to one of the roots in `trust`.
    pub fn new(trust: TrustBundle, expected: Identity) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            trust,
            expected,
            // Only its signature algorithms are used here.
            provider: hbone_crypto_provider(KeyExchange::default()),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = self
            .trust
            .verify(end_entity, intermediates, Usage::Server, system_time(now))
            .map_err(refuse)?;
        if found != self.expected {
            return Err(refuse(Error::PeerIdentityMismatch {
                expected: self.expected.clone(),
                found,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies HBONE clients for a server: any workload of `trust_domain` with
/// a chain to the mesh roots. Which of them may connect is policy's call.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: TrustBundle,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// A verifier that accepts clients of `trust_domain` whose chain leads to
    /// one of the roots in `trust`.
    pub fn new(trust: TrustBundle, trust_domain: &str) -> SpiffeClientVerifier {
        SpiffeClientVerifier {
            trust,
            trust_domain: trust_domain.to_owned(),
            // Only its signature algorithms are used here.
            provider: hbone_crypto_provider(KeyExchange::default()),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every mesh workload has exactly one certificate to offer.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let found = self
            .trust
            .verify(end_entity, intermediates, Usage::Client, system_time(now))
            .map_err(refuse)?;
        if found.trust_domain() != self.trust_domain {
            return Err(refuse(Error::PeerTrustDomain {
                expected: self.trust_domain.clone(),
                found,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Turns a verification failure into the rustls error that selects the right
/// TLS alert, keeping our message (with the identities involved) where the
/// standard variants have no room for it.
fn refuse(error: Error) -> rustls::Error {
    debug!(%error, "refusing TLS peer");
    let standard = match &error {
        Error::ChainInvalid { source, .. } => match source {
            webpki::Error::CertExpired { .. } => Some(CertificateError::Expired),
            webpki::Error::CertNotValidYet { .. } => Some(CertificateError::NotValidYet),
            webpki::Error::UnknownIssuer => Some(CertificateError::UnknownIssuer),
            webpki::Error::InvalidSignatureForPublicKey => Some(CertificateError::BadSignature),
            _ => None,
        },
        _ => None,
    };
    rustls::Error::InvalidCertificate(
        standard.unwrap_or_else(|| CertificateError::Other(OtherError(Arc::new(error)))),
    )
}

/// Our reason for refusing a TLS peer, if `error` came from one of the
/// verifiers above (standard failures such as an expired certificate are
/// reported by rustls's own variants instead). Useful for logs and metrics.
pub fn refusal_reason(error: &rustls::Error) -> Option<&Error> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<Error>()
        }
        _ => None,
    }
}
