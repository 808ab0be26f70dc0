//! Starting and stopping the data plane: listeners, the capture rules that
//! follow the config, metrics and readiness, and the drain on shutdown.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::drain::{self, DrainTrigger};
use super::pods::{self, PodCaptureSettings, PodNamespaces};
use super::routes::RouteTable;
use super::telemetry::TrafficMetrics;
use super::{DataPlane, Routes, inbound, outbound, plaintext};
use crate::capture::{CaptureConfig, NodeCapture};
use crate::certificates::CertificateMap;
use crate::control_plane::ViewReceiver;
use crate::hbone::{HbonePool, PoolConfig};
use crate::node_state::NodeState;
use crate::pod_directory::PodDirectory;
use crate::sockets::{self, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::{CaptureMode, Error, ProxyConfig, cni_api, http_server, monitoring};

/// A running data plane; [`RunningDataPlane::drain`] stops it gracefully.
pub struct RunningDataPlane {
    trigger: DrainTrigger,
    deadline: Duration,
    routes: Arc<Routes>,
    capture: Option<CaptureRunner>,
    pods: Option<PodsRunner>,
}

/// The task that serves pods in their own namespaces (capture mode `pod`).
struct PodsRunner {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<pods::StopPods>,
}

/// The capture rules' thread and the task that feeds it pod sets.
struct CaptureRunner {
    thread: std::thread::JoinHandle<()>,
    feed: tokio::task::JoinHandle<()>,
    commands: std::sync::mpsc::Sender<CaptureCommand>,
}

/// What the capture thread is told.
enum CaptureCommand {
    /// Capture exactly these pods (for this config generation).
    Pods(u64, BTreeSet<IpAddr>),
    /// The proxy stops: remove the rules (the mesh is being uninstalled),
    /// or leave them to the next proxy. (A process that dies without
    /// sending it leaves them too: failing closed.)
    Stop { remove: bool },
}

/// Binds the listeners, installs the capture (if configured) and starts
/// serving. Tasks go into `tasks`.
pub async fn start(
    config: &ProxyConfig,
    view: ViewReceiver,
    certificates: watch::Receiver<CertificateMap>,
    state: Option<NodeState>,
    tasks: &mut JoinSet<&'static str>,
) -> Result<RunningDataPlane, Error> {
    let mut registry = Registry::default();
    let metrics = TrafficMetrics::new(&mut registry);
    let routes = Routes::follow(view);
    let (trigger, drain) = drain::channel();
    // Tunnels leave from the source pod's namespace when it is served in
    // its own, else from the node's.
    let pod_namespaces = Arc::new(PodNamespaces::default());
    let dialing = pod_namespaces.clone();
    let dialer: crate::hbone::Dialer = Arc::new(move |source, destination| {
        let dialing = dialing.clone();
        Box::pin(async move { dialing.connect(source, destination).await })
    });
    let plane = Arc::new(DataPlane {
        routes: routes.clone(),
        certificates,
        metrics,
        pool: Arc::new(HbonePool::new(dialer, PoolConfig::default())),
        drain: drain.clone(),
        server_configs: inbound::ServerConfigs::default(),
        handshakes: Arc::new(tokio::sync::Semaphore::new(
            super::MAX_CONCURRENT_HANDSHAKES,
        )),
        inbound: Arc::default(),
        pending_wait: Duration::from_millis(config.pending_connection_wait_ms),
        pods: pod_namespaces,
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

    // The capture rules steer to loopback listeners: IPv4 always, IPv6 when
    // the node has it. Without IPv6 listeners on a node with IPv6 the IPv6
    // rules still go in: they find no listener and drop every IPv6
    // connection of a meshed pod (fail closed) rather than let it through
    // uncaptured.
    let listeners = |ip: IpAddr| -> Result<Vec<(&'static str, TcpListener)>, Error> {
        [
            ("outbound", OUTBOUND_PORT),
            ("inbound plaintext", INBOUND_PLAINTEXT_PORT),
            ("HBONE", HBONE_PORT),
        ]
        .into_iter()
        .map(|(what, port)| {
            let addr = SocketAddr::new(ip, port);
            sockets::transparent_listener(addr)
                .map(|listener| (what, listener))
                .map_err(|source| Error::BindListener { what, addr, source })
        })
        .collect()
    };
    let in_pods = config.capture && config.capture_mode == CaptureMode::Pod;
    let mut capture_listeners = Vec::new();
    if !in_pods {
        capture_listeners = listeners(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        match listeners(IpAddr::V6(Ipv6Addr::LOCALHOST)) {
            Ok(v6) => capture_listeners.extend(v6),
            Err(error) if std::path::Path::new("/proc/sys/net/ipv6").exists() => {
                warn!(%error, "no IPv6 listeners on a node with IPv6: meshed pods' IPv6 TCP is refused");
            }
            Err(error) => info!(%error, "IPv6 is off on this node; capturing IPv4 only"),
        }
    }
    let plain_bind = |what: &'static str, addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::BindListener { what, addr, source })
    };
    let metrics_listener = plain_bind("metrics", config.metrics_addr).await?;
    let readiness_listener = plain_bind("readiness", config.readiness_addr).await?;

    // The config version whose pods the capture rules steer; without
    // capture (traffic arrives by other means) every version counts as done.
    let (programmed_tx, programmed) = watch::channel(0);
    let mut pods = None;
    let capture = if in_pods {
        pods = Some(start_pods(config, &plane, state, programmed_tx, tasks)?);
        None
    } else if config.capture {
        Some(start_capture(routes.subscribe(), programmed_tx)?)
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

    for (what, listener) in capture_listeners {
        let plane = plane.clone();
        tasks.spawn(async move {
            match what {
                "outbound" => outbound::serve(listener, plane, None).await,
                "inbound plaintext" => plaintext::serve(listener, plane, None).await,
                _ => inbound::serve(listener, plane, None).await,
            }
            "a capture listener"
        });
    }
    let registry = Arc::new(registry);
    tasks.spawn(async move {
        http_server::serve(metrics_listener, "metrics", monitoring::metrics(registry)).await;
        "metrics endpoint"
    });
    tasks.spawn(async move {
        http_server::serve(
            readiness_listener,
            "readiness",
            monitoring::readiness(routes.subscribe(), programmed, drain),
        )
        .await;
        "readiness endpoint"
    });
    info!(
        outbound = OUTBOUND_PORT,
        inbound_plaintext = INBOUND_PLAINTEXT_PORT,
        hbone = HBONE_PORT,
        metrics = %config.metrics_addr,
        readiness = %config.readiness_addr,
        capture = config.capture,
        capture_mode = ?config.capture_mode,
        "data plane listening"
    );
    Ok(RunningDataPlane {
        trigger,
        deadline: Duration::from_secs(config.drain_seconds),
        routes: plane.routes.clone(),
        capture,
        pods,
    })
}

/// Starts serving pods in their own namespaces: the ones the state
/// directory remembers at once, announced ones as the CNI plugin tells.
fn start_pods(
    config: &ProxyConfig,
    plane: &Arc<DataPlane>,
    state: Option<NodeState>,
    programmed: watch::Sender<u64>,
    tasks: &mut JoinSet<&'static str>,
) -> Result<PodsRunner, Error> {
    let directory = Arc::new(PodDirectory::default());
    if let Some(state) = &state {
        match state.load_pods() {
            Ok(stored) => stored.into_iter().for_each(|pod| directory.add(pod)),
            Err(error) => warn!(%error, "cannot read the stored pods; searching anew"),
        }
    }
    if let Some(path) = &config.cni_socket {
        let listener = cni_api::bind(path).map_err(|source| Error::BindCniSocket {
            path: path.clone(),
            source,
        })?;
        let directory = directory.clone();
        tasks.spawn(async move {
            cni_api::serve(listener, directory).await;
            "CNI socket"
        });
        info!(socket = %path.display(), "taking pod announcements from the CNI plugin");
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
        stopped,
    ));
    Ok(PodsRunner { task, stop })
}

/// The capture rules live on a thread of their own: programming them runs
/// `nft` and `ip`, which must not block the runtime. The rules follow the
/// meshed local pods of each applied config; they are removed when the
/// update channel closes.
fn start_capture(
    mut routes: watch::Receiver<Arc<RouteTable>>,
    programmed: watch::Sender<u64>,
) -> Result<CaptureRunner, Error> {
    // IPv6 unless the node has none (`NodeCapture::install` checks).
    let config = CaptureConfig::default();
    let mut capture = NodeCapture::install(config).map_err(Error::Capture)?;
    let (updates, received) = std::sync::mpsc::channel::<CaptureCommand>();
    let thread = std::thread::Builder::new()
        .name("weft-capture".into())
        .spawn(move || {
            while let Ok(command) = received.recv() {
                let (version, pods) = match command {
                    CaptureCommand::Pods(version, pods) => (version, pods),
                    CaptureCommand::Stop { remove: true } => {
                        match capture.remove() {
                            Ok(()) => info!("the mesh is being uninstalled: capture rules removed"),
                            Err(error) => warn!(%error, "removing the capture rules failed"),
                        }
                        return;
                    }
                    CaptureCommand::Stop { remove: false } => break,
                };
                match capture.set_meshed_pods(&pods) {
                    Ok(()) => {
                        let _ = programmed.send(version);
                    }
                    Err(error) => {
                        // Not ready until an update succeeds: some pods of
                        // this config are not captured.
                        let _ = programmed.send(0);
                        warn!(%error, "updating the capture rules failed; the previous rules stay");
                    }
                }
            }
            capture.leave();
        })
        .map_err(|source| Error::SpawnThread {
            what: "capture rules",
            source,
        })?;
    let commands = updates.clone();
    let feed = tokio::spawn(async move {
        loop {
            let (version, pods) = {
                let table = routes.borrow_and_update();
                (table.generation, table.meshed_local_ips())
            };
            let pods = CaptureCommand::Pods(version, pods);
            if updates.send(pods).is_err() || routes.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(CaptureRunner {
        thread,
        feed,
        commands,
    })
}

impl RunningDataPlane {
    /// Stops accepting, lets open connections finish within the drain
    /// deadline, then leaves the capture rules to the next proxy, or
    /// removes them if the mesh is being uninstalled.
    pub async fn drain(self) {
        info!(deadline = ?self.deadline, "draining");
        let left = self.trigger.drain(self.deadline).await;
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing what is left"
            );
        } else {
            info!("all connections finished");
        }
        if let Some(capture) = self.capture {
            capture.feed.abort();
            let _ = capture.feed.await;
            let remove = self.routes.current().uninstalling;
            let _ = capture.commands.send(CaptureCommand::Stop { remove });
            let _ = tokio::task::spawn_blocking(move || capture.thread.join()).await;
        }
        if let Some(pods) = self.pods {
            let remove = self.routes.current().uninstalling;
            let _ = pods.stop.send(pods::StopPods { remove });
            let _ = pods.task.await;
        }
    }
}
