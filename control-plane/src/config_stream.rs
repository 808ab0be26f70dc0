//! The `NodeConfig` service: one stream per node proxy, full state first,
//! then deltas as the mesh changes, each acknowledged or refused.
//!
//! Every stream follows the mesh through a `watch` channel, so a burst of
//! changes while a proxy is slow coalesces into one delta: the stream always
//! moves from the view it last sent to the newest view.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;

use crate::mesh::Mesh;
use crate::node_auth::NodeAuthenticator;
use crate::registry::NodeRegistry;
use crate::view::NodeView;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Updates queued per stream before the stream waits for the proxy.
const STREAM_BUFFER: usize = 4;

/// The config stream service.
#[derive(Clone)]
pub struct ConfigStreamService {
    mesh: watch::Receiver<Arc<Mesh>>,
    auth: Arc<NodeAuthenticator>,
    registry: Arc<NodeRegistry>,
    max_message_bytes: usize,
    /// Open streams one node may hold (see `--max-config-streams-per-node`).
    max_streams_per_node: u32,
}

impl ConfigStreamService {
    /// A service streaming `mesh` to proxies that authenticate with `auth`,
    /// in messages of at most `max_message_bytes` (the server's encoding
    /// limit, which this service only reports on).
    pub fn new(
        mesh: watch::Receiver<Arc<Mesh>>,
        auth: Arc<NodeAuthenticator>,
        registry: Arc<NodeRegistry>,
        max_message_bytes: usize,
    ) -> ConfigStreamService {
        ConfigStreamService {
            mesh,
            auth,
            registry,
            max_message_bytes,
            max_streams_per_node: u32::MAX,
        }
    }

    /// At most `max` open streams per node: each holds the node's whole
    /// view, and a stolen node token must not multiply it.
    pub fn with_max_streams_per_node(mut self, max: u32) -> ConfigStreamService {
        self.max_streams_per_node = max;
        self
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_config_server::NodeConfig for ConfigStreamService {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let node = self.auth.authenticate(&request).await?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))?;
        let hello = match first? {
            Some(pb::ProxyMessage {
                kind: Some(Kind::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node != node {
            warn!(token_node = %node, claimed = %hello.node, "proxy claims another node than its token's");
            return Err(Status::permission_denied(format!(
                "the token belongs to node {node}, the proxy says it is {}",
                hello.node
            )));
        }
        let (updates, rx) = mpsc::channel(STREAM_BUFFER);
        let span = info_span!("config_stream", node = %node);
        let stream = NodeStream {
            node,
            max_message_bytes: self.max_message_bytes,
            mesh: self.mesh.clone(),
            registry: self.registry.clone(),
            updates,
        };
        if !self.registry.connected(
            &stream.node,
            &hello.proxy_version,
            self.max_streams_per_node,
        ) {
            warn!(node = %stream.node, max = self.max_streams_per_node, "refused a config stream: the node holds its share");
            return Err(Status::resource_exhausted(format!(
                "node {} already holds {} config streams",
                stream.node, self.max_streams_per_node
            )));
        }
        tokio::spawn(stream.run(inbound).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's stream.
struct NodeStream {
    node: String,
    max_message_bytes: usize,
    mesh: watch::Receiver<Arc<Mesh>>,
    registry: Arc<NodeRegistry>,
    updates: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
}

impl NodeStream {
    async fn run(mut self, mut inbound: Streaming<pb::ProxyMessage>) {
        info!("proxy connected");
        let mesh = self.mesh.borrow_and_update().clone();
        let mut view = NodeView::of(&mesh, &self.node);
        let mut version = 1;
        if self.send(view.full_update(version)).await {
            loop {
                tokio::select! {
                    changed = self.mesh.changed() => {
                        if changed.is_err() {
                            break; // the control plane is shutting down
                        }
                        let mesh = self.mesh.borrow_and_update().clone();
                        let next = NodeView::of(&mesh, &self.node);
                        if let Some(delta) = view.delta_to(&next, version + 1) {
                            version += 1;
                            if !self.send(delta).await {
                                break;
                            }
                        }
                        view = next;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(message)) => self.on_message(message),
                        Ok(None) => break,
                        Err(status) => {
                            debug!(%status, "stream from the proxy failed");
                            break;
                        }
                    },
                }
            }
        }
        self.registry.disconnected(&self.node);
        info!("proxy disconnected");
    }

    async fn send(&self, update: pb::ConfigUpdate) -> bool {
        let version = update.version;
        let bytes = prost::Message::encoded_len(&update);
        if bytes > self.max_message_bytes {
            // gRPC will refuse to send it and end the stream; say why here,
            // where the operator can raise the limit.
            error!(
                version,
                bytes,
                limit = self.max_message_bytes,
                "config update is larger than --max-config-message-bytes; the proxy gets none"
            );
        }
        debug!(
            version,
            full = update.full_state,
            local = update.local_workloads.len(),
            remote = update.remote_workloads.len(),
            services = update.services.len(),
            "sending config"
        );
        if self.updates.send(Ok(update)).await.is_err() {
            return false;
        }
        self.registry.sent(&self.node, version);
        true
    }

    fn on_message(&self, message: pb::ProxyMessage) {
        match message.kind {
            Some(Kind::Ack(ack)) => {
                debug!(version = ack.version, "proxy applied config");
                self.registry.acked(&self.node, ack.version);
            }
            Some(Kind::Nack(nack)) if nack.applied => {
                warn!(version = nack.version, reason = %nack.reason, "proxy applied config except some entries it refused");
                self.registry
                    .nacked(&self.node, nack.version, &nack.reason, true);
            }
            Some(Kind::Nack(nack)) => {
                warn!(version = nack.version, reason = %nack.reason, "proxy refused config");
                self.registry
                    .nacked(&self.node, nack.version, &nack.reason, false);
            }
            Some(Kind::Hello(_)) | None => {
                warn!("unexpected message on an open stream; ignored");
            }
        }
    }
}
