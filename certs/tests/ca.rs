//! The mesh CA: what it issues, what CSRs it refuses, how it persists, and
//! which operator-supplied material it accepts.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use support::*;
use weft_certs::{
    CertificateRequest, Error, MeshCa, SigningPolicy, TrustBundle, WorkloadCertificate,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A DER CSR with the given SANs, signed by `key`.
fn csr_with(sans: Vec<SanType>, key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

#[test]
fn issued_leaf_has_exactly_the_promised_contents() {
    let ca = new_ca();
    let now = SystemTime::now();
    let request = CertificateRequest::generate(&id(CHECKOUT)).unwrap();
    let chain = ca.sign_csr(request.csr_der(), &id(CHECKOUT), now).unwrap();
    assert_eq!(chain.len(), 1, "a root CA adds no intermediates");

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let (_, root) = X509Certificate::from_der(&ca.trust_bundle().roots()[0]).unwrap();

    assert_eq!(leaf.version().0, 2, "X.509 v3");
    assert!(leaf.subject().as_raw().len() <= 2, "empty subject");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN is critical when the subject is empty");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(CHECKOUT)]);

    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any && eku.other.is_empty() && !eku.code_signing);

    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());

    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca, "CA:false");

    let ski = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
            _ => None,
        })
        .expect("subject key identifier");
    assert!(!ski.is_empty());
    let root_ski = root
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
            _ => None,
        })
        .expect("root subject key identifier");
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("authority key identifier");
    assert_eq!(aki, root_ski, "AKI names the issuing key");

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert_eq!(not_before, unix(now) - 5 * 60, "backdated five minutes");
    assert_eq!(not_after, unix(now) + 24 * 3600, "24 h lifetime");

    let serial = leaf.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0, "positive serial");
    let other = ca.sign_csr(request.csr_der(), &id(CHECKOUT), now).unwrap();
    let (_, other) = X509Certificate::from_der(&other[0]).unwrap();
    assert_ne!(other.raw_serial(), serial, "serials are unique");
}

#[test]
fn lifetime_is_configurable_and_never_outlives_the_ca() {
    let ca = new_ca().with_policy(SigningPolicy {
        lifetime: Duration::from_secs(3600),
        backdate: Duration::from_secs(60),
    });
    let now = SystemTime::now();
    let cert = workload_at(&ca, CHECKOUT, now);
    assert_eq!(unix(cert.not_after()) - unix(cert.not_before()), 3600 + 60);

    let long = new_ca().with_policy(SigningPolicy {
        lifetime: Duration::from_secs(100 * 365 * 24 * 3600),
        backdate: Duration::from_secs(60),
    });
    let cert = workload_at(&long, CHECKOUT, now);
    let root = weft_certs::inspect(&long.trust_bundle().roots()[0]).unwrap();
    assert_eq!(cert.not_after(), root.not_after);
}

#[test]
fn refuses_a_csr_asking_for_an_identity_other_than_its_san() {
    let ca = new_ca();
    // A node that may have "frontend" tries to pass off a CSR for "checkout".
    let request = CertificateRequest::generate(&id(CHECKOUT)).unwrap();

    let err = ca
        .sign_csr(request.csr_der(), &id(FRONTEND), SystemTime::now())
        .unwrap_err();

    assert!(matches!(err, Error::CsrIdentityMismatch { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("signing CSR for {FRONTEND}")),
        "{message}"
    );
    assert!(message.contains(&format!("URI:{CHECKOUT}")), "{message}");
}

#[test]
fn refuses_a_csr_with_any_other_san_or_none() {
    let ca = new_ca();
    let key = p256();
    let dns = SanType::DnsName("checkout.shop.svc".try_into().unwrap());
    let cases = [
        ("extra DNS SAN", vec![uri_san(CHECKOUT), dns.clone()]),
        ("second URI", vec![uri_san(CHECKOUT), uri_san(FRONTEND)]),
        ("same URI twice", vec![uri_san(CHECKOUT), uri_san(CHECKOUT)]),
        ("DNS only", vec![dns]),
        ("no SAN", vec![]),
        (
            "different case",
            vec![uri_san("spiffe://cluster.local/ns/shop/sa/Checkout")],
        ),
    ];
    for (case, sans) in cases {
        let err = ca
            .sign_csr(&csr_with(sans, &key), &id(CHECKOUT), SystemTime::now())
            .unwrap_err();
        assert!(
            matches!(err, Error::CsrIdentityMismatch { .. }),
            "{case}: {err:?}"
        );
    }
}

#[test]
fn refuses_a_csr_whose_signature_does_not_verify() {
    let ca = new_ca();
    let mut csr = csr_with(vec![uri_san(CHECKOUT)], &p256());
    // The last byte is inside the ECDSA signature value.
    let last = csr.len() - 1;
    csr[last] ^= 0x01;

    let err = ca
        .sign_csr(&csr, &id(CHECKOUT), SystemTime::now())
        .unwrap_err();

    assert!(matches!(err, Error::CsrSignature { .. }), "{err:?}");
}

#[test]
fn refuses_a_csr_whose_key_is_not_p256() {
    let ca = new_ca();
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let err = ca
            .sign_csr(
                &csr_with(vec![uri_san(CHECKOUT)], &key),
                &id(CHECKOUT),
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(err, Error::CsrKeyAlgorithm { .. }), "{err:?}");
    }
}

#[test]
fn refuses_garbage_and_oversized_csrs() {
    let ca = new_ca();
    let valid = csr_with(vec![uri_san(CHECKOUT)], &p256());
    let mut trailing = valid.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("noise", (0..=255).collect()),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("trailing bytes", trailing),
        ("oversized", vec![0x30; weft_certs::MAX_CSR_LEN + 1]),
    ];
    for (case, der) in cases {
        let err = ca
            .sign_csr(&der, &id(CHECKOUT), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, Error::ParseCsr { .. }), "{case}: {err:?}");
    }
}

#[test]
fn refuses_identities_of_another_trust_domain() {
    let ca = new_ca();
    let foreign = id("spiffe://other.local/ns/shop/sa/checkout");
    let request = CertificateRequest::generate(&foreign).unwrap();

    let err = ca
        .sign_csr(request.csr_der(), &foreign, SystemTime::now())
        .unwrap_err();

    assert!(matches!(err, Error::ForeignTrustDomain { .. }), "{err:?}");
}

#[test]
fn a_generated_root_is_persisted_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    let now = SystemTime::now();

    let first = MeshCa::load_or_generate(&path, TD, now).unwrap();
    let second = MeshCa::load_or_generate(&path, TD, now).unwrap();
    assert_eq!(first.trust_bundle().roots(), second.trust_bundle().roots());

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key file is private");

    // A certificate from the reloaded CA verifies against the first one's roots.
    let cert = workload(&second, CHECKOUT);
    let leaf = &cert.chain()[0];
    let identity = first
        .trust_bundle()
        .verify(leaf, &[], weft_certs::Usage::Server, now)
        .unwrap();
    assert_eq!(identity, id(CHECKOUT));
}

#[test]
fn replicas_starting_at_once_agree_on_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    let roots: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    MeshCa::load_or_generate(&path, TD, SystemTime::now())
                        .unwrap()
                        .trust_bundle()
                        .roots()
                        .to_vec()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.windows(2).all(|pair| pair[0] == pair[1]));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn operator_material_that_does_not_fit_is_refused_with_a_reason() {
    let operator = operator_root_and_intermediate();
    let other = new_ca();
    let other_key = other.to_pem();

    let cases = [
        (
            "key of another CA",
            MeshCa::from_pem(TD, &operator.chain_pem, &other_key),
            "does not belong",
        ),
        (
            "intermediate without its root",
            MeshCa::from_pem(
                TD,
                operator
                    .chain_pem
                    .split_inclusive("-----END CERTIFICATE-----\n")
                    .next()
                    .unwrap(),
                &operator.key_pem,
            ),
            "must end with its self-signed root",
        ),
        (
            "not PEM",
            MeshCa::from_pem(TD, "hello", &operator.key_pem),
            "decoding PEM CA certificate chain",
        ),
        (
            "no key",
            MeshCa::from_pem(TD, &operator.chain_pem, &operator.root_pem),
            "decoding PEM CA signing key",
        ),
        (
            "bad trust domain",
            MeshCa::from_pem("Cluster.Local", &operator.chain_pem, &operator.key_pem),
            "checking trust domain",
        ),
    ];
    for (case, result, reason) in cases {
        let err = result.unwrap_err().to_string();
        assert!(err.contains(reason), "{case}: {err}");
    }

    // A workload leaf is not a CA, whatever key comes with it.
    let keys = ca_keys(&other);
    let key = KeyPair::generate().unwrap();
    let leaf = leaf_params(vec![uri_san(CHECKOUT)])
        .signed_by(&key, &keys.issuer)
        .unwrap();
    let err = MeshCa::from_pem(TD, &leaf.pem(), &key.serialize_pem())
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a CA"), "{err}");

    // SEC1 keys are common from openssl; the message says how to convert.
    let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n";
    let err = MeshCa::from_pem(TD, &operator.chain_pem, sec1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PKCS#8"), "{err}");
}

#[test]
fn a_trust_bundle_accepts_only_ca_certificates() {
    let ca = new_ca();
    let cert = workload(&ca, CHECKOUT);
    let err = TrustBundle::new(cert.chain().to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be a CA"), "{err}");
    assert!(TrustBundle::new(vec![]).is_err());
    assert!(TrustBundle::from_pem("").is_err());
}

#[test]
fn a_workload_bundle_knows_when_to_renew() {
    let ca = new_ca();
    let now = SystemTime::now();
    let cert = workload_at(&ca, CHECKOUT, now);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    let renew_after = cert.renew_at().duration_since(cert.not_before()).unwrap();
    let share = renew_after.as_secs_f64() / lifetime.as_secs_f64();
    assert!(
        (0.45..0.55).contains(&share),
        "renews at {share:.3} of its lifetime"
    );

    assert!(!cert.needs_renewal(now));
    assert!(cert.needs_renewal(cert.renew_at()));
    assert!(
        !cert.is_expired(cert.renew_at()),
        "the old certificate serves on"
    );
    assert!(cert.is_expired(cert.not_after()));
    assert_eq!(cert.remaining(cert.not_after()), Duration::ZERO);

    // Jitter spreads renewals of certificates issued together.
    let renewals: std::collections::HashSet<_> = (0..8)
        .map(|_| workload_at(&ca, CHECKOUT, now).renew_at())
        .collect();
    assert!(renewals.len() > 1, "all eight renew at the same instant");
}

#[test]
fn a_bundle_is_refused_when_the_ca_answers_for_another_key() {
    let ca = new_ca();
    let now = SystemTime::now();
    let mine = CertificateRequest::generate(&id(CHECKOUT)).unwrap();
    let someone_elses = CertificateRequest::generate(&id(CHECKOUT)).unwrap();
    let chain = ca
        .sign_csr(someone_elses.csr_der(), &id(CHECKOUT), now)
        .unwrap();

    let err = mine
        .complete(chain, ca.trust_bundle().clone(), now)
        .unwrap_err()
        .to_string();

    assert!(err.contains("different key"), "{err}");
}

#[test]
fn a_bundle_is_refused_when_the_chain_is_not_trusted() {
    let ca = new_ca();
    let other = new_ca();
    let now = SystemTime::now();
    let request = CertificateRequest::generate(&id(CHECKOUT)).unwrap();
    let chain = other
        .sign_csr(request.csr_der(), &id(CHECKOUT), now)
        .unwrap();

    let err = request
        .complete(chain, ca.trust_bundle().clone(), now)
        .unwrap_err()
        .to_string();

    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn a_stored_bundle_comes_back_only_for_its_identity_key_and_roots_and_while_valid() {
    let ca = new_ca();
    let now = SystemTime::now();
    let cert = workload_at(&ca, CHECKOUT, now);
    let pem = cert.to_private_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");

    let back =
        WorkloadCertificate::from_private_pem(&id(CHECKOUT), &pem, ca.trust_bundle().clone(), now)
            .unwrap();
    assert_eq!(back.identity(), cert.identity());
    assert_eq!(back.chain(), cert.chain());
    assert_eq!(back.not_after(), cert.not_after());

    // Another identity, other roots, after expiry, another key: refused.
    let other_identity =
        WorkloadCertificate::from_private_pem(&id(FRONTEND), &pem, ca.trust_bundle().clone(), now);
    assert!(other_identity.is_err());
    let other_roots = new_ca().trust_bundle().clone();
    assert!(WorkloadCertificate::from_private_pem(&id(CHECKOUT), &pem, other_roots, now).is_err());
    let expired = WorkloadCertificate::from_private_pem(
        &id(CHECKOUT),
        &pem,
        ca.trust_bundle().clone(),
        cert.not_after() + Duration::from_secs(1),
    );
    assert!(expired.is_err());
    let stranger = workload_at(&ca, CHECKOUT, now).to_private_pem();
    let (stranger_key, _) = stranger.split_at(stranger.find("-----BEGIN CERTIFICATE").unwrap());
    let (_, chain) = pem.split_at(pem.find("-----BEGIN CERTIFICATE").unwrap());
    let swapped = format!("{stranger_key}{chain}");
    assert!(
        WorkloadCertificate::from_private_pem(
            &id(CHECKOUT),
            &swapped,
            ca.trust_bundle().clone(),
            now
        )
        .is_err()
    );
    for garbage in [
        "",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        assert!(
            WorkloadCertificate::from_private_pem(
                &id(CHECKOUT),
                garbage,
                ca.trust_bundle().clone(),
                now
            )
            .is_err()
        );
    }
}
