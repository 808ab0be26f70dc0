//! Serving meshed pods through listeners inside their own network
//! namespaces (the rules are `capture::pod`'s).
//!
//! For each meshed pod on the node whose namespace is known
//! ([`PodDirectory`]: announced by the CNI plugin, kept in the state
//! directory, or found among the node's namespaces), the proxy installs the
//! pod's redirection and opens the three listeners there (outbound on
//! loopback, inbound plaintext and HBONE on the pod's addresses). A pod the
//! config does not name yet is meshed if its namespace is: it is served
//! from its announcement on, before its first container runs, and its
//! connections wait (a bounded time) for its config and certificate. A
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
//! [`PodNamespaces::connect`]: super::pod_namespaces::PodNamespaces::connect
//!
//! The rules stay in a pod's namespace when the proxy stops (fail closed:
//! its redirected TCP is refused until a proxy listens again) and go only
//! when the pod leaves the mesh or the mesh is uninstalled.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::pod_listeners::{Listener, adopt_pod_listeners, bind_pod_listeners};
use super::routes::RouteTable;
use super::{DataPlane, ListenerPod, ServedPod, found_pods, inbound, outbound, plaintext};
use crate::capture::pod::{self, PodNetns};
use crate::capture::{CaptureConfig, node_source};
use crate::handover::{HandedPod, InheritedListeners, PodsRequest};
use crate::node_state::NodeState;
use crate::pod_directory::{AnnouncedPod, Outcome, PodDirectory};
use probes::{follow_probe_ports, probe_ports_of, set_node_sources};

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
    pod: ListenerPod,
    /// The ports the node reaches uncaptured (the kubelet's probes).
    probe_ports: BTreeSet<u16>,
    netns: Arc<PodNetns>,
    listeners: Vec<JoinHandle<()>>,
    /// Copies of the listening sockets, for a hand-over.
    sockets: Vec<OwnedFd>,
}

/// What the serving task is told when the proxy stops.
pub(super) struct StopPods {
    /// Take the redirection out of every served pod (uninstall).
    pub remove: bool,
}

/// What the serving task takes orders from, and what it was handed.
pub(super) struct Orders {
    /// Stop (the proxy drains).
    pub stop: tokio::sync::oneshot::Receiver<StopPods>,
    /// A hand-over to a new proxy process.
    pub handover: mpsc::Receiver<PodsRequest>,
    /// Listeners a predecessor handed over, used instead of binding new
    /// ones when the pod in that namespace is served.
    pub inherited: BTreeMap<PathBuf, InheritedListeners>,
}

/// Follows the applied config and the pods on the node: serves every
/// meshed pod whose namespace is known, stops serving (and un-captures)
/// pods that leave the mesh, reports each announced pod's outcome to the
/// directory, and the config generation fully served on `programmed` (0
/// while a pod known on the node is meshed and not served). Runs until
/// `stop` says.
pub(super) async fn follow(
    plane: Arc<DataPlane>,
    directory: Arc<PodDirectory>,
    settings: PodCaptureSettings,
    state: Option<NodeState>,
    programmed: watch::Sender<u64>,
    orders: Orders,
) {
    let Orders {
        mut stop,
        handover: mut handovers,
        mut inherited,
    } = orders;
    let mut routes = plane.routes.subscribe();
    let mut announced = directory.subscribe();
    let mut served: BTreeMap<PathBuf, Served> = BTreeMap::new();
    // The pods the last run left (their capture with them), until each is
    // served again or released.
    let mut kept: BTreeSet<PathBuf> = directory.pods().into_iter().map(|pod| pod.netns).collect();
    let mut node_sources: Option<BTreeSet<SocketAddr>> = None;
    let (mut stored_pods, mut stored_namespaces) = (None, None);
    let mut said_unknown = false;
    loop {
        let table = routes.borrow_and_update().clone();
        announced.borrow_and_update();
        let step = serve_step(
            &plane,
            &directory,
            &settings,
            &table,
            (&mut served, &mut kept, &mut inherited),
        )
        .await;
        follow_probe_ports(&table, &mut served).await;
        let mut sources: BTreeSet<SocketAddr> = served
            .values()
            .flat_map(|served| node_source::probes_of(&served.pod.ips, &served.probe_ports))
            .collect();
        // Pods handed over and not served here yet are still served by the
        // predecessor: their probes keep passing meanwhile.
        if !inherited.is_empty()
            && let Some(before) = &node_sources
        {
            sources.extend(before.iter().copied());
        }
        if node_sources.as_ref() != Some(&sources) {
            match set_node_sources(sources.clone()).await {
                Ok(()) => node_sources = Some(sources),
                Err(error) => warn!(%error, "updating the node's probe source rules failed"),
            }
        }
        // Held pods with no end in sight: loud, once while it lasts.
        let unknown = table.generation > 0 && table.meshed_namespaces.is_none();
        if unknown && !said_unknown {
            warn!(
                "the config does not say which namespaces are meshed (a control plane older than \
                 this proxy?): new pods not in it yet are held until one that does answers"
            );
        }
        said_unknown = unknown;
        // Written when changed, not read back on every pass.
        if let Some(state) = &state {
            let pods = directory.pods();
            if stored_pods.as_ref() != Some(&pods) {
                match state.store_pods(&pods) {
                    Ok(()) => stored_pods = Some(pods),
                    Err(error) => warn!(%error, "storing the node's pods failed"),
                }
            }
            // Only what a config said: before one (or from a control plane
            // that does not say), nothing is known, and an empty list would
            // let the CNI plugin start meshed pods uncaptured.
            if let Some(meshed) = &table.meshed_namespaces
                && stored_namespaces.as_ref() != Some(meshed)
            {
                match state.store_meshed_namespaces(meshed) {
                    Ok(()) => stored_namespaces = Some(meshed.clone()),
                    Err(error) => warn!(%error, "storing the meshed namespaces failed"),
                }
            }
        }
        // Ready once every pod known on the node is served. A pod of the
        // config whose sandbox nobody announced and no search found is not
        // here (a stale config names a deleted pod; the control plane may be
        // away): it is searched for again, and does not hold readiness.
        let pending = step
            .outcomes
            .values()
            .any(|outcome| matches!(outcome, Outcome::Pending(_)));
        let search_again = settings.find_running_pods && step.unserved_config_pods > 0;
        directory.report(step.outcomes);
        let done = if pending || node_sources.is_none() {
            0
        } else {
            table.generation
        };
        programmed.send_replace(done);
        let retry = async {
            if !pending && !search_again {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(settings.retry).await;
        };
        tokio::select! {
            changed = routes.changed() => if changed.is_err() { return },
            _ = announced.changed() => {}
            () = retry => {}
            Some(PodsRequest::Freeze(reply)) = handovers.recv() => {
                let handed = hand_over(&directory, &served);
                let frozen = handed.is_ok();
                let _ = reply.send(handed);
                if !frozen {
                    continue;
                }
                // Frozen: nothing changes until the hand-over fails (or
                // the proxy stops, once the successor serves: the giving
                // side is gone then, and this stays frozen).
                let mut let_go = false;
                loop {
                    tokio::select! {
                        Some(request) = handovers.recv() => match request {
                            // Once released, nothing comes back.
                            PodsRequest::Thaw if !let_go => break,
                            PodsRequest::Thaw => {}
                            // A second successor while frozen: not possible
                            // (one at a time).
                            PodsRequest::Freeze(reply) => {
                                let _ = reply.send(Err("a hand-over is under way".into()));
                            }
                        },
                        // The successor serves: let go of the listeners
                        // (a successor that restarts must be able to bind
                        // them), keep the capture.
                        () = plane.listening.released(), if !let_go => {
                            let_go = true;
                            for serving in served.values_mut() {
                                serving.sockets.clear();
                                serving.listeners.iter().for_each(JoinHandle::abort);
                            }
                        }
                        order = &mut stop => {
                            let remove = order.is_ok_and(|order| order.remove);
                            stop_serving(served, remove).await;
                            return;
                        }
                    }
                }
                info!("the hand-over failed: serving the node's pods as before");
            }
            order = &mut stop => {
                let remove = order.is_ok_and(|order| order.remove);
                stop_serving(served, remove).await;
                return;
            }
        }
    }
}

/// The pods this proxy knows, and copies of the listeners of those it
/// serves, for a successor; an error if a copy cannot be made (the
/// successor would believe a pod served with a listener missing).
fn hand_over(
    directory: &PodDirectory,
    served: &BTreeMap<PathBuf, Served>,
) -> Result<Vec<HandedPod>, String> {
    directory
        .pods()
        .into_iter()
        .map(|pod| {
            let Some(serving) = served.get(&pod.netns) else {
                return Ok(HandedPod {
                    pod,
                    netns: None,
                    listeners: Vec::new(),
                });
            };
            let netns = serving.netns.id().map_err(|e| e.to_string())?;
            let listeners = serving
                .sockets
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("copying a listener of {}: {e}", pod.netns.display()))?;
            Ok(HandedPod {
                pod,
                netns: Some(netns),
                listeners,
            })
        })
        .collect()
}

/// What one pass found.
struct Step {
    /// What became of each pod in the directory.
    outcomes: BTreeMap<PathBuf, Outcome>,
    /// Meshed pods of the config whose namespace is not known.
    unserved_config_pods: usize,
}

/// Whether a pod of the directory is to be served.
fn decide(table: &RouteTable, pod: &AnnouncedPod) -> Outcome {
    if pod.found {
        return found_pods::decide(table, pod);
    }
    // A workload the config has at one of its addresses, if it is this
    // pod (not a deleted one whose address it took).
    let announced = ServedPod::of(pod);
    let configured = pod.ips.iter().find_map(|ip| announced.workload(table, *ip));
    // Not at its addresses yet (the API server learns them after this
    // setup), the config may have the pod already, by name: its own
    // label's say (opted in, in an unmeshed namespace) is the one to follow.
    let configured = configured.or_else(|| {
        table
            .workload_named(&pod.namespace, &pod.name)
            .filter(|w| !pod.uid.is_empty() && *w.local().pod_uid == *pod.uid)
    });
    match configured {
        Some(workload) if workload.meshed() => Outcome::Served,
        Some(_) => Outcome::NotMeshed,
        // Not in the config yet (a new pod): its namespace decides, so
        // that it is captured before its first container runs.
        None if table.generation == 0 => Outcome::Pending("the proxy has no config yet".into()),
        None => match &table.meshed_namespaces {
            Some(meshed) if !pod.namespace.is_empty() && meshed.contains(&pod.namespace) => {
                Outcome::Served
            }
            Some(_) => Outcome::NotMeshed,
            None => Outcome::Pending("the config does not say which namespaces are meshed".into()),
        },
    }
}

/// One pass: finds unannounced meshed pods (if allowed), stops serving
/// pods gone from the mesh, serves new ones.
async fn serve_step(
    plane: &Arc<DataPlane>,
    directory: &PodDirectory,
    settings: &PodCaptureSettings,
    table: &RouteTable,
    (served, kept, inherited): (
        &mut BTreeMap<PathBuf, Served>,
        &mut BTreeSet<PathBuf>,
        &mut BTreeMap<PathBuf, InheritedListeners>,
    ),
) -> Step {
    directory.prune();
    let netns_dirs = settings
        .find_running_pods
        .then(|| settings.netns_dirs.clone());
    found_pods::search(directory, table, netns_dirs).await;
    let pods = directory.pods();
    let unserved_config_pods = table
        .meshed_local_ips()
        .into_iter()
        .filter(|ip| !pods.iter().any(|pod| pod.ips.contains(ip)))
        .count();
    let mut outcomes: BTreeMap<PathBuf, Outcome> = pods
        .iter()
        .map(|pod| (pod.netns.clone(), decide(table, pod)))
        .collect();

    // Pods to let go: no longer wanted, gone, or with other addresses.
    let leaving: Vec<PathBuf> = served
        .iter()
        .filter(|(netns, serving)| {
            let wanted = outcomes.get(*netns) == Some(&Outcome::Served);
            let same_ips = pods
                .iter()
                .find(|pod| &pod.netns == *netns)
                .is_some_and(|pod| ServedPod::of(pod) == *serving.pod);
            !wanted || !same_ips
        })
        .map(|(netns, _)| netns.clone())
        .collect();
    for netns in leaving {
        let Some(pod) = served.remove(&netns) else {
            continue;
        };
        plane.pods.set(&pod.pod, None);
        // Its tunnels were dialled from inside its namespace: a pod that
        // gets its address next must not inherit them.
        let retired: usize = pod
            .pod
            .ips
            .iter()
            .map(|ip| plane.pool.retire_source(*ip))
            .sum();
        if retired > 0 {
            info!(netns = %netns.display(), retired, "retired the pod's pooled tunnels");
        }
        // Gone before anything binds the pod's ports again (its addresses
        // may have changed, the namespace not).
        for listener in &pod.listeners {
            listener.abort();
        }
        for listener in pod.listeners {
            let _ = listener.await;
        }
        // Out of the mesh but still running: its traffic is its own again.
        // (A deleted pod keeps its rules: its last connections stay
        // captured, refused, until its namespace goes.)
        if outcomes.get(&netns) == Some(&Outcome::NotMeshed) {
            release(pod.netns.clone()).await;
        } else {
            info!(netns = %netns.display(), "no longer serving the pod");
        }
    }
    for pod in &pods {
        if outcomes.get(&pod.netns) != Some(&Outcome::Served) || served.contains_key(&pod.netns) {
            continue;
        }
        let wanted = Arc::new(ServedPod::of(pod));
        let probe_ports = probe_ports_of(table, &wanted);
        match serve_pod(plane, &pod.netns, &wanted, probe_ports, inherited).await {
            Ok(serving) => {
                info!(pod = %wanted.uid, ips = ?wanted.ips, netns = %pod.netns.display(), "serving the pod in its namespace");
                plane.pods.set(&serving.pod, Some(&serving.netns));
                served.insert(pod.netns.clone(), serving);
            }
            Err(error) => {
                warn!(netns = %pod.netns.display(), %error, "cannot serve the pod yet");
                outcomes.insert(pod.netns.clone(), Outcome::Pending(error));
            }
        }
    }
    // A pod kept from the proxy's last run that is no longer meshed may
    // still carry that run's capture, which nobody serves now (after the
    // meshed pods are served: they wait for nothing here).
    kept.retain(|netns| !served.contains_key(netns));
    for pod in &pods {
        if outcomes.get(&pod.netns) == Some(&Outcome::NotMeshed) && kept.remove(&pod.netns) {
            release_kept(pod).await;
        }
    }
    // Handed-over listeners of pods gone from the node, or not to be served
    // here, are of no use (and would keep the pod's ports bound).
    inherited.retain(|netns, _| {
        pods.iter().any(|pod| &pod.netns == netns)
            && matches!(
                outcomes.get(netns),
                Some(Outcome::Served | Outcome::Pending(_))
            )
    });
    // Found pods the config no longer names: capture removed above (not
    // meshed); forgotten, to be found again if their address is meshed.
    for pod in pods.iter().filter(|pod| pod.found) {
        if outcomes.get(&pod.netns) == Some(&Outcome::NotMeshed) {
            outcomes.remove(&pod.netns);
            directory.remove(&pod.netns);
        }
    }
    Step {
        outcomes,
        unserved_config_pods,
    }
}

/// [`release`]s a pod kept from the last run, if its namespace is still
/// the one that holds its addresses (a `/proc/<pid>` path may name another
/// process's namespace by now).
async fn release_kept(pod: &AnnouncedPod) {
    let Ok(netns) = PodNetns::open(&pod.netns) else {
        return;
    };
    let netns = Arc::new(netns);
    let checked = netns.clone();
    let wanted = pod.ips.clone();
    let holds = tokio::task::spawn_blocking(move || {
        pod::addresses_of(&checked).is_ok_and(|held| wanted.iter().all(|ip| held.contains(ip)))
    })
    .await
    .unwrap_or(false);
    if holds {
        release(netns).await;
    }
}

/// Takes the capture out of a pod that left the mesh: its traffic is its
/// own again.
async fn release(netns: Arc<PodNetns>) {
    let path = netns.path().to_owned();
    let removed = tokio::task::spawn_blocking(move || {
        pod::remove_from_pod(&netns, &CaptureConfig::default())
    })
    .await;
    match removed {
        Ok(Ok(())) => {
            info!(netns = %path.display(), "out of the mesh: capture removed from the pod")
        }
        Ok(Err(error)) => warn!(netns = %path.display(), %error, "removing a pod's capture failed"),
        Err(error) => warn!(netns = %path.display(), %error, "removing a pod's capture failed"),
    }
}

/// Checks that the namespace at `path` holds the pod's addresses, installs
/// the redirection there and opens the pod's listeners, or takes the ones
/// a predecessor handed over for that namespace.
async fn serve_pod(
    plane: &Arc<DataPlane>,
    path: &Path,
    pod: &ListenerPod,
    probe_ports: BTreeSet<u16>,
    inherited: &mut BTreeMap<PathBuf, InheritedListeners>,
) -> Result<Served, String> {
    let netns = Arc::new(PodNetns::open(path).map_err(|e| e.to_string())?);
    let (checked, wanted, ports) = (netns.clone(), pod.ips.clone(), probe_ports.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let held = pod::addresses_of(&checked).map_err(|e| e.to_string())?;
        if let Some(ip) = wanted.iter().find(|ip| !held.contains(ip)) {
            return Err(format!("the namespace does not hold {ip}: not this pod's"));
        }
        pod::install_in_pod(&checked, &CaptureConfig::default(), &ports).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let listeners = match inherited.remove(path) {
        Some(handed) if netns.id().ok() == Some(handed.netns) => {
            adopt_pod_listeners(handed.listeners)?
        }
        Some(_) => {
            warn!(netns = %path.display(), "the handed-over listeners belong to another namespace than the one at this path now; binding new ones");
            netns
                .enter(bind_pod_listeners)
                .map_err(|e| e.to_string())??
        }
        None => netns
            .enter(bind_pod_listeners)
            .map_err(|e| e.to_string())??,
    };
    let sockets = listeners
        .iter()
        .map(|(_, listener)| listener.as_fd().try_clone_to_owned())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("copying a listener for a later hand-over: {e}"))?;
    let tasks = listeners
        .into_iter()
        .map(|(what, listener)| {
            let (plane, pod) = (plane.clone(), pod.clone());
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
        pod: pod.clone(),
        probe_ports,
        netns,
        listeners: tasks,
        sockets,
    })
}

/// Stops every pod's listeners; with `remove`, takes the redirection out
/// of each pod and the probe rule off the node.
async fn stop_serving(served: BTreeMap<PathBuf, Served>, remove: bool) {
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
        for (netns, pod) in &served {
            if let Err(error) = pod::remove_from_pod(&pod.netns, &CaptureConfig::default()) {
                warn!(netns = %netns.display(), %error, "removing a pod's capture failed");
            }
        }
        node_source::remove()
    })
    .await;
    match removed {
        Ok(Ok(())) => info!("the mesh is being uninstalled: capture removed from every pod"),
        Ok(Err(error)) => warn!(%error, "removing the node's probe source rule failed"),
        Err(error) => warn!(%error, "removing the pods' capture failed"),
    }
}

#[path = "pod_probes.rs"]
mod probes;

#[cfg(test)]
#[path = "pods_tests.rs"]
mod tests;
