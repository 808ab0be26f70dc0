//! The `NodeConfig` service: one stream per node proxy, full state first,
//! then deltas as the mesh changes, each acknowledged or refused.
//!
//! Every stream follows the published mesh through a `watch` channel, so a
//! burst of changes while a proxy is slow coalesces into one delta: the
//! stream always moves from the mesh it last sent to the newest, reading only
//! the keys that changed in between ([`crate::fanout`]).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};
use weft_api::parts::EncodedUpdate;
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;

use crate::fanout::{Delta, NodeFeed, Outgoing, Published};
use crate::full_state::FullState;
use crate::node_auth::NodeAuthenticator;
use crate::registry::NodeRegistry;
use crate::reported_traffic::ReportedTraffic;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Messages queued per stream before the stream waits for the proxy: one,
/// so that a stream knows when gRPC took its full state (see
/// [`ConfigStreamService::with_max_full_states`]), a full state is written
/// only as fast as it is sent, and a slow proxy's changes coalesce here
/// rather than queue.
const STREAM_BUFFER: usize = 1;

/// The config stream service.
#[derive(Clone)]
pub struct ConfigStreamService {
    mesh: watch::Receiver<Arc<Published>>,
    auth: Arc<NodeAuthenticator>,
    registry: Arc<NodeRegistry>,
    max_message_bytes: usize,
    /// The size of an update's parts for proxies that accept parts (see
    /// `--config-part-bytes`).
    part_bytes: usize,
    /// Open streams one node may hold (see `--max-config-streams-per-node`).
    max_streams_per_node: u32,
    /// Full states being built or handed to gRPC at once.
    full_states: Arc<Semaphore>,
    /// Where the proxies' traffic reports go, if anywhere.
    traffic: Option<Arc<ReportedTraffic>>,
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
            part_bytes: 64 * 1024,
            max_streams_per_node: u32::MAX,
            full_states: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            traffic: None,
        }
    }

    /// Keeps the proxies' traffic reports in `traffic` (for the dashboard).
    pub fn with_traffic(mut self, traffic: Arc<ReportedTraffic>) -> ConfigStreamService {
        self.traffic = Some(traffic);
        self
    }

    /// At most `max` full states built or waiting for gRPC at once: each
    /// is as large as the cluster, and a thousand proxies reconnecting
    /// together must not hold a thousand of them.
    pub fn with_max_full_states(mut self, max: usize) -> ConfigStreamService {
        self.full_states = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
        self
    }

    /// Updates in parts of about `bytes` to proxies that accept parts:
    /// every buffer a stream holds on either side is about that size.
    pub fn with_part_bytes(mut self, bytes: usize) -> ConfigStreamService {
        self.part_bytes = bytes.max(1);
        self
    }

    /// At most `max` open streams per node: each holds the node's whole
    /// view, and a stolen node token must not multiply it.
    pub fn with_max_streams_per_node(mut self, max: u32) -> ConfigStreamService {
        self.max_streams_per_node = max;
        self
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<EncodedUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl weft_api::encoded::node_config_server::NodeConfig for ConfigStreamService {
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
            // A proxy that does not assemble parts gets every update whole.
            part_bytes: if hello.accepts_parts {
                self.part_bytes
            } else {
                usize::MAX
            },
            mesh: self.mesh.clone(),
            registry: self.registry.clone(),
            full_states: self.full_states.clone(),
            traffic: self.traffic.clone(),
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
    part_bytes: usize,
    mesh: watch::Receiver<Arc<Published>>,
    registry: Arc<NodeRegistry>,
    full_states: Arc<Semaphore>,
    traffic: Option<Arc<ReportedTraffic>>,
    updates: mpsc::Sender<Result<EncodedUpdate, Status>>,
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
                        let sent = match update {
                            Outgoing::Delta(delta) => self.send_delta(&delta).await,
                            Outgoing::Full(full) => {
                                // Behind the kept changes: the full state waits its turn.
                                let _permit = self.full_states.clone().acquire_owned().await;
                                self.send_full(full).await
                            }
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

    /// Sends a full state, writing each part as gRPC takes the one before,
    /// and waits until gRPC has taken the last (the caller holds a
    /// full-state permit until then); whether the proxy is there.
    async fn send_full(&self, full: FullState) -> bool {
        let version = full.version();
        debug!(version, "sending a full state");
        for part in full.parts(self.part_bytes) {
            if !self.send_part(version, part).await {
                return false;
            }
        }
        self.registry.sent(&self.node, version);
        // The channel holds one message: room again means gRPC took it.
        self.updates.reserve().await.is_ok()
    }

    async fn send_delta(&self, delta: &Delta) -> bool {
        let [local, remote, services, removed] = delta.counts();
        debug!(
            version = delta.version(),
            local, remote, services, removed, "sending a delta"
        );
        for part in delta.parts(self.part_bytes) {
            if !self.send_part(delta.version(), part).await {
                return false;
            }
        }
        self.registry.sent(&self.node, delta.version());
        true
    }

    async fn send_part(&self, version: u64, part: EncodedUpdate) -> bool {
        let bytes = part.bytes().len();
        if bytes > self.max_message_bytes {
            // gRPC will refuse to send it and end the stream; say why here,
            // where the operator can raise the limit.
            error!(
                version,
                bytes,
                limit = self.max_message_bytes,
                "config message is larger than --max-config-message-bytes; the proxy gets none"
            );
        }
        self.updates.send(Ok(part)).await.is_ok()
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
            Some(Kind::Traffic(report)) => {
                debug!(
                    edges = report.edges.len(),
                    certificates = report.certificates.len(),
                    "traffic report"
                );
                self.registry.reported(&self.node, &report.certificates);
                if let Some(traffic) = &self.traffic {
                    let local = local_workloads(&self.mesh.borrow(), &self.node);
                    traffic.record(&self.node, &local, &report, std::time::SystemTime::now());
                }
            }
            Some(Kind::Hello(_)) | None => {
                warn!("unexpected message on an open stream; ignored");
            }
        }
    }
}

/// The workloads (`<namespace>/<name>`) with a pod on `node`: what its
/// proxy may report traffic of.
fn local_workloads(published: &Published, node: &str) -> HashSet<String> {
    published
        .shared
        .pods_on(node)
        .filter_map(|uid| published.mesh.workloads.get(uid))
        .map(|w| format!("{}/{}", w.workload.namespace, w.workload.workload_name))
        .collect()
}
