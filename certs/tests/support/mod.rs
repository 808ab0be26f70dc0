//! Helpers shared by the weft-certs integration tests: a CA and workloads made
//! through the real API, an in-memory TLS handshake, and the tools of an
//! attacker (certificates crafted with a CA's key, TLS configs that skip all
//! checks) for the tests that must fail.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName as TlsName,
    ServerConfig, ServerConnection, SignatureScheme,
};
use weft_certs::{
    CertificateRequest, Identity, KeyExchange, MeshCa, WorkloadCertificate, hbone_client_config,
    hbone_crypto_provider, hbone_server_config,
};

pub const TD: &str = "cluster.local";

pub fn id(uri: &str) -> Identity {
    uri.parse().unwrap()
}

pub fn new_ca() -> MeshCa {
    MeshCa::generate_root(TD, SystemTime::now()).unwrap()
}

/// A workload certificate obtained the way a node proxy obtains one.
pub fn workload(ca: &MeshCa, identity: &str) -> WorkloadCertificate {
    workload_at(ca, identity, SystemTime::now())
}

/// Same, but signed (and checked) as if the clock showed `at`.
pub fn workload_at(ca: &MeshCa, identity: &str, at: SystemTime) -> WorkloadCertificate {
    let identity = id(identity);
    let request = CertificateRequest::generate(&identity).unwrap();
    let chain = ca.sign_csr(request.csr_der(), &identity, at).unwrap();
    request
        .complete(chain, ca.trust_bundle().clone(), at)
        .unwrap()
}

/// Which side of a handshake gave up first, and why.
#[derive(Debug)]
pub enum Refusal {
    /// The client refused the server.
    ByClient(rustls::Error),
    /// The server refused the client.
    ByServer(rustls::Error),
}

impl Refusal {
    /// weft's reason where the refusal came from a weft verifier, else rustls's.
    pub fn message(&self) -> String {
        let (Refusal::ByClient(e) | Refusal::ByServer(e)) = self;
        match weft_certs::refusal_reason(e) {
            Some(reason) => reason.to_string(),
            None => e.to_string(),
        }
    }
}

/// Runs a full TLS handshake in memory and returns both finished connections.
pub fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(ClientConnection, ServerConnection), Refusal> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = ClientConnection::new(client, name).unwrap();
    let mut server = ServerConnection::new(server).unwrap();
    for _ in 0..16 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        server.read_tls(&mut to_server.as_slice()).unwrap();
        server.process_new_packets().map_err(Refusal::ByServer)?;

        let mut to_client = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut to_client).unwrap();
        }
        client.read_tls(&mut to_client.as_slice()).unwrap();
        client.process_new_packets().map_err(Refusal::ByClient)?;

        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish");
}

/// A handshake between two weft workloads, the client expecting `expected`.
pub fn hbone_handshake(
    client: &WorkloadCertificate,
    server: &WorkloadCertificate,
    expected: &str,
) -> Result<(ClientConnection, ServerConnection), Refusal> {
    handshake(
        hbone_client_config(client, &id(expected), KeyExchange::default()).unwrap(),
        hbone_server_config(server, KeyExchange::default()).unwrap(),
    )
}

/// The signing key and certificate of a CA, as an attacker holding them
/// (or the CA itself, for certificates it would never issue) would use them.
pub struct CaKeys {
    pub issuer: Issuer<'static, KeyPair>,
}

pub fn ca_keys(ca: &MeshCa) -> CaKeys {
    let pem = ca.to_pem();
    let PrivateKeyDer::Pkcs8(pkcs8) = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap() else {
        panic!("the CA key is PKCS#8");
    };
    let key = KeyPair::try_from(&pkcs8).unwrap();
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    CaKeys {
        issuer: Issuer::from_ca_cert_der(&cert, key).unwrap(),
    }
}

/// Leaf parameters exactly like the ones the mesh CA issues, for an
/// attacker to modify one field at a time.
pub fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::hours(1);
    params
}

pub fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.to_string().try_into().unwrap())
}

/// A certificate signed with the CA's key from arbitrary parameters, and its key.
pub fn craft(
    keys: &CaKeys,
    params: CertificateParams,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &keys.issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// A TLS server that presents whatever it is given and accepts any client.
pub fn rogue_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    let mut config =
        ServerConfig::builder_with_provider(hbone_crypto_provider(KeyExchange::default()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(AcceptAnything))
            .with_single_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS client that presents whatever it is given (or nothing) and accepts any server.
pub fn rogue_client(
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(hbone_crypto_provider(KeyExchange::default()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything));
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A verifier that checks nothing: the attacker's side of a handshake.
#[derive(Debug)]
pub struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        hbone_crypto_provider(KeyExchange::default())
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAnything {
    fn root_hint_subjects(&self) -> &[TlsName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// CA material as an operator brings it: an intermediate (chain: the
/// intermediate, then its root) and the intermediate's PKCS#8 key.
pub struct OperatorCa {
    pub chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
}

pub fn operator_root_and_intermediate() -> OperatorCa {
    let ca_params = |name: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("operator root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let intermediate_key = KeyPair::generate().unwrap();
    let intermediate = ca_params("operator intermediate for weft")
        .signed_by(&intermediate_key, &root_issuer)
        .unwrap();
    OperatorCa {
        chain_pem: format!("{}{}", intermediate.pem(), root.pem()),
        key_pem: intermediate_key.serialize_pem(),
        root_pem: root.pem(),
    }
}
