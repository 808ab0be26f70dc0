//! In-process HBONE TLS handshakes: the right peers get through, and every
//! kind of wrong peer is refused by the side that checks it.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::time::{Duration, SystemTime};

use rustls::{CertificateError, ProtocolVersion};
use support::*;
use weft_certs::{ALPN_H2, MeshCa, TrustBundle, peer_identity};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://cluster.local/ns/bank/sa/payments";

#[test]
fn workloads_of_one_mesh_authenticate_each_other() {
    let ca = new_ca();
    let frontend = workload(&ca, FRONTEND);
    let checkout = workload(&ca, CHECKOUT);

    let (client, server) = hbone_handshake(&frontend, &checkout, CHECKOUT).unwrap();

    assert_eq!(
        peer_identity(&server).unwrap(),
        id(FRONTEND),
        "server sees the client"
    );
    assert_eq!(
        peer_identity(&client).unwrap(),
        id(CHECKOUT),
        "client sees the server"
    );
    assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(server.alpn_protocol(), Some(ALPN_H2));
    let suite = format!("{:?}", client.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite == "TLS13_AES_128_GCM_SHA256" || suite == "TLS13_AES_256_GCM_SHA384",
        "{suite}"
    );
    assert_eq!(server.server_name(), None, "the client must not send SNI");
}

#[test]
fn client_refuses_a_server_that_is_not_the_expected_identity() {
    let ca = new_ca();
    let frontend = workload(&ca, FRONTEND);
    let payments = workload(&ca, PAYMENTS);

    let refusal = hbone_handshake(&frontend, &payments, CHECKOUT).unwrap_err();

    assert!(matches!(refusal, Refusal::ByClient(_)), "{refusal:?}");
    let message = refusal.message();
    assert!(
        message.contains(&format!("expected {CHECKOUT}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("the peer is {PAYMENTS}")),
        "{message}"
    );
}

#[test]
fn client_refuses_a_server_from_another_ca() {
    let ours = new_ca();
    let theirs = new_ca();
    let frontend = workload(&ours, FRONTEND);
    // Same identity, same trust domain, but vouched for by a CA we do not trust.
    let impostor = workload(&theirs, CHECKOUT);

    let refusal = hbone_handshake(&frontend, &impostor, CHECKOUT).unwrap_err();

    assert!(
        matches!(
            refusal,
            Refusal::ByClient(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{refusal:?}"
    );
}

#[test]
fn server_refuses_a_client_from_another_ca() {
    let ours = new_ca();
    let theirs = new_ca();
    let checkout = workload(&ours, CHECKOUT);
    // A genuine certificate of the other CA; the impostor accepts any server,
    // so only our server's check stands in the way.
    let impostor = craft(&ca_keys(&theirs), leaf_params(vec![uri_san(FRONTEND)]));
    let client = rogue_client(Some(impostor));

    let refusal = handshake(
        client,
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();

    assert!(
        matches!(
            refusal,
            Refusal::ByServer(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{refusal:?}"
    );
}

#[test]
fn expired_certificates_are_refused_on_both_sides() {
    let ca = new_ca();
    let two_days_ago = SystemTime::now() - Duration::from_secs(48 * 3600);
    let fresh_frontend = workload(&ca, FRONTEND);
    let fresh_checkout = workload(&ca, CHECKOUT);
    let old_frontend = workload_at(&ca, FRONTEND, two_days_ago);
    let old_checkout = workload_at(&ca, CHECKOUT, two_days_ago);
    assert!(old_checkout.is_expired(SystemTime::now()));

    let refusal = hbone_handshake(&fresh_frontend, &old_checkout, CHECKOUT).unwrap_err();
    assert!(
        matches!(
            refusal,
            Refusal::ByClient(rustls::Error::InvalidCertificate(CertificateError::Expired))
        ),
        "{refusal:?}"
    );

    let refusal = hbone_handshake(&old_frontend, &fresh_checkout, CHECKOUT).unwrap_err();
    assert!(
        matches!(
            refusal,
            Refusal::ByServer(rustls::Error::InvalidCertificate(CertificateError::Expired))
        ),
        "{refusal:?}"
    );
}

#[test]
fn certificates_without_a_uri_san_are_refused() {
    let ca = new_ca();
    let keys = ca_keys(&ca);
    let frontend = workload(&ca, FRONTEND);
    let checkout = workload(&ca, CHECKOUT);
    // Signed by the mesh CA's own key, but naming a DNS name instead of a SPIFFE ID.
    let dns_only = || {
        craft(
            &keys,
            leaf_params(vec![rcgen::SanType::DnsName(
                "checkout.shop".try_into().unwrap(),
            )]),
        )
    };

    let (chain, key) = dns_only();
    let refusal = handshake(
        weft_certs::hbone_client_config(
            &frontend,
            &id(CHECKOUT),
            weft_certs::KeyExchange::default(),
        )
        .unwrap(),
        rogue_server(chain, key),
    )
    .unwrap_err();
    assert!(matches!(refusal, Refusal::ByClient(_)), "{refusal:?}");
    assert!(
        refusal.message().contains("no URI SAN"),
        "{}",
        refusal.message()
    );

    let refusal = handshake(
        rogue_client(Some(dns_only())),
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(refusal, Refusal::ByServer(_)), "{refusal:?}");
    assert!(
        refusal.message().contains("no URI SAN"),
        "{}",
        refusal.message()
    );
}

#[test]
fn certificates_with_two_spiffe_ids_are_refused() {
    let ca = new_ca();
    let keys = ca_keys(&ca);
    let checkout = workload(&ca, CHECKOUT);
    let two = craft(
        &keys,
        leaf_params(vec![uri_san(FRONTEND), uri_san(PAYMENTS)]),
    );

    let refusal = handshake(
        rogue_client(Some(two)),
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();

    assert!(matches!(refusal, Refusal::ByServer(_)), "{refusal:?}");
    assert!(
        refusal.message().contains("2 URI SANs"),
        "{}",
        refusal.message()
    );
}

#[test]
fn server_refuses_a_client_of_another_trust_domain() {
    // Two trust domains that share a root (as in a federation gone wrong):
    // the chain verifies, so only the trust-domain check stands in the way.
    let ca = new_ca();
    let other_domain = MeshCa::from_pem("other.local", &ca.to_pem(), &ca.to_pem()).unwrap();
    let foreign = workload(&other_domain, "spiffe://other.local/ns/shop/sa/frontend");
    let checkout = workload(&ca, CHECKOUT);

    let refusal = hbone_handshake(&foreign, &checkout, CHECKOUT).unwrap_err();

    assert!(matches!(refusal, Refusal::ByServer(_)), "{refusal:?}");
    assert!(
        refusal
            .message()
            .contains("is not in trust domain \"cluster.local\""),
        "{}",
        refusal.message()
    );
}

#[test]
fn a_client_certificate_without_client_auth_usage_is_refused() {
    let ca = new_ca();
    let keys = ca_keys(&ca);
    let checkout = workload(&ca, CHECKOUT);
    let server_only = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    // Absent extendedKeyUsage would pass the web PKI's "allowed if absent" rule.
    for (usages, reason) in [
        (server_only, "RequiredEkuNotFound"),
        (vec![], "extendedKeyUsage does not list clientAuth"),
    ] {
        let mut params = leaf_params(vec![uri_san(FRONTEND)]);
        params.extended_key_usages = usages;

        let refusal = handshake(
            rogue_client(Some(craft(&keys, params))),
            weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
        )
        .unwrap_err();

        assert!(matches!(refusal, Refusal::ByServer(_)), "{refusal:?}");
        assert!(refusal.message().contains(reason), "{}", refusal.message());
    }
}

#[test]
fn a_ca_certificate_cannot_pose_as_a_workload() {
    let ca = new_ca();
    let keys = ca_keys(&ca);
    let frontend = workload(&ca, FRONTEND);
    let mut params = leaf_params(vec![uri_san(CHECKOUT)]);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let (chain, key) = craft(&keys, params);

    let refusal = handshake(
        weft_certs::hbone_client_config(
            &frontend,
            &id(CHECKOUT),
            weft_certs::KeyExchange::default(),
        )
        .unwrap(),
        rogue_server(chain, key),
    )
    .unwrap_err();

    assert!(matches!(refusal, Refusal::ByClient(_)), "{refusal:?}");
    assert!(
        refusal.message().contains("CaUsedAsEndEntity"),
        "{}",
        refusal.message()
    );
}

#[test]
fn server_requires_a_client_certificate() {
    let ca = new_ca();
    let checkout = workload(&ca, CHECKOUT);

    let refusal = handshake(
        rogue_client(None),
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();

    assert!(
        matches!(
            refusal,
            Refusal::ByServer(rustls::Error::NoCertificatesPresented)
        ),
        "{refusal:?}"
    );
}

#[test]
fn server_refuses_tls_1_2() {
    let ca = new_ca();
    let checkout = workload(&ca, CHECKOUT);
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnything))
    .with_no_client_auth();

    let refusal = handshake(
        std::sync::Arc::new(client),
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();

    assert!(
        matches!(
            refusal,
            Refusal::ByServer(rustls::Error::PeerIncompatible(_))
        ),
        "{refusal:?}"
    );
}

#[test]
fn server_refuses_a_client_without_h2() {
    let ca = new_ca();
    let checkout = workload(&ca, CHECKOUT);
    let frontend = workload(&ca, FRONTEND);
    let mut client = (*weft_certs::hbone_client_config(
        &frontend,
        &id(CHECKOUT),
        weft_certs::KeyExchange::default(),
    )
    .unwrap())
    .clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let refusal = handshake(
        std::sync::Arc::new(client),
        weft_certs::hbone_server_config(&checkout, weft_certs::KeyExchange::default()).unwrap(),
    )
    .unwrap_err();

    assert!(
        matches!(
            refusal,
            Refusal::ByServer(rustls::Error::NoApplicationProtocol)
        ),
        "{refusal:?}"
    );
}

#[test]
fn a_chain_through_an_operator_intermediate_validates() {
    let operator = operator_root_and_intermediate();
    let ca = MeshCa::from_pem(TD, &operator.chain_pem, &operator.key_pem).unwrap();
    assert_eq!(
        ca.trust_bundle().roots().len(),
        1,
        "only the operator root is trusted"
    );

    let frontend = workload(&ca, FRONTEND);
    let checkout = workload(&ca, CHECKOUT);
    assert_eq!(
        checkout.chain().len(),
        2,
        "leaf and intermediate are presented"
    );

    let (client, server) = hbone_handshake(&frontend, &checkout, CHECKOUT).unwrap();
    assert_eq!(peer_identity(&server).unwrap(), id(FRONTEND));
    assert_eq!(peer_identity(&client).unwrap(), id(CHECKOUT));
}

#[test]
fn both_roots_are_trusted_during_a_root_rotation() {
    let mut old = new_ca();
    let mut new = new_ca();
    let old_roots = old.trust_bundle().clone();
    let new_roots = new.trust_bundle().clone();
    let on_old_root = workload(&old, FRONTEND);
    let on_new_root_only = workload(&new, CHECKOUT);
    let refusal = hbone_handshake(&on_old_root, &on_new_root_only, CHECKOUT).unwrap_err();
    assert!(matches!(refusal, Refusal::ByClient(_)), "{refusal:?}");

    // Overlap window: both CAs trust both roots.
    old.trust_also(&new_roots).unwrap();
    new.trust_also(&old_roots).unwrap();
    let frontend = workload(&old, FRONTEND);
    let checkout = workload(&new, CHECKOUT);

    let (client, server) = hbone_handshake(&frontend, &checkout, CHECKOUT).unwrap();
    assert_eq!(peer_identity(&server).unwrap(), id(FRONTEND));
    assert_eq!(peer_identity(&client).unwrap(), id(CHECKOUT));

    // A bundle can also be assembled from PEM, as it travels in config.
    let both =
        TrustBundle::from_pem(&format!("{}{}", old_roots.to_pem(), new_roots.to_pem())).unwrap();
    assert_eq!(both.roots().len(), 2);
}

#[test]
fn a_certificate_can_trust_the_roots_of_a_later_rotation() {
    // Issued before the new root existed, the frontend's bundle knows only
    // the old root; given the mesh's current roots it accepts the new one.
    let old = new_ca();
    let mut new = new_ca();
    let frontend = workload(&old, FRONTEND);
    new.trust_also(old.trust_bundle()).unwrap();
    let checkout = workload(&new, CHECKOUT);
    assert!(hbone_handshake(&frontend, &checkout, CHECKOUT).is_err());

    let current_roots = new.trust_bundle().clone();
    let frontend = frontend.with_trust(current_roots);
    let (client, server) = hbone_handshake(&frontend, &checkout, CHECKOUT).unwrap();
    assert_eq!(peer_identity(&server).unwrap(), id(FRONTEND));
    assert_eq!(peer_identity(&client).unwrap(), id(CHECKOUT));
}
