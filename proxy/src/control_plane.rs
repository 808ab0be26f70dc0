//! The proxy's side of the `NodeConfig.Stream` conversation: say Hello,
//! apply each update to the [`NodeView`], answer Ack or Nack, and never stop
//! trying. Whatever goes wrong (the control plane is down, the stream breaks,
//! a delta cannot be followed) the last good view keeps serving while the
//! client reconnects with backoff; a new stream starts with a full state.
//!
//! The rest of the proxy reads the view through a `tokio::sync::watch`
//! channel of `Arc` snapshots ([`ViewReceiver`]) and reacts to changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::{Instrument, debug, info, info_span, warn};
use weft_api::parts::Assembler;
use weft_api::v1::node_config_client::NodeConfigClient;
use weft_api::v1::{Ack, ConfigUpdate, Hello, Nack, ProxyMessage, proxy_message};

use crate::backoff::Backoff;
use crate::node_state::{NodeState, RefusedKeys, StoredConfig};
use crate::node_view::{Applied, NodeView};
use crate::transport::SharedTransport;
use crate::{Error, error_chain};

/// The first delay before reconnecting, doubled after each failure.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// The longest delay before reconnecting.
const RECONNECT_MAX: Duration = Duration::from_secs(15);
/// How often a proxy whose roots file does not exist yet looks for it: on
/// Kubernetes it appears when the kubelet syncs the ConfigMap the control
/// plane writes on its first start, and a proxy should connect right after,
/// not after a backoff grown while it waited.
const ROOTS_POLL: Duration = Duration::from_secs(1);
/// How long to wait for the control plane to close a stream the proxy is
/// leaving, so that the last Nack is delivered before the connection goes.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Outgoing messages queued for the stream (Hello, Acks, Nacks).
const OUTGOING_QUEUE: usize = 16;

/// The view as last applied; `None` until the first full state arrives.
pub type ViewReceiver = watch::Receiver<Option<Arc<NodeView>>>;

/// Work on a newly applied view that must be done before anyone sees it,
/// on the client's (control) thread: the data plane's route table is made
/// here, so that the data-plane thread only picks up the finished table
/// and never stalls for the size of a delta.
pub type BeforePublishing = Arc<dyn Fn(&NodeView) + Send + Sync>;

/// What the proxy knows about its link to the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneStatus {
    /// Whether a config stream is open now.
    pub connected: bool,
    /// Since when `connected` has had its value.
    pub since: SystemTime,
    /// How many config streams have been opened since start.
    pub streams_opened: u64,
    /// Why the last connection or stream failed, if one did.
    pub last_error: Option<String>,
    /// The last update the proxy refused, whole or in part, if any.
    pub last_nack: Option<RefusedUpdate>,
}

/// An update the proxy refused, whole or in part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedUpdate {
    /// Its version.
    pub version: u64,
    /// The NACK reason sent back.
    pub reason: String,
    /// When it was refused.
    pub at: SystemTime,
}

/// The client of the config stream. Create it, take the receivers it offers,
/// then [`run`](ControlPlaneClient::run) it for the life of the proxy.
pub struct ControlPlaneClient {
    transport: SharedTransport,
    node: String,
    /// The largest config message accepted.
    max_message_bytes: usize,
    view: watch::Sender<Option<Arc<NodeView>>>,
    status: watch::Sender<ControlPlaneStatus>,
    /// Where the applied config is kept on the node, if anywhere.
    kept: Option<Arc<KeptConfig>>,
    /// Run on every applied view before it is published.
    before_publishing: Option<BeforePublishing>,
    /// Traffic reports up each stream, if the data plane counts any.
    reporting: Option<Arc<crate::traffic_ledger::TrafficReporting>>,
}

/// The applied config as the node keeps it: the client folds every applied
/// update in (at the update's cost), a writer task stores it as one full
/// state.
struct KeptConfig {
    state: NodeState,
    /// The least time between two writes.
    interval: Duration,
    config: std::sync::Mutex<StoredConfig>,
    /// Bumped with every change, for the writer.
    changed: watch::Sender<u64>,
}

/// Whether `error` is the roots file not being there (yet).
pub(crate) fn is_missing_roots(error: &Error) -> bool {
    matches!(error, Error::ReadRoots { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

impl ControlPlaneClient {
    /// A client for the proxy of `node`, not yet connected, that accepts
    /// config messages of up to `max_message_bytes`.
    pub fn new(
        transport: SharedTransport,
        node: String,
        max_message_bytes: usize,
    ) -> ControlPlaneClient {
        let (view, _) = watch::channel(None);
        let (status, _) = watch::channel(ControlPlaneStatus {
            connected: false,
            since: SystemTime::now(),
            streams_opened: 0,
            last_error: None,
            last_nack: None,
        });
        ControlPlaneClient {
            transport,
            node,
            max_message_bytes,
            view,
            status,
            kept: None,
            before_publishing: None,
            reporting: None,
        }
    }

    /// Sends traffic reports up every stream this client opens from now on.
    pub fn report_traffic(&mut self, reporting: crate::traffic_ledger::TrafficReporting) {
        self.reporting = Some(Arc::new(reporting));
    }

    /// Runs `work` on every view this client applies from now on, before
    /// it is published (and so before the update is acknowledged).
    pub fn before_publishing(&mut self, work: BeforePublishing) {
        self.before_publishing = Some(work);
    }

    /// Keeps the applied config in `state` from now on (at most one write
    /// per `interval`), and starts from the config stored there, if there
    /// is one the proxy can apply: until the control plane sends a full
    /// state, that is what the proxy serves and enforces. Returns the
    /// restored view's version. A stored config that cannot be read or
    /// applied is logged and ignored.
    pub fn keep_in(&mut self, state: NodeState, interval: Duration) -> Option<u64> {
        let restored = match state.load_config(self.max_message_bytes) {
            Ok(stored) => stored,
            Err(error) => {
                warn!(%error, "cannot use the stored config; starting without one");
                None
            }
        };
        let restored = restored.and_then(|stored| {
            match NodeView::apply(None, &stored, &self.node) {
                Ok(Applied { view, refused }) => {
                    info!(
                        version = view.version(),
                        local_workloads = view.local_workloads().len(),
                        refused_entries = refused.len(),
                        dir = %state.dir().display(),
                        "restored the last applied config from the node; serving it until the \
                         control plane sends a newer one"
                    );
                    let mut kept = StoredConfig::default();
                    kept.fold_in(&stored, &refused_keys(&refused), &view);
                    self.view.send_replace(Some(Arc::new(view.into_restored())));
                    Some(kept)
                }
                Err(problem) => {
                    warn!(reason = %problem, "cannot apply the stored config; starting without one");
                    None
                }
            }
        });
        let version = restored.as_ref().map(StoredConfig::version);
        let stored = restored.unwrap_or_default();
        self.kept = Some(Arc::new(KeptConfig {
            state,
            interval,
            config: std::sync::Mutex::new(stored),
            changed: watch::channel(0).0,
        }));
        version
    }

    /// The applied view, updated with every accepted update.
    pub fn view(&self) -> ViewReceiver {
        self.view.subscribe()
    }

    /// The link's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<ControlPlaneStatus> {
        self.status.subscribe()
    }

    /// Follows config streams forever, reconnecting after every failure
    /// with exponential backoff and jitter. The backoff starts over after a
    /// stream that delivered a config the proxy applied.
    pub async fn run(self) {
        if let Some(kept) = &self.kept {
            // It ends when this client is gone (it holds no strong
            // reference, and the change channel closes with the last one).
            tokio::spawn(write_kept_config(
                Arc::downgrade(kept),
                kept.changed.subscribe(),
            ));
        }
        let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
        let mut attempt: u64 = 0;
        let mut waiting_for_roots = false;
        loop {
            attempt += 1;
            let span = info_span!(
                "control_plane",
                address = %self.transport.address(),
                attempt
            );
            let mut applied = false;
            let error = self.follow_stream(&mut applied).instrument(span).await;
            if applied {
                backoff.reset();
            }
            let reason = error_chain(&error);
            self.status.send_modify(|status| {
                if status.connected {
                    status.connected = false;
                    status.since = SystemTime::now();
                }
                status.last_error = Some(reason.clone());
            });
            if is_missing_roots(&error) {
                // Once per absence, not once a second.
                if !waiting_for_roots {
                    warn!(reason = %reason, "waiting for the control-plane roots file");
                }
                waiting_for_roots = true;
                tokio::time::sleep(ROOTS_POLL).await;
                continue;
            }
            waiting_for_roots = false;
            let delay = backoff.next_delay();
            let serving = self.view.borrow().as_ref().map(|view| view.version());
            warn!(
                attempt,
                address = %self.transport.address(),
                retry_in_ms = delay.as_millis() as u64,
                serving_version = ?serving,
                reason = %reason,
                "no config stream from the control plane; reconnecting"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Opens one stream and follows it until it fails; sets `applied` once
    /// an update from it has been applied. Only ever returns an error.
    async fn follow_stream(&self, applied: &mut bool) -> Error {
        let Err(error) = self.try_follow_stream(applied).await;
        error
    }

    async fn try_follow_stream(
        &self,
        applied: &mut bool,
    ) -> Result<std::convert::Infallible, Error> {
        let address = self.transport.address().to_owned();
        let known_roots = self
            .view
            .borrow()
            .as_ref()
            .map(|view| view.trust().bundle.clone());
        let channel = self.transport.connect(known_roots.as_ref()).await?;
        let token = self.transport.token().await?;
        let mut client = NodeConfigClient::with_interceptor(channel, token)
            .max_decoding_message_size(self.max_message_bytes);

        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let hello = proxy_message::Kind::Hello(Hello {
            node: self.node.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            accepts_parts: true,
        });
        send(&outgoing, hello, "Hello", &address).await?;
        let mut updates = client
            .stream(ReceiverStream::new(queue))
            .await
            .map_err(|status| Error::OpenStream {
                address: address.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        self.status.send_modify(|status| {
            status.connected = true;
            status.since = SystemTime::now();
            status.streams_opened += 1;
        });
        info!("config stream open");
        // Reports go up the stream beside the acknowledgements; the task
        // ends with the stream (this guard, or its channel closing).
        let _reporting = self.reporting.clone().map(|reporting| {
            AbortOnDrop(tokio::spawn(crate::traffic_ledger::send_reports(
                reporting,
                outgoing.clone(),
            )))
        });

        // Updates come in parts of a few tens of KiB (see weft_api::parts):
        // the whole is held only here, bounded like a single message.
        let mut parts = Assembler::default();
        loop {
            let part = match updates.message().await {
                Ok(Some(part)) => part,
                Ok(None) => return Err(Error::StreamEnded { address }),
                Err(status) => {
                    return Err(Error::StreamBroken {
                        address,
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
            };
            let bytes = prost::Message::encoded_len(&part);
            let update = match parts.push(part, bytes, self.max_message_bytes) {
                Ok(Some(update)) => update,
                Ok(None) => continue,
                Err(problem) => return Err(Error::BadUpdateParts { address, problem }),
            };
            let version = update.version;
            match self.apply(&update) {
                Ok(refused) if refused.is_empty() => {
                    *applied = true;
                    let ack = proxy_message::Kind::Ack(Ack { version });
                    send(&outgoing, ack, "Ack", &address).await?;
                }
                Ok(refused) => {
                    // Applied except the entries named: the proxy follows
                    // on from this version, and says what it left out.
                    *applied = true;
                    let nack = proxy_message::Kind::Nack(Nack {
                        version,
                        reason: refused,
                        applied: true,
                    });
                    send(&outgoing, nack, "Nack", &address).await?;
                }
                Err(problem) => {
                    let reason = problem.to_string();
                    let nack = proxy_message::Kind::Nack(Nack {
                        version,
                        reason,
                        applied: false,
                    });
                    send(&outgoing, nack, "Nack", &address).await?;
                    if problem.needs_full_state() {
                        // Every later delta builds on a version this proxy
                        // lacks; a new stream starts with a full state.
                        drop(outgoing);
                        close_gracefully(&mut updates).await;
                        return Err(Error::OutOfSync { address, problem });
                    }
                }
            }
        }
    }

    /// Applies one update to the current view and publishes the result.
    /// Returns the entries it refused (joined into one reason, empty when
    /// none was), or why the whole update was refused, which publishes
    /// nothing. Either kind of refusal is logged and kept for the admin
    /// endpoint.
    fn apply(&self, update: &ConfigUpdate) -> Result<String, crate::UpdateProblem> {
        let current = self.view.borrow().clone();
        let applied = NodeView::apply(current.as_deref(), update, &self.node);
        let (reason, result) = match applied {
            Ok(Applied { view, refused }) => {
                info!(
                    version = update.version,
                    full_state = update.full_state,
                    local_workloads = view.local_workloads().len(),
                    remote_workloads = view.remote_workloads().len(),
                    services = view.services().len(),
                    refused_entries = refused.len(),
                    "applied config"
                );
                for problem in &refused {
                    warn!(version = update.version, reason = %problem, "refused one entry of the config; applied the rest");
                }
                if let Some(work) = &self.before_publishing {
                    work(&view);
                }
                if let Some(kept) = &self.kept {
                    kept.fold_in(update, &refused_keys(&refused), &view);
                }
                self.view.send_replace(Some(Arc::new(view)));
                let reason = nack_reason(&refused);
                (reason.clone(), Ok(reason))
            }
            Err(problem) => {
                warn!(
                    version = update.version,
                    full_state = update.full_state,
                    applied_version = current.as_ref().map(|v| v.version()),
                    reason = %problem,
                    "refused config; keeping the last good one"
                );
                (problem.to_string(), Err(problem))
            }
        };
        if !reason.is_empty() {
            let refused = RefusedUpdate {
                version: update.version,
                reason,
                at: SystemTime::now(),
            };
            self.status
                .send_modify(|status| status.last_nack = Some(refused));
        }
        result
    }
}

impl KeptConfig {
    /// Folds an applied update into the kept config and wakes the writer.
    fn fold_in(&self, update: &ConfigUpdate, refused: &RefusedKeys, applied: &NodeView) {
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        config.fold_in(update, refused, applied);
        drop(config);
        self.changed.send_modify(|changes| *changes += 1);
    }
}

/// The keys of the entries an update's application refused, by list.
fn refused_keys(refused: &[crate::UpdateProblem]) -> RefusedKeys {
    let mut keys = RefusedKeys::default();
    for problem in refused {
        if let crate::UpdateProblem::InvalidEntry { kind, key, .. } = problem {
            let list = match kind {
                crate::EntryKind::LocalWorkload => &mut keys.local_workloads,
                // The kept remote workloads and Services are the view's
                // (see StoredConfig::fold_in).
                crate::EntryKind::RemoteWorkload | crate::EntryKind::Service => continue,
                crate::EntryKind::AuthorizationPolicy => &mut keys.authorization_policies,
            };
            list.insert(key.clone());
        }
    }
    keys
}

/// Stores the kept config after each change, at most once per interval,
/// off the runtime's threads. A failed write is logged; the file keeps the
/// last config stored, and the next change tries again.
async fn write_kept_config(kept: std::sync::Weak<KeptConfig>, mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let Some(strong) = kept.upgrade() else {
            return;
        };
        let snapshot = strong
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (state, interval) = (strong.state.clone(), strong.interval);
        drop(strong);
        let version = snapshot.version();
        let store = move || state.store_config(&snapshot.to_update());
        match tokio::task::spawn_blocking(store).await {
            Ok(Ok(())) => debug!(version, "stored the applied config on the node"),
            Ok(Err(error)) => {
                warn!(%error, version, "storing the applied config failed; the last stored one stays");
            }
            Err(_) => return,
        }
        tokio::time::sleep(interval).await;
    }
}

/// Refused entries named in one Nack at most; the log has every one.
const NACK_ENTRIES: usize = 16;

/// The Nack reason for refused entries: the first [`NACK_ENTRIES`] and a
/// count of the rest, so that a full state with thousands of bad entries
/// does not become a message larger than the control plane accepts.
fn nack_reason(refused: &[crate::UpdateProblem]) -> String {
    let mut reason = refused
        .iter()
        .take(NACK_ENTRIES)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if refused.len() > NACK_ENTRIES {
        reason.push_str(&format!(
            "; and {} more refused entries (see the proxy's log)",
            refused.len() - NACK_ENTRIES
        ));
    }
    reason
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send(
    outgoing: &mpsc::Sender<ProxyMessage>,
    kind: proxy_message::Kind,
    what: &'static str,
    address: &str,
) -> Result<(), Error> {
    outgoing
        .send(ProxyMessage { kind: Some(kind) })
        .await
        .map_err(|_| Error::StreamClosed {
            what,
            address: address.to_owned(),
        })
}

/// Waits (briefly) for the control plane to end a stream whose sending side
/// the proxy has closed, so that what the proxy sent last is delivered
/// before the connection is dropped. Updates arriving meanwhile are ignored.
async fn close_gracefully(updates: &mut Streaming<ConfigUpdate>) {
    let drained = async { while let Ok(Some(_)) = updates.message().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, drained).await;
}

#[cfg(test)]
#[path = "control_plane_tests.rs"]
mod tests;
