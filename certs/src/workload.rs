//! The workload side: a key generated on the node, the CSR that asks the CA to
//! vouch for it, and the resulting certificate bundle that knows when to renew.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::pem::encode_certificates;
use crate::trust::{TrustBundle, Usage};
use crate::{Error, Identity, inspect};

/// Renewal happens at a random point in this share of the lifetime, so that
/// the certificates of a node issued together do not all renew together.
const RENEW_WINDOW: (f64, f64) = (0.45, 0.55);

/// A fresh key pair and a CSR for one identity. The private key never leaves
/// this value until [`CertificateRequest::complete`] moves it into the
/// resulting [`WorkloadCertificate`].
pub struct CertificateRequest {
    identity: Identity,
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl CertificateRequest {
    /// Generates an ECDSA P-256 key and a CSR whose only SAN is `identity`.
    pub fn generate(identity: &Identity) -> Result<CertificateRequest, Error> {
        let build_err = |source| Error::BuildCsr {
            identity: identity.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|source| Error::GenerateKey { source })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(build_err)?,
        )];
        let csr = params.serialize_request(&key).map_err(build_err)?;
        Ok(CertificateRequest {
            identity: identity.clone(),
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// The identity this request is for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The DER CSR to send to the CA.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// Combines the key with the chain the CA returned (leaf first) and the
    /// mesh roots. Checks that the leaf is for this identity and this key,
    /// and that the chain verifies against `trust` at `now` for both usages.
    pub fn complete(
        self,
        chain: Vec<CertificateDer<'static>>,
        trust: TrustBundle,
        now: SystemTime,
    ) -> Result<WorkloadCertificate, Error> {
        let mismatch = |reason: String| Error::BundleMismatch {
            identity: self.identity.clone(),
            reason,
        };
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| mismatch("the CA returned an empty chain".into()))?;
        let facts = inspect::inspect(leaf)?;
        if facts.public_key_info != self.key.subject_public_key_info() {
            return Err(mismatch(
                "the certificate is for a different key than the one in the CSR".into(),
            ));
        }
        for usage in [Usage::Server, Usage::Client] {
            let found = trust
                .verify(leaf, intermediates, usage, now)
                .map_err(|e| mismatch(e.to_string()))?;
            if found != self.identity {
                return Err(mismatch(format!("the certificate is for {found}")));
            }
        }
        let lifetime = facts
            .not_after
            .duration_since(facts.not_before)
            .unwrap_or_default();
        let share = rand::random_range(RENEW_WINDOW.0..RENEW_WINDOW.1);
        Ok(WorkloadCertificate {
            identity: self.identity,
            key_pkcs8: Arc::from(self.key.serialize_der()),
            chain,
            trust,
            not_before: facts.not_before,
            not_after: facts.not_after,
            renew_at: facts.not_before + lifetime.mul_f64(share),
        })
    }
}

/// A workload's certificate bundle: private key, chain (leaf first) and the
/// mesh roots it trusts. Cheap to clone; feeds the HBONE TLS configs.
#[derive(Clone)]
pub struct WorkloadCertificate {
    identity: Identity,
    key_pkcs8: Arc<[u8]>,
    chain: Vec<CertificateDer<'static>>,
    trust: TrustBundle,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key is deliberately left out.
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

impl WorkloadCertificate {
    /// The identity the certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The chain to present, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The chain as PEM, for display (never the key).
    pub fn chain_pem(&self) -> String {
        encode_certificates(&self.chain)
    }

    /// The roots peers are verified against.
    pub fn trust(&self) -> &TrustBundle {
        &self.trust
    }

    /// The same certificate and key, verifying peers against `trust`
    /// instead: during a root rotation the mesh's current roots (which the
    /// control plane sends) may be newer than those at signing time.
    pub fn with_trust(&self, trust: TrustBundle) -> WorkloadCertificate {
        WorkloadCertificate {
            trust,
            ..self.clone()
        }
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to ask for the next certificate: about half-way through the
    /// lifetime, jittered. The current one keeps serving until it expires.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    /// Whether it is time to renew.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        now >= self.renew_at
    }

    /// Whether the leaf has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Time left until expiry (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// The private key (PKCS#8 `PRIVATE KEY`) and the chain (leaf first) as
    /// PEM, so that the node can keep the certificate across a restart of
    /// its proxy (see [`WorkloadCertificate::from_private_pem`]). It holds
    /// the private key: write it only to a file its owner alone can read,
    /// on the node; it must never leave the node.
    pub fn to_private_pem(&self) -> String {
        let mut pem = crate::pem::encode_block("PRIVATE KEY", &self.key_pkcs8);
        pem.push_str(&encode_certificates(&self.chain));
        pem
    }

    /// A certificate that [`WorkloadCertificate::to_private_pem`] wrote,
    /// checked as it was when issued: the leaf is for `identity` and for
    /// this key, and the chain verifies against `trust` at `now` for both
    /// usages. An expired one is refused like any other that does not
    /// verify.
    pub fn from_private_pem(
        identity: &Identity,
        pem: &str,
        trust: TrustBundle,
        now: SystemTime,
    ) -> Result<WorkloadCertificate, Error> {
        let parse = |reason: String| Error::ParsePem {
            what: "stored workload key",
            reason,
        };
        let key = match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(pkcs8)) => {
                KeyPair::try_from(&pkcs8).map_err(|e| parse(e.to_string()))?
            }
            Ok(_) => return Err(parse("the key is not PKCS#8".into())),
            Err(e) => return Err(parse(e.to_string())),
        };
        let chain = crate::pem::parse_certificates(pem, "stored workload certificate")?;
        CertificateRequest {
            identity: identity.clone(),
            key,
            csr_der: Vec::new(),
        }
        .complete(chain, trust, now)
    }

    /// A fresh copy of the private key for a rustls config.
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }
}
