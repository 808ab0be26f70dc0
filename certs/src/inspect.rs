//! Reading facts out of a DER certificate: its SPIFFE identity, validity window
//! and public key. Used on peer certificates after chain verification and on
//! our own certificates when a bundle is assembled.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{Error, Identity};

/// The facts of one certificate that weft cares about.
#[derive(Clone, Debug)]
pub struct CertificateFacts {
    /// The SPIFFE ID in the URI SAN, if the certificate carries exactly one
    /// valid SPIFFE ID; otherwise why not.
    pub identity: Result<Identity, String>,
    /// Start of the validity window.
    pub not_before: SystemTime,
    /// End of the validity window.
    pub not_after: SystemTime,
    /// The DER SubjectPublicKeyInfo.
    pub public_key_info: Vec<u8>,
    /// Whether basicConstraints says CA:true.
    pub is_ca: bool,
    /// Whether the subject and issuer names are equal (a self-issued root).
    pub self_issued: bool,
    /// Whether the extendedKeyUsage extension lists id-kp-serverAuth.
    pub server_auth: bool,
    /// Whether the extendedKeyUsage extension lists id-kp-clientAuth.
    pub client_auth: bool,
}

/// Parses a certificate and extracts [`CertificateFacts`].
pub fn inspect(der: &[u8]) -> Result<CertificateFacts, Error> {
    let cert = parse(der)?;
    let validity = cert.validity();
    let eku = cert
        .extended_key_usage()
        .map_err(|e| Error::ParseCertificate {
            reason: format!("malformed extendedKeyUsage: {e}"),
        })?
        .map(|ext| ext.value);
    Ok(CertificateFacts {
        identity: spiffe_id(&cert),
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
        public_key_info: cert.public_key().raw.to_vec(),
        is_ca: cert.is_ca(),
        self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
        server_auth: eku.is_some_and(|eku| eku.server_auth),
        client_auth: eku.is_some_and(|eku| eku.client_auth),
    })
}

/// The SPIFFE identity of a certificate: its one and only URI SAN.
pub fn identity_of(der: &[u8]) -> Result<Identity, Error> {
    let cert = parse(der)?;
    spiffe_id(&cert).map_err(|reason| Error::CertificateIdentity { reason })
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    match X509Certificate::from_der(der) {
        Ok((rest, _)) if !rest.is_empty() => Err(Error::ParseCertificate {
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        }),
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(Error::ParseCertificate {
            reason: e.to_string(),
        }),
    }
}

fn spiffe_id(cert: &X509Certificate<'_>) -> Result<Identity, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("malformed subjectAltName: {e}"))?
        .ok_or("the certificate has no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|e| e.to_string()),
        [] => Err("the certificate has no URI SAN".into()),
        many => Err(format!(
            "the certificate has {} URI SANs, exactly one SPIFFE ID is allowed",
            many.len()
        )),
    }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}
