//! How the proxy reaches the control plane: TCP, then TLS 1.3 that accepts
//! only a server proving the control plane's SPIFFE identity with a chain to
//! the mesh roots, then gRPC over HTTP/2, with the node's bearer token on
//! every call. The config stream and certificate signing both dial through
//! here.
//!
//! The token file and the root file are read again for every connection
//! (the token for every call), so both can be rotated in place without
//! restarting the proxy. Certificate signing keeps one connection for all
//! its calls ([`ControlPlaneTransport::signing_channel`]): a node starting
//! many pods at once must not open a TLS connection per certificate (the
//! control plane caps the connections of one source that have not yet
//! authenticated).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::debug;
use weft_certs::{Identity, TrustBundle};

use crate::config::split_host_port;
use crate::{Error, ProxyConfig};

/// How long TCP plus the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs keep an idle config stream alive and detect a dead peer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The way to the control plane, as configured.
#[derive(Debug)]
pub struct ControlPlaneTransport {
    address: String,
    server_name: ServerName<'static>,
    token_file: PathBuf,
    root_cert: PathBuf,
    expected: Identity,
    key_exchange: weft_certs::KeyExchange,
    /// The connection signing calls share, and the roots it was made with.
    signing: tokio::sync::Mutex<Option<(Vec<Vec<u8>>, Channel)>>,
}

impl ControlPlaneTransport {
    /// Takes the address, files and expected identity from `config`.
    pub fn new(config: &ProxyConfig) -> Result<ControlPlaneTransport, Error> {
        let (host, _port) = split_host_port(&config.control_plane).map_err(|reason| {
            Error::ControlPlaneAddress {
                address: config.control_plane.clone(),
                reason,
            }
        })?;
        // No SNI is sent and the server is checked by its SPIFFE identity,
        // not by name; rustls still wants a name for the session.
        let server_name = ServerName::try_from(host.to_owned())
            .or_else(|_| ServerName::try_from("weft-control-plane"))
            .map_err(|e| Error::ControlPlaneAddress {
                address: config.control_plane.clone(),
                reason: e.to_string(),
            })?;
        Ok(ControlPlaneTransport {
            address: config.control_plane.clone(),
            server_name,
            token_file: config.token_file.clone(),
            root_cert: config.root_cert.clone(),
            expected: config.control_plane_identity.clone(),
            key_exchange: config.key_exchange,
            signing: tokio::sync::Mutex::new(None),
        })
    }

    /// The control plane's address, `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The roots from the root file.
    pub async fn load_roots(&self) -> Result<TrustBundle, Error> {
        load_roots(&self.root_cert).await
    }

    /// The node's token from the token file, ready to attach to calls.
    pub async fn token(&self) -> Result<BearerToken, Error> {
        let invalid = |reason| Error::InvalidToken {
            path: self.token_file.clone(),
            reason,
        };
        let text = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| Error::ReadToken {
                path: self.token_file.clone(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid("the file is empty"));
        }
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| invalid("the token has characters an HTTP header cannot carry"))?;
        Ok(BearerToken(value))
    }

    /// Connects to the control plane. The server must prove the configured
    /// identity with a chain to the roots in the root file or to
    /// `also_trusted` (the roots the control plane last sent, so that a
    /// root rotation does not lock the proxy out).
    pub async fn connect(&self, also_trusted: Option<&TrustBundle>) -> Result<Channel, Error> {
        let roots = self.roots_with(also_trusted).await?;
        self.connect_trusting(&roots).await
    }

    /// The connection certificate signing uses: the one made before, while
    /// the roots it trusts are still the ones to trust, else a new one
    /// (callers wait for it rather than dial one each).
    pub async fn signing_channel(
        &self,
        also_trusted: Option<&TrustBundle>,
    ) -> Result<Channel, Error> {
        let roots = self.roots_with(also_trusted).await?;
        let key: Vec<Vec<u8>> = roots.roots().iter().map(|r| r.to_vec()).collect();
        let mut signing = self.signing.lock().await;
        if let Some((made_with, channel)) = signing.as_ref()
            && *made_with == key
        {
            return Ok(channel.clone());
        }
        let channel = self.connect_trusting(&roots).await?;
        *signing = Some((key, channel.clone()));
        Ok(channel)
    }

    /// Drops the signing connection (a call on it failed): the next call
    /// dials again.
    pub async fn forget_signing_channel(&self) {
        *self.signing.lock().await = None;
    }

    /// The roots of the root file, and `also_trusted` where it merges.
    async fn roots_with(&self, also_trusted: Option<&TrustBundle>) -> Result<TrustBundle, Error> {
        let mut roots = self.load_roots().await?;
        if let Some(extra) = also_trusted
            && let Err(e) = roots.merge(extra)
        {
            debug!(reason = %e, "ignoring the control plane's roots for this connection");
        }
        Ok(roots)
    }

    async fn connect_trusting(&self, roots: &TrustBundle) -> Result<Channel, Error> {
        let tls = weft_certs::control_plane_client_config(roots, &self.expected, self.key_exchange)
            .map_err(|source| Error::ControlPlaneTls { source })?;
        let connector = TlsConnector::from(tls);
        let address = self.address.clone();
        let server_name = self.server_name.clone();
        let dial = tower::service_fn(move |_: Uri| {
            let (connector, address, server_name) =
                (connector.clone(), address.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(address.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        // The scheme is http:// because TLS happens in the connector above.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.address))
            .map_err(|source| self.connect_error(source))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        endpoint
            .connect_with_connector(dial)
            .await
            .map_err(|source| self.connect_error(source))
    }

    fn connect_error(&self, source: tonic::transport::Error) -> Error {
        Error::Connect {
            address: self.address.clone(),
            source,
        }
    }
}

async fn load_roots(path: &Path) -> Result<TrustBundle, Error> {
    let pem = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| Error::ReadRoots {
            path: path.to_owned(),
            source,
        })?;
    TrustBundle::from_pem(&pem).map_err(|source| Error::ParseRoots {
        path: path.to_owned(),
        source,
    })
}

/// Puts `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in logs.
        f.write_str("BearerToken(..)")
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(weft_api::AUTHORIZATION_HEADER, self.0.clone());
        Ok(request)
    }
}

/// Shared by the config stream and certificate signing.
pub(crate) type SharedTransport = Arc<ControlPlaneTransport>;
