//! The `NodeConfig` service: one stream per node proxy, full state first,
//! then deltas as the mesh changes, each acknowledged or refused.
//!
//! Every stream follows the published mesh through a `watch` channel, so a
//! burst of changes while a proxy is slow coalesces into one delta: the
//! stream always moves from the mesh it last sent to the newest, reading only
//! the keys that changed in between ([`crate::fanout`]).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;

use crate::fanout::{NodeFeed, Published};
use crate::node_auth::NodeAuthenticator;
use crate::registry::NodeRegistry;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Updates queued per stream before the stream waits for the proxy: one,
/// so that a stream knows when gRPC took its full state (see
/// [`ConfigStreamService::with_max_full_states`]), and a slow proxy's
/// changes coalesce here rather than queue.
const STREAM_BUFFER: usize = 1;

/// The config stream service.
#[derive(Clone)]
pub struct ConfigStreamService {
    mesh: watch::Receiver<Arc<Published>>,
    auth: Arc<NodeAuthenticator>,
    registry: Arc<NodeRegistry>,
    max_message_bytes: usize,
    /// Open streams one node may hold (see `--max-config-streams-per-node`).
    max_streams_per_node: u32,
    /// Full states being built or handed to gRPC at once.
    full_states: Arc<Semaphore>,
}

impl ConfigStreamService {
    /// A service streaming `mesh` to proxies that authenticate with `auth`,
    /// in messages of at most `max_message_bytes` (the server's encoding
    /// limit, which this service only reports on).
    pub fn new(
        mesh: watch::Receiver<Arc<Published>>,
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
            full_states: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        }
    }

    /// At most `max` full states built or waiting for gRPC at once: each
    /// is as large as the cluster, and a thousand proxies reconnecting
    /// together must not hold a thousand of them.
    pub fn with_max_full_states(mut self, max: usize) -> ConfigStreamService {
        self.full_states = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
        self
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
            full_states: self.full_states.clone(),
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
    mesh: watch::Receiver<Arc<Published>>,
    registry: Arc<NodeRegistry>,
    full_states: Arc<Semaphore>,
    updates: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
}

impl NodeStream {
    async fn run(mut self, mut inbound: Streaming<pb::ProxyMessage>) {
        info!("proxy connected");
        let mut version = 1;
        let permit = self.full_states.clone().acquire_owned().await;
        let published = self.mesh.borrow_and_update().clone();
        let (mut feed, full) = NodeFeed::start(&self.node, &published, version);
        drop(published);
        let sent = permit.is_ok() && self.send_full(full).await;
        drop(permit);
        if sent {
            loop {
                tokio::select! {
                    changed = self.mesh.changed() => {
                        if changed.is_err() {
                            break; // the control plane is shutting down
                        }
                        let published = self.mesh.borrow_and_update().clone();
                        let Some(update) = feed.update(&published, version + 1) else {
                            continue;
                        };
                        drop(published);
                        version += 1;
                        let sent = if update.full_state {
                            // Behind the kept changes: the full state waits its turn.
                            let _permit = self.full_states.clone().acquire_owned().await;
                            self.send_full(update).await
                        } else {
                            self.send(update).await
                        };
                        if !sent {
                            break;
                        }
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

    /// Sends a full state and waits until gRPC has taken it (the caller
    /// holds a full-state permit until then); whether the proxy is there.
    async fn send_full(&self, full: pb::ConfigUpdate) -> bool {
        if !self.send(full).await {
            return false;
        }
        // The channel holds one message: room again means gRPC took it.
        self.updates.reserve().await.is_ok()
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
