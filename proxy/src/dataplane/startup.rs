//! Starting and stopping the data plane: the pods served in their own
//! namespaces (`pods`), the CNI socket, metrics and readiness, and the
//! drain on shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::drain::{self, DrainTrigger};
use super::pod_namespaces::PodNamespaces;
use super::pods::{self, PodCaptureSettings};
use super::telemetry::TrafficMetrics;
use super::{DataPlane, Routes, inbound};
use crate::certificates::CertificateMap;
use crate::handover::{InheritedListeners, NodeSocketKind, PodsRequest, Predecessor};
use crate::hbone::{HbonePool, PoolConfig};
use crate::listening::{Listening, ListeningControl, ListeningState, TaskEnd};
use crate::node_state::NodeState;
use crate::pod_directory::AnnouncedPod;
use crate::pod_directory::PodDirectory;
use crate::{Error, ProxyConfig, cni_api, cni_install, http_server, monitoring};

/// A running data plane; [`RunningDataPlane::drain`] stops it gracefully.
pub struct RunningDataPlane {
    trigger: DrainTrigger,
    deadline: Duration,
    /// The drain deadline with no successor.
    stop_deadline: Duration,
    /// Whether a successor took the sockets over.
    listening: Listening,
    routes: Arc<Routes>,
    pods: Option<PodsRunner>,
    /// Where weft-cni is installed (binary and configuration directories).
    node_cni: Option<Arc<cni_install::NodeCni>>,
}

/// The task that serves pods in their own namespaces.
struct PodsRunner {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<pods::StopPods>,
}

/// What the data plane starts from, besides its settings.
pub struct Start {
    /// The route table of the applied config.
    pub routes: Arc<Routes>,
    /// The workload certificates.
    pub certificates: watch::Receiver<CertificateMap>,
    /// The last good state on the node, if kept.
    pub state: Option<NodeState>,
    /// The metrics and readiness listeners (non-blocking).
    pub monitoring: (std::net::TcpListener, std::net::TcpListener),
    /// The CNI plugin's socket (non-blocking), if configured.
    pub cni: Option<std::os::unix::net::UnixListener>,
    /// Whose turn it is to accept.
    pub listening: Listening,
    /// Sets it: a successor that stops before it took over hands back.
    pub listening_control: Arc<ListeningControl>,
    /// The pods a predecessor knew, if this proxy took over from one.
    pub pods: Vec<AnnouncedPod>,
    /// The listeners of the pods it served.
    pub pod_listeners: BTreeMap<PathBuf, InheritedListeners>,
    /// The predecessor, told to stop accepting once this proxy is ready.
    pub predecessor: Option<Predecessor>,
    /// A later hand-over's requests to the task that serves the pods.
    pub pods_requested: mpsc::Receiver<PodsRequest>,
    /// Where the listeners count what they refuse (the admin endpoint
    /// counts into it too).
    pub rejections: crate::rejections::Rejections,
    /// Where connections are counted for the traffic reports.
    pub ledger: Arc<crate::traffic_ledger::TrafficLedger>,
}

/// Installs the capture (if configured) and starts serving on the given
/// sockets. Tasks go into `tasks`.
pub async fn start(
    config: &ProxyConfig,
    start: Start,
    tasks: &mut JoinSet<TaskEnd>,
) -> Result<RunningDataPlane, Error> {
    let Start {
        routes,
        certificates,
        state,
        monitoring: (metrics_listener, readiness_listener),
        cni,
        listening,
        listening_control,
        pods: handed_pods,
        pod_listeners,
        predecessor,
        pods_requested,
        rejections,
        ledger,
    } = start;
    let mut registry = Registry::default();
    let metrics = TrafficMetrics::new(&mut registry, ledger);
    rejections.register(&mut registry);
    registry.register_collector(Box::new(crate::logging::DroppedLinesMetric));
    registry.register_collector(Box::new(crate::lanes::LaneMetrics));
    registry.register_collector(Box::new(crate::hbone::KeyExchangeMetrics));
    let (trigger, drain) = drain::channel();
    // Tunnels leave from the source pod's namespace when it is served in
    // its own, else from the node's.
    let pod_namespaces = Arc::new(PodNamespaces::default());
    let dialing = pod_namespaces.clone();
    let dialer: crate::hbone::Dialer = Arc::new(move |source, destination| {
        let dialing = dialing.clone();
        Box::pin(async move { dialing.connect(source, destination).await })
    });
    let (served_windows, dialed_windows) = config.memory_limits.hbone_windows();
    crate::copy::limit_held_buffers(config.memory_limits.held_buffer_budget());
    let limits = &config.limits;
    let pool_config = PoolConfig {
        idle_timeout: Duration::from_secs(limits.hbone_idle_timeout_seconds),
        connect_timeout: Duration::from_millis(limits.hbone_connect_timeout_ms),
        max_streams_per_connection: usize::try_from(dialed_windows.max_streams)
            .unwrap_or(crate::hbone::MAX_STREAMS_PER_CONNECTION),
        windows: dialed_windows,
        keepalive: limits.hbone_keepalive(),
        key_exchange: config.key_exchange,
    };
    let hbone = crate::hbone::ServerSettings {
        windows: served_windows,
        keepalive: limits.hbone_keepalive(),
        handshake_timeout: limits.handshake_timeout(),
        idle_timeout: Duration::from_secs(limits.hbone_idle_timeout_seconds),
        key_exchange: config.key_exchange,
    };
    let plane = Arc::new(DataPlane {
        routes: routes.clone(),
        certificates,
        metrics,
        pool: Arc::new(HbonePool::new(dialer, pool_config)),
        hbone,
        drain: drain.clone(),
        server_configs: inbound::ServerConfigs::default(),
        admission: super::admission::Admission::new(config.limits.clone(), rejections.clone()),
        inbound: Arc::default(),
        pending_wait: Duration::from_millis(config.pending_connection_wait_ms),
        pods: pod_namespaces,
        listening: listening.clone(),
        warnings: Arc::new(crate::warnings::WarningLimiter::new(
            config.log_warnings_per_cause,
            Duration::from_millis(config.log_warnings_interval_ms),
        )),
        cluster_name: config.cluster_name.clone(),
    });
    // Policy applies to open connections too: decide them again whenever a
    // new config is applied.
    let (mut versions, watched) = (routes.subscribe(), plane.clone());
    tokio::spawn(async move {
        while versions.changed().await.is_ok() {
            let table = versions.borrow_and_update().clone();
            watched.inbound.reauthorize(&table, &watched.metrics);
        }
    });

    let tokio_listener = |kind, addr: SocketAddr, listener| {
        tokio::net::TcpListener::from_std(listener).map_err(|source| Error::BindNodeSocket {
            kind,
            addr,
            source,
        })
    };
    let metrics_listener = tokio_listener(
        NodeSocketKind::Metrics,
        config.metrics_addr,
        metrics_listener,
    )?;
    let readiness_listener = tokio_listener(
        NodeSocketKind::Readiness,
        config.readiness_addr,
        readiness_listener,
    )?;

    // The config version whose pods are all served; without capture
    // (nothing is served) every version counts as done.
    let (programmed_tx, programmed) = watch::channel(0);
    if let Some(predecessor) = predecessor {
        // The predecessor stops accepting once this proxy serves every pod
        // it knows under a config (what readiness says too).
        // Told to stop before that (a rollback deleted this pod), it hands
        // everything back: it stops accepting without resetting anything,
        // and the closed link makes the predecessor serve on alone.
        let (mut ready, wait) = (
            programmed.clone(),
            Duration::from_millis(config.handover_timeout_ms),
        );
        let (draining, give_back) = (drain.clone(), listening_control);
        tokio::spawn(async move {
            tokio::select! {
                ready = async { ready.wait_for(|version| *version > 0).await.is_ok() } => {
                    if ready {
                        predecessor.release(wait).await;
                    }
                }
                () = draining.started() => {
                    give_back.set(ListeningState::Released);
                    drop(predecessor);
                    info!("stopped before taking over: the previous proxy serves on");
                }
            }
        });
    }
    let node_cni = config
        .cni_bin_dir
        .clone()
        .zip(config.cni_conf_dir.clone())
        .map(|(bin_dir, conf_dir)| Arc::new(cni_install::NodeCni::new(bin_dir, conf_dir)));
    let pods = if config.capture {
        let handover = PodsHandover {
            pods: handed_pods,
            pod_listeners,
            requests: pods_requested,
        };
        Some(start_pods(
            config,
            &plane,
            (state, cni, handover, node_cni.clone()),
            programmed_tx,
            tasks,
        )?)
    } else {
        let mut versions = routes.subscribe();
        tokio::spawn(async move {
            loop {
                let version = versions.borrow_and_update().generation;
                if programmed_tx.send(version).is_err() || versions.changed().await.is_err() {
                    return;
                }
            }
        });
        None
    };

    let registry = Arc::new(registry);
    let metrics_listening = listening.clone();
    let endpoint = |name| http_server::Endpoint {
        name,
        limits: config.http_limits.clone(),
        rejections: rejections.clone(),
    };
    let (metrics_endpoint, readiness_endpoint) = (endpoint("metrics"), endpoint("readiness"));
    tasks.spawn(async move {
        let handler = monitoring::metrics(registry);
        http_server::serve(
            metrics_listener,
            metrics_endpoint,
            handler,
            metrics_listening,
        )
        .await;
        TaskEnd::HandedOver("metrics endpoint")
    });
    let readiness_listening = listening.clone();
    let own_pod_uid = config.pod_uid.clone();
    tasks.spawn(async move {
        http_server::serve(
            readiness_listener,
            readiness_endpoint,
            monitoring::readiness(routes.subscribe(), programmed, drain, own_pod_uid),
            readiness_listening,
        )
        .await;
        TaskEnd::HandedOver("readiness endpoint")
    });
    info!(
        metrics = %config.metrics_addr,
        readiness = %config.readiness_addr,
        capture = config.capture,
        "data plane started: it listens inside each meshed pod it serves"
    );
    Ok(RunningDataPlane {
        trigger,
        deadline: Duration::from_secs(config.drain_seconds),
        stop_deadline: Duration::from_secs(config.stop_drain_seconds),
        listening: listening.clone(),
        routes: plane.routes.clone(),
        pods,
        node_cni,
    })
}

/// What a predecessor handed over for the pods.
struct PodsHandover {
    pods: Vec<AnnouncedPod>,
    pod_listeners: BTreeMap<PathBuf, InheritedListeners>,
    requests: mpsc::Receiver<PodsRequest>,
}

/// Starts serving pods in their own namespaces: the ones the state
/// directory (or a predecessor) knows at once, announced ones as the CNI
/// plugin tells.
fn start_pods(
    config: &ProxyConfig,
    plane: &Arc<DataPlane>,
    (state, cni, handover, node_cni): (
        Option<NodeState>,
        Option<std::os::unix::net::UnixListener>,
        PodsHandover,
        Option<Arc<cni_install::NodeCni>>,
    ),
    programmed: watch::Sender<u64>,
    tasks: &mut JoinSet<TaskEnd>,
) -> Result<PodsRunner, Error> {
    let directory = Arc::new(PodDirectory::default());
    if let Some(state) = &state {
        match state.load_pods() {
            Ok(stored) => stored.into_iter().for_each(|pod| directory.add(pod)),
            Err(error) => warn!(%error, "cannot read the stored pods; searching anew"),
        }
    }
    // The predecessor's directory is newer than the file.
    handover.pods.into_iter().for_each(|pod| directory.add(pod));
    if let (Some(listener), Some(path)) = (cni, &config.cni_socket) {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|source| {
            Error::BindCniSocket {
                path: path.clone(),
                source,
            }
        })?;
        let (directory, listening) = (directory.clone(), plane.listening.clone());
        tasks.spawn(async move {
            cni_api::serve(listener, directory, listening).await;
            TaskEnd::HandedOver("CNI socket")
        });
        info!(socket = %path.display(), "taking pod announcements from the CNI plugin");
    }
    if let Some(node_cni) = node_cni {
        let plugin = match &config.cni_plugin {
            Some(plugin) => plugin.clone(),
            None => std::env::current_exe()
                .map(|exe| exe.with_file_name(cni_install::PLUGIN_TYPE))
                .map_err(|source| Error::FindCniPlugin { source })?,
        };
        let entry = cni_install::PluginEntry {
            socket: config.cni_node_socket.clone(),
            state_dir: config.cni_node_state_dir.clone(),
            exclude_namespaces: config.cni_exclude_namespaces.clone(),
        };
        let recheck = Duration::from_secs(config.cni_recheck_seconds.max(1));
        let retry = Duration::from_millis(config.pod_retry_ms.max(100));
        let listening = plane.listening.clone();
        tasks.spawn(async move {
            // The successor keeps it installed once it took over: two
            // writers of the same files would undo each other.
            tokio::select! {
                () = keep_cni_plugin_installed(plugin, node_cni, entry, recheck, retry) => {
                    TaskEnd::Stopped("CNI plugin installer")
                }
                () = listening.released() => TaskEnd::HandedOver("CNI plugin installer"),
            }
        });
    }
    let settings = PodCaptureSettings {
        find_running_pods: config.find_running_pods,
        netns_dirs: vec![config.netns_dir.clone()],
        retry: Duration::from_millis(config.pod_retry_ms),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(pods::follow(
        plane.clone(),
        directory,
        settings,
        state,
        programmed,
        pods::Orders {
            stop: stopped,
            handover: handover.requests,
            inherited: handover.pod_listeners,
        },
    ));
    Ok(PodsRunner { task, stop })
}

/// Installs weft's CNI plugin, and checks every `recheck` that it is still
/// chained in (a network plugin may rewrite its configuration); retries
/// every `retry` while it cannot (the network plugin's configuration may
/// not be there yet on a booting node).
async fn keep_cni_plugin_installed(
    plugin: std::path::PathBuf,
    node_cni: Arc<cni_install::NodeCni>,
    entry: cni_install::PluginEntry,
    recheck: Duration,
    retry: Duration,
) {
    let mut installed_in = None;
    loop {
        let (plugin, node_cni, wanted) = (plugin.clone(), node_cni.clone(), entry.clone());
        let result = tokio::task::spawn_blocking(move || node_cni.install(&plugin, &wanted)).await;
        let wait = match result {
            // Uninstalled, for good: wait to be stopped with the rest (a
            // task that ends would count as one that failed).
            Ok(Ok(None)) => std::future::pending().await,
            Ok(Ok(Some(conflist))) => {
                if installed_in.as_ref() != Some(&conflist) {
                    info!(conflist = %conflist.display(), "weft-cni is chained into the node's network configuration");
                    installed_in = Some(conflist);
                }
                recheck
            }
            Ok(Err(error)) => {
                warn!(%error, "cannot install weft-cni yet; new pods are found by search until it is");
                retry
            }
            Err(error) => {
                warn!(%error, "installing weft-cni failed");
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

impl RunningDataPlane {
    /// The drain signal, for the hand-over (a draining proxy that meets a
    /// successor leaves everything to it at once).
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.trigger.subscribe()
    }

    /// Stops accepting, lets open connections finish within the drain
    /// deadline (the long one if a successor took over, else the short
    /// one), then leaves the capture rules to the next proxy, or removes
    /// them if the mesh is being uninstalled and no successor took over.
    /// Whether weft-cni was to be taken out of the node's network
    /// configuration and could not be.
    pub async fn drain(self) -> bool {
        let handed_over = self.listening.state() == ListeningState::Released;
        let deadline = if handed_over {
            self.deadline
        } else {
            self.stop_deadline
        };
        info!(?deadline, handed_over, "draining");
        let left = self.trigger.drain(deadline).await;
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing what is left"
            );
        } else {
            info!("all connections finished");
        }
        // Read again: a successor may have come, the uninstall may have
        // been announced meanwhile.
        let handed_over = self.listening.state() == ListeningState::Released;
        let remove = !handed_over && self.routes.current().uninstalling;
        if let Some(pods) = self.pods {
            let _ = pods.stop.send(pods::StopPods { remove });
            let _ = pods.task.await;
        }
        let (true, Some(node_cni)) = (remove, self.node_cni) else {
            return false;
        };
        let removed = tokio::task::spawn_blocking(move || node_cni.uninstall()).await;
        match removed {
            Ok(Ok(())) => {
                info!("the mesh is being uninstalled: weft-cni removed from the node");
                false
            }
            Ok(Err(error)) => {
                warn!(%error, "removing weft-cni failed");
                true
            }
            Err(error) => {
                warn!(%error, "removing weft-cni failed");
                true
            }
        }
    }
}
