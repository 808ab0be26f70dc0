//! The set of mesh roots a workload trusts, and chain verification against it.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::pem::{encode_certificates, parse_certificates};
use crate::{Error, Identity, inspect};

/// Which side of a TLS handshake a certificate must be good for. weft
/// certificates carry both usages, and the verifier requires the one it checks
/// to be present in the leaf (not merely "allowed if absent", as the web PKI
/// does). CA certificates in the chain may omit extendedKeyUsage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// The certificate authenticates a TLS server.
    Server,
    /// The certificate authenticates a TLS client.
    Client,
}

impl Usage {
    fn name(self) -> &'static str {
        match self {
            Usage::Server => "server",
            Usage::Client => "client",
        }
    }

    /// The check applied to every certificate of the path; the stricter
    /// leaf check is done on the leaf alone.
    fn key_usage(self) -> KeyUsage {
        match self {
            Usage::Server => KeyUsage::server_auth(),
            Usage::Client => KeyUsage::client_auth(),
        }
    }

    fn granted_by(self, leaf: &inspect::CertificateFacts) -> bool {
        match self {
            Usage::Server => leaf.server_auth,
            Usage::Client => leaf.client_auth,
        }
    }
}

/// The mesh roots: one normally, two or more while a root is being rotated
/// (certificates from either verify during the overlap window).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates. Duplicates are dropped.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<TrustBundle, Error> {
        let mut bundle = TrustBundle {
            roots: Vec::new(),
            anchors: Vec::new(),
        };
        for root in roots {
            bundle.add(root)?;
        }
        if bundle.roots.is_empty() {
            return Err(Error::InvalidCa {
                reason: "a trust bundle needs at least one root".into(),
            });
        }
        Ok(bundle)
    }

    /// Parses a bundle from concatenated PEM certificates.
    pub fn from_pem(pem: &str) -> Result<TrustBundle, Error> {
        TrustBundle::new(parse_certificates(pem, "trust bundle")?)
    }

    /// Adds a root (e.g. the next root during rotation). Adding a root that is
    /// already present changes nothing.
    pub fn add(&mut self, root: CertificateDer<'static>) -> Result<(), Error> {
        if self.roots.contains(&root) {
            return Ok(());
        }
        let facts = inspect::inspect(&root)?;
        if !facts.is_ca {
            return Err(Error::InvalidCa {
                reason: "a trusted root must be a CA certificate (basicConstraints CA:true)".into(),
            });
        }
        let anchor = webpki::anchor_from_trusted_cert(&root)
            .map_err(|e| Error::InvalidCa {
                reason: format!("root is not usable as a trust anchor: {e}"),
            })?
            .to_owned();
        self.roots.push(root);
        self.anchors.push(anchor);
        Ok(())
    }

    /// Adds every root of `other`.
    pub fn merge(&mut self, other: &TrustBundle) -> Result<(), Error> {
        for root in &other.roots {
            self.add(root.clone())?;
        }
        Ok(())
    }

    /// The root certificates, in the order they were added.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as concatenated PEM.
    pub fn to_pem(&self) -> String {
        encode_certificates(&self.roots)
    }

    /// Verifies `end_entity` (with `intermediates`) up to one of the roots at
    /// time `now` for `usage`, and returns the SPIFFE identity it carries.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        now: SystemTime,
    ) -> Result<Identity, Error> {
        let invalid = |source| Error::ChainInvalid {
            usage: usage.name(),
            source,
        };
        let cert = EndEntityCert::try_from(end_entity).map_err(invalid)?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        cert.verify_for_usage(
            crate::provider::hbone_crypto_provider(crate::KeyExchange::default())
                .signature_verification_algorithms
                .all,
            &self.anchors,
            intermediates,
            now,
            usage.key_usage(),
            None,
            None,
        )
        .map_err(invalid)?;
        let leaf = inspect::inspect(end_entity)?;
        if !usage.granted_by(&leaf) {
            return Err(Error::UsageNotGranted {
                usage: usage.name(),
            });
        }
        leaf.identity
            .map_err(|reason| Error::CertificateIdentity { reason })
    }
}
