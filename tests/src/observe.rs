//! What a test reads off a running mesh: a proxy's config dump and
//! certificates, waiting for them to change, and a certificate request made
//! the way a proxy makes it (to check what the control plane refuses).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{Testbed, WeftMesh, wait_until};

/// How long a test waits for a config change to reach a proxy.
pub const CONFIG_WAIT: Duration = Duration::from_secs(30);

/// The `uid`s of the workloads in `list` (`local_workloads` or
/// `remote_workloads`) of a config dump.
pub fn uids(dump: &Value, list: &str) -> BTreeSet<String> {
    dump[list]
        .as_array()
        .map(|workloads| {
            workloads
                .iter()
                .filter_map(|w| w["uid"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl WeftMesh {
    /// The config dump of the proxy of `node`.
    pub fn config_dump(&self, testbed: &Testbed, node: &str) -> Result<Value> {
        let text = self.proxy_admin(testbed, node, "/config_dump")?;
        serde_json::from_str(&text).context("the config dump is not JSON")
    }

    /// Waits until `condition` holds for the config dump of `node`'s proxy;
    /// the error carries the last dump.
    pub fn wait_for_dump(
        &self,
        testbed: &Testbed,
        node: &str,
        what: &str,
        condition: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let waited = wait_until(CONFIG_WAIT, || {
            Ok(self
                .config_dump(testbed, node)
                .is_ok_and(|dump| condition(&dump)))
        });
        waited.with_context(|| {
            let last = self
                .proxy_admin(testbed, node, "/config_dump")
                .unwrap_or_default();
            format!("{node}: {what} never happened; last dump: {last}")
        })
    }

    /// The identities the proxy of `node` holds certificates for (empty
    /// while its admin endpoint is not up yet).
    pub fn cert_identities(&self, testbed: &Testbed, node: &str) -> BTreeSet<String> {
        let Ok(text) = self.proxy_admin(testbed, node, "/certs") else {
            return BTreeSet::new();
        };
        let certs: Value = serde_json::from_str(&text).unwrap_or_default();
        certs
            .as_array()
            .map(|certs| {
                certs
                    .iter()
                    .filter_map(|c| c["identity"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One Sign call over an already connected TCP socket (opened in a node's
/// namespace), verifying the control plane's identity like a proxy does,
/// with `token` as the node's credential.
pub async fn sign_over(
    socket: std::net::TcpStream,
    roots: weft_certs::TrustBundle,
    token: &str,
    identity: &weft_certs::Identity,
) -> Result<std::result::Result<weft_api::v1::SignResponse, tonic::Status>> {
    let channel = control_plane_channel(socket, roots).await?;
    let request = weft_certs::CertificateRequest::generate(identity)?;
    let mut call = tonic::Request::new(weft_api::v1::SignRequest {
        identity: identity.to_string(),
        csr_der: request.csr_der().to_vec(),
    });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(
        weft_api::v1::certificates_client::CertificatesClient::new(channel)
            .sign(call)
            .await
            .map(tonic::Response::into_inner),
    )
}

/// A gRPC channel to the control plane over an already connected TCP
/// socket, verifying its identity like a proxy does; every call on it
/// shares the one connection.
pub async fn control_plane_channel(
    socket: std::net::TcpStream,
    roots: weft_certs::TrustBundle,
) -> Result<tonic::transport::Channel> {
    socket.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(socket)?;
    let expected =
        weft_certs::Identity::parse("spiffe://cluster.local/ns/weft-system/sa/weft-control-plane")?;
    let tls = tokio_rustls::TlsConnector::from(weft_certs::control_plane_client_config(
        &roots,
        &expected,
        weft_certs::KeyExchange::default(),
    )?);
    let server_name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let stream = tls.connect(server_name, tcp).await?;
    let slot = std::sync::Mutex::new(Some(stream));
    let channel = tonic::transport::Endpoint::from_static("http://control-plane")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = slot.lock().ok().and_then(|mut slot| slot.take());
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection only"))
            }
        }))
        .await?;
    Ok(channel)
}
