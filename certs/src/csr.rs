//! Checking a certificate signing request on the CA side, before anything is
//! signed. The CSR is untrusted network input: every check here is one an
//! attacker would like us to skip.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::{Error, Identity};

/// Largest CSR the CA will look at. A P-256 CSR with one URI SAN is a few
/// hundred bytes; anything near this limit is not one of ours.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// A CSR whose signature verified and whose only SAN is the requested
/// identity. All the CA takes from it is the public key: the rest of the
/// certificate is decided by the CA, never copied from the request.
#[derive(Debug)]
pub(crate) struct VerifiedCsr {
    /// The DER SubjectPublicKeyInfo of the requester's key.
    pub public_key_info: Vec<u8>,
}

/// Parses `der`, verifies its self-signature and checks that its key is ECDSA
/// P-256 and that it asks for `requested` and nothing else.
pub(crate) fn verify_csr(der: &[u8], requested: &Identity) -> Result<VerifiedCsr, Error> {
    let parse_err = |reason: String| Error::ParseCsr {
        requested: requested.clone(),
        reason,
    };
    if der.len() > MAX_CSR_LEN {
        return Err(parse_err(format!(
            "{} bytes, the limit is {MAX_CSR_LEN}",
            der.len()
        )));
    }
    let csr = match X509CertificationRequest::from_der(der) {
        Ok((rest, _)) if !rest.is_empty() => {
            return Err(parse_err(format!("{} trailing bytes", rest.len())));
        }
        Ok((_, csr)) => csr,
        Err(e) => return Err(parse_err(e.to_string())),
    };
    csr.verify_signature().map_err(|e| Error::CsrSignature {
        requested: requested.clone(),
        reason: e.to_string(),
    })?;

    let info = &csr.certification_request_info;
    let algorithm = &info.subject_pki.algorithm;
    let curve = algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve.as_ref() != Some(&OID_EC_P256) {
        let curve = curve
            .map(|c| c.to_id_string())
            .unwrap_or_else(|| "none".into());
        return Err(Error::CsrKeyAlgorithm {
            requested: requested.clone(),
            found: format!("{} (curve {curve})", algorithm.algorithm.to_id_string()),
        });
    }

    let sans = requested_sans(&csr).map_err(parse_err)?;
    if sans != [format!("URI:{requested}")] {
        return Err(Error::CsrIdentityMismatch {
            requested: requested.clone(),
            found: sans,
        });
    }
    Ok(VerifiedCsr {
        public_key_info: info.subject_pki.raw.to_vec(),
    })
}

/// Every SAN the CSR requests, across all SAN extensions, as "TYPE:value".
fn requested_sans(csr: &X509CertificationRequest<'_>) -> Result<Vec<String>, String> {
    let mut sans = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                sans.extend(san.general_names.iter().map(describe_name));
            }
            ParsedExtension::ParseError { error } => {
                return Err(format!("malformed requested extension: {error}"));
            }
            // Other requested extensions are ignored: nothing of the request
            // but its key goes into the certificate.
            _ => {}
        }
    }
    Ok(sans)
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        GeneralName::IPAddress(ip) => format!("IP:{ip:02x?}"),
        other => format!("{other:?}"),
    }
}
