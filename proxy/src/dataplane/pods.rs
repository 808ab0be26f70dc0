//! Serving meshed pods through listeners inside their own network
//! namespaces (`--capture-mode=pod`; the rules are `capture::pod`'s).
//!
//! For each meshed pod of the applied config whose namespace is known
//! ([`PodDirectory`]: announced by the CNI plugin, kept in the state
//! directory, or found among the node's namespaces), the proxy installs the
//! pod's redirection and opens the three listeners there (outbound on
//! loopback, inbound plaintext and HBONE on the pod's addresses). A
//! connection's pod is the listener's, which no other pod can reach: a
//! source address the pod does not own is refused (see
//! [`super::serve_captured`]).
//!
//! Every connection the proxy opens for a served pod is made inside a
//! namespace ([`PodNamespaces::connect`]): into a served pod, inside that
//! pod's (from the client's address, so the application sees its real
//! client); otherwise inside the source pod's, so that it leaves the pod
//! as the pod's own packets would, whatever the CNI does with them.
//!
//! The rules stay in a pod's namespace when the proxy stops (fail closed:
//! its redirected TCP is refused until a proxy listens again) and go only
//! when the pod leaves the mesh or the mesh is uninstalled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::routes::RouteTable;
use super::{DataPlane, inbound, outbound, plaintext};
use crate::capture::CaptureConfig;
use crate::capture::pod::{self, PodNetns};
use crate::node_state::NodeState;
use crate::sockets::{self, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK};

/// The namespaces of the pods being served, by pod address: where the
/// proxy makes the sockets of their connections. Empty when the node-level
/// capture is used (every socket is the node's then).
#[derive(Debug, Default)]
pub struct PodNamespaces {
    by_ip: RwLock<HashMap<IpAddr, Arc<PodNetns>>>,
}

impl PodNamespaces {
    fn get(&self, ip: IpAddr) -> Option<Arc<PodNetns>> {
        self.by_ip
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ip)
            .cloned()
    }

    fn set(&self, ips: &BTreeSet<IpAddr>, netns: Option<&Arc<PodNetns>>) {
        let mut by_ip = self
            .by_ip
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ip in ips {
            match netns {
                Some(netns) => by_ip.insert(*ip, netns.clone()),
                None => by_ip.remove(ip),
            };
        }
    }

    /// Opens a TCP connection to `destination` from `source` (see
    /// [`sockets::connect_from`]), made inside the destination's namespace
    /// if it is a served pod, else inside the source's if that is one,
    /// else in the node's.
    pub async fn connect(
        &self,
        source: Option<IpAddr>,
        destination: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let netns = self
            .get(destination.ip())
            .or_else(|| source.and_then(|ip| self.get(ip)));
        let socket = match netns {
            Some(netns) => netns
                .enter(|| sockets::outgoing_socket(source, destination, PROXY_MARK))
                .map_err(std::io::Error::other)??,
            None => sockets::outgoing_socket(source, destination, PROXY_MARK)?,
        };
        sockets::connect_socket(socket, source, destination).await
    }
}

/// Where the network namespace of each known pod address is: told by the
/// CNI plugin, restored from the state directory, or found by a search.
#[derive(Debug)]
pub struct PodDirectory {
    paths: Mutex<BTreeMap<IpAddr, PathBuf>>,
    changes: watch::Sender<u64>,
}

impl Default for PodDirectory {
    fn default() -> Self {
        PodDirectory {
            paths: Mutex::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl PodDirectory {
    /// Records that `ips` live in the namespace at `netns`.
    pub fn add(&self, ips: &[IpAddr], netns: &Path) {
        let mut paths = self.lock();
        for ip in ips {
            paths.insert(*ip, netns.to_owned());
        }
        drop(paths);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Forgets the namespace at `netns` (the pod is gone).
    pub fn remove(&self, netns: &Path) {
        self.lock().retain(|_, path| path != netns);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Every known address and its namespace.
    pub fn snapshot(&self) -> BTreeMap<IpAddr, PathBuf> {
        self.lock().clone()
    }

    fn lookup(&self, ip: IpAddr) -> Option<PathBuf> {
        self.lock().get(&ip).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<IpAddr, PathBuf>> {
        self.paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How pods are found and served (from the proxy's config).
#[derive(Clone, Debug)]
pub struct PodCaptureSettings {
    /// Search the node's namespaces for meshed pods nobody announced.
    pub find_running_pods: bool,
    /// Where mounted namespaces are searched (e.g. `/run/netns`).
    pub netns_dirs: Vec<PathBuf>,
    /// How often a pod that could not be served is tried again.
    pub retry: Duration,
}

/// A pod being served.
struct Served {
    ips: BTreeSet<IpAddr>,
    netns: Arc<PodNetns>,
    listeners: Vec<JoinHandle<()>>,
}

/// What the serving task is told when the proxy stops.
pub(super) struct StopPods {
    /// Take the redirection out of every served pod (uninstall).
    pub remove: bool,
}

/// Follows the applied config: serves every meshed local pod whose
/// namespace can be found, stops serving (and un-captures) pods that leave
/// the mesh, and reports the config generation fully served on
/// `programmed` (0 while a pod is not served). Runs until `stop` says.
pub(super) async fn follow(
    plane: Arc<DataPlane>,
    directory: Arc<PodDirectory>,
    settings: PodCaptureSettings,
    state: Option<NodeState>,
    programmed: watch::Sender<u64>,
    mut stop: tokio::sync::oneshot::Receiver<StopPods>,
) {
    let mut routes = plane.routes.subscribe();
    let mut announced = directory.changes.subscribe();
    let mut served: BTreeMap<String, Served> = BTreeMap::new();
    let mut node_sources = None;
    loop {
        let table = routes.borrow_and_update().clone();
        announced.borrow_and_update();
        let missing = serve_step(&plane, &directory, &settings, &table, &mut served).await;
        let sources: BTreeSet<Ipv4Addr> = served
            .values()
            .flat_map(|pod| &pod.ips)
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if node_sources.as_ref() != Some(&sources) {
            match set_node_sources(sources.clone()).await {
                Ok(()) => node_sources = Some(sources),
                Err(error) => warn!(%error, "updating the node's probe source rules failed"),
            }
        }
        if let Some(state) = &state
            && let Err(error) = state.store_pod_namespaces(&directory.snapshot())
        {
            warn!(%error, "storing the pods' namespaces failed");
        }
        let done = if missing.is_empty() && node_sources.is_some() {
            table.generation
        } else {
            0
        };
        programmed.send_replace(done);
        let retry = async {
            if missing.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(settings.retry).await;
        };
        tokio::select! {
            changed = routes.changed() => if changed.is_err() { return },
            _ = announced.changed() => {}
            () = retry => {}
            order = &mut stop => {
                let remove = order.is_ok_and(|order| order.remove);
                stop_serving(served, remove).await;
                return;
            }
        }
    }
}

/// One pass: stops serving pods gone from the mesh, serves new ones.
/// Returns the meshed pods that could not be served.
async fn serve_step(
    plane: &Arc<DataPlane>,
    directory: &PodDirectory,
    settings: &PodCaptureSettings,
    table: &RouteTable,
    served: &mut BTreeMap<String, Served>,
) -> Vec<String> {
    let mut wanted: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for ip in table.meshed_local_ips() {
        if let Some(workload) = table.local_workload(ip) {
            wanted.entry(workload.uid.clone()).or_default().insert(ip);
        }
    }
    let leaving: Vec<String> = served
        .iter()
        .filter(|(uid, pod)| wanted.get(*uid) != Some(&pod.ips))
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in leaving {
        let Some(pod) = served.remove(&uid) else {
            continue;
        };
        plane.pods.set(&pod.ips, None);
        for listener in &pod.listeners {
            listener.abort();
        }
        // Still on the node but out of the mesh: its traffic is its own
        // again. (A deleted pod's namespace goes with it.)
        let still_here = pod.ips.iter().any(|ip| table.local_workload(*ip).is_some());
        if still_here {
            let netns = pod.netns.clone();
            let removed = tokio::task::spawn_blocking(move || {
                pod::remove_from_pod(&netns, &CaptureConfig::default())
            })
            .await;
            match removed {
                Ok(Ok(())) => info!(pod = %uid, "left the mesh: capture removed from the pod"),
                Ok(Err(error)) => warn!(pod = %uid, %error, "removing a pod's capture failed"),
                Err(error) => warn!(pod = %uid, %error, "removing a pod's capture failed"),
            }
        } else {
            info!(pod = %uid, "pod gone: no longer served");
        }
    }
    let mut missing = Vec::new();
    let unknown: BTreeSet<IpAddr> = wanted
        .iter()
        .filter(|(uid, ips)| {
            !served.contains_key(*uid) && ips.iter().all(|ip| directory.lookup(*ip).is_none())
        })
        .flat_map(|(_, ips)| ips.iter().copied())
        .collect();
    if settings.find_running_pods && !unknown.is_empty() {
        let dirs = settings.netns_dirs.clone();
        let found = tokio::task::spawn_blocking(move || {
            let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            pod::find_pod_namespaces(&unknown, &dirs, Path::new("/proc"))
        })
        .await
        .unwrap_or_default();
        for (ip, path) in found {
            info!(%ip, netns = %path.display(), "found a running pod's namespace");
            directory.add(&[ip], &path);
        }
    }
    for (uid, ips) in wanted {
        if served.contains_key(&uid) {
            continue;
        }
        let Some(path) = ips.iter().find_map(|ip| directory.lookup(*ip)) else {
            debug!(pod = %uid, "not served yet: its network namespace is unknown");
            missing.push(uid);
            continue;
        };
        match serve_pod(plane, &path, &ips).await {
            Ok(pod) => {
                info!(pod = %uid, ?ips, netns = %path.display(), "serving the pod in its namespace");
                plane.pods.set(&pod.ips, Some(&pod.netns));
                served.insert(uid, pod);
            }
            Err(error) => {
                warn!(pod = %uid, netns = %path.display(), %error, "cannot serve the pod yet");
                missing.push(uid);
            }
        }
    }
    missing
}

/// Checks that the namespace at `path` holds `ips`, installs the
/// redirection there and opens the pod's listeners.
async fn serve_pod(
    plane: &Arc<DataPlane>,
    path: &Path,
    ips: &BTreeSet<IpAddr>,
) -> Result<Served, String> {
    let netns = Arc::new(PodNetns::open(path).map_err(|e| e.to_string())?);
    let (checked, wanted) = (netns.clone(), ips.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let held = pod::addresses_of(&checked).map_err(|e| e.to_string())?;
        if let Some(ip) = wanted.iter().find(|ip| !held.contains(ip)) {
            return Err(format!("the namespace does not hold {ip}: not this pod's"));
        }
        pod::install_in_pod(&checked, &CaptureConfig::default()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let listeners = netns
        .enter(bind_pod_listeners)
        .map_err(|e| e.to_string())??;
    let shared_ips = Arc::new(ips.clone());
    let tasks = listeners
        .into_iter()
        .map(|(what, listener)| {
            let (plane, pod) = (plane.clone(), Some(shared_ips.clone()));
            tokio::spawn(async move {
                match what {
                    Listener::Outbound => outbound::serve(listener, plane, pod).await,
                    Listener::Plaintext => plaintext::serve(listener, plane, pod).await,
                    Listener::Hbone => inbound::serve(listener, plane, pod).await,
                }
            })
        })
        .collect();
    Ok(Served {
        ips: ips.clone(),
        netns,
        listeners: tasks,
    })
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Outbound,
    Plaintext,
    Hbone,
}

/// Binds the pod's listeners on the calling thread (inside the pod's
/// namespace): outbound on loopback, where `redirect` sends the pod's own
/// connections; inbound plaintext and HBONE on every address. IPv6 ones
/// when the pod has IPv6; if they cannot be bound, the pod's IPv6 TCP is
/// refused by its rules (they redirect to nothing).
fn bind_pod_listeners() -> Result<Vec<(Listener, TcpListener)>, String> {
    let mut bound = Vec::new();
    let mut families = vec![(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        Ipv4Addr::UNSPECIFIED.into(),
    )];
    if Path::new("/proc/sys/net/ipv6").exists() {
        families.push((
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            Ipv6Addr::UNSPECIFIED.into(),
        ));
    }
    for (family, (loopback, any)) in families.into_iter().enumerate() {
        let wanted = [
            (Listener::Outbound, SocketAddr::new(loopback, OUTBOUND_PORT)),
            (
                Listener::Plaintext,
                SocketAddr::new(any, INBOUND_PLAINTEXT_PORT),
            ),
            (Listener::Hbone, SocketAddr::new(any, HBONE_PORT)),
        ];
        for (what, addr) in wanted {
            match sockets::pod_listener(addr) {
                Ok(listener) => bound.push((what, listener)),
                Err(error) if family == 0 => return Err(error.to_string()),
                Err(error) => {
                    warn!(%error, "no IPv6 listener in the pod: its IPv6 TCP is refused");
                }
            }
        }
    }
    Ok(bound)
}

/// Installs (or replaces) the node's rule that gives its own connections
/// to the served pods [`pod::NODE_SOURCE`], so that probes pass.
async fn set_node_sources(pods: BTreeSet<Ipv4Addr>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || pod::set_node_sources(&CaptureConfig::default(), &pods))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Stops every pod's listeners; with `remove`, takes the redirection out
/// of each pod and the probe rule off the node.
async fn stop_serving(served: BTreeMap<String, Served>, remove: bool) {
    for pod in served.values() {
        for listener in &pod.listeners {
            listener.abort();
        }
    }
    if !remove {
        info!(
            pods = served.len(),
            "leaving the pods' capture in place for the next proxy: their TCP is refused until it serves them"
        );
        return;
    }
    let removed = tokio::task::spawn_blocking(move || {
        for (uid, pod) in &served {
            if let Err(error) = pod::remove_from_pod(&pod.netns, &CaptureConfig::default()) {
                warn!(pod = %uid, %error, "removing a pod's capture failed");
            }
        }
        pod::remove_node_sources()
    })
    .await;
    match removed {
        Ok(Ok(())) => info!("the mesh is being uninstalled: capture removed from every pod"),
        Ok(Err(error)) => warn!(%error, "removing the node's probe source rule failed"),
        Err(error) => warn!(%error, "removing the pods' capture failed"),
    }
}
