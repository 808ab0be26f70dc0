//! The key exchange of HBONE and control-plane TLS: the post-quantum hybrid
//! X25519MLKEM768 between weft peers, X25519 with a peer that has nothing
//! better (unless the post-quantum exchange is required), and a refusal
//! that says why when it is required and the peer cannot.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::sync::Arc;

use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::{ClientConfig, ServerConfig};
use support::*;
use weft_certs::{
    KeyExchange, WorkloadCertificate, hbone_client_config, hbone_server_config, key_exchange_group,
};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

const PREFERRED: KeyExchange = KeyExchange::PostQuantumPreferred;
const REQUIRED: KeyExchange = KeyExchange::PostQuantumRequired;

/// A weft frontend and checkout, and the same identities' certificates as
/// a classic peer holds them (chain and key).
struct Peers {
    frontend: WorkloadCertificate,
    checkout: WorkloadCertificate,
    classic_frontend: Classic,
    classic_checkout: Classic,
}

type Classic = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn peers() -> Peers {
    let ca = new_ca();
    let keys = ca_keys(&ca);
    Peers {
        frontend: workload(&ca, FRONTEND),
        checkout: workload(&ca, CHECKOUT),
        classic_frontend: craft(&keys, leaf_params(vec![uri_san(FRONTEND)])),
        classic_checkout: craft(&keys, leaf_params(vec![uri_san(CHECKOUT)])),
    }
}

fn client(cert: &WorkloadCertificate, policy: KeyExchange) -> Arc<ClientConfig> {
    hbone_client_config(cert, &id(CHECKOUT), policy).unwrap()
}

fn server(cert: &WorkloadCertificate, policy: KeyExchange) -> Arc<ServerConfig> {
    hbone_server_config(cert, policy).unwrap()
}

/// A provider that offers only `groups`, in that order: a peer such as a
/// ztunnel built on ring (X25519, P-256, P-384) or one with aws-lc-rs in
/// its default order (X25519 first, the hybrid last).
fn offering(groups: Vec<&'static dyn SupportedKxGroup>) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: groups,
        ..default_provider()
    })
}

fn classic_server((chain, key): &Classic) -> Arc<ServerConfig> {
    let provider = offering(vec![
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ]);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(AcceptAnything))
        .with_single_cert(chain.clone(), key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn classic_client(
    (chain, key): &Classic,
    groups: Vec<&'static dyn SupportedKxGroup>,
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(offering(groups))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[test]
fn weft_peers_agree_on_the_hybrid_post_quantum_exchange() {
    let Peers {
        frontend, checkout, ..
    } = peers();
    for (client_policy, server_policy) in [
        (PREFERRED, PREFERRED),
        (PREFERRED, REQUIRED),
        (REQUIRED, PREFERRED),
        (REQUIRED, REQUIRED),
    ] {
        let (client, server) = handshake(
            client(&frontend, client_policy),
            server(&checkout, server_policy),
        )
        .unwrap();
        assert_eq!(key_exchange_group(&client), "X25519MLKEM768");
        assert_eq!(key_exchange_group(&server), "X25519MLKEM768");
    }
}

#[test]
fn a_peer_without_ml_kem_gets_x25519_unless_post_quantum_is_required() {
    let peers = peers();
    // weft dials a server that has only classic groups.
    let weft = client(&peers.frontend, PREFERRED);
    let (client, _) = handshake(weft, classic_server(&peers.classic_checkout)).unwrap();
    assert_eq!(key_exchange_group(&client), "X25519");
    // A classic client reaches a weft server.
    let classic = classic_client(
        &peers.classic_frontend,
        vec![kx_group::X25519, kx_group::SECP256R1],
    );
    let (_, server) = handshake(classic, server(&peers.checkout, PREFERRED)).unwrap();
    assert_eq!(key_exchange_group(&server), "X25519");
}

#[test]
fn with_post_quantum_required_a_classic_peer_is_refused_saying_why() {
    let peers = peers();
    // As the server: the client offers nothing this side allows.
    let classic = classic_client(
        &peers.classic_frontend,
        vec![kx_group::X25519, kx_group::SECP256R1],
    );
    match handshake(classic, server(&peers.checkout, REQUIRED)) {
        Err(Refusal::ByServer(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoKxGroupsInCommon,
        ))) => {}
        other => panic!(
            "expected no key exchange group in common, got {:?}",
            other.err()
        ),
    }
    // As the client: the server answers with a handshake_failure alert.
    let weft = client(&peers.frontend, REQUIRED);
    assert_eq!(
        what_the_client_hears(weft, classic_server(&peers.classic_checkout)),
        rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)
    );
}

#[test]
fn a_peer_that_ranks_the_hybrid_last_still_agrees_to_it_when_it_is_required() {
    // aws-lc-rs's default order without rustls's post-quantum preference:
    // what a ztunnel offers unless its compliance policy says pqc.
    let peers = peers();
    let ranks_it_last = classic_client(
        &peers.classic_frontend,
        vec![
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::X25519MLKEM768,
        ],
    );
    let (_, server) = handshake(ranks_it_last, server(&peers.checkout, REQUIRED)).unwrap();
    assert_eq!(key_exchange_group(&server), "X25519MLKEM768");
}

#[test]
fn policies_are_named_in_flags_as_they_print() {
    for policy in KeyExchange::ALL {
        assert_eq!(policy.to_string().parse::<KeyExchange>().unwrap(), policy);
    }
    assert_eq!(KeyExchange::default(), PREFERRED);
    let error = "pqc".parse::<KeyExchange>().unwrap_err().to_string();
    assert!(error.contains("post-quantum-required"), "{error}");
}

/// The error a client's handshake ends with when the server refuses it:
/// the server's alert, delivered.
fn what_the_client_hears(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> rustls::Error {
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = rustls::ClientConnection::new(client, name).unwrap();
    let mut server = rustls::ServerConnection::new(server).unwrap();
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    server.read_tls(&mut hello.as_slice()).unwrap();
    assert!(server.process_new_packets().is_err(), "the server accepted");
    let mut alert = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut alert).unwrap();
    }
    client.read_tls(&mut alert.as_slice()).unwrap();
    client.process_new_packets().unwrap_err()
}
