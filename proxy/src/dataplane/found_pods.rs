//! Pods found on the node by their addresses (running before weft, or
//! set up while no proxy listened), not announced by the runtime: known by
//! what weft's config says of those addresses, and only by a config the
//! control plane sent since the proxy started.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tracing::info;

use super::ServedPod;
use super::routes::RouteTable;
use crate::capture::pod;
use crate::pod_directory::{AnnouncedPod, Outcome, PodDirectory};

/// Searches the namespaces mounted under `netns_dirs` and those of the
/// node's processes for the config's meshed pods nobody announced (no
/// search without `netns_dirs`), adds what it finds to the directory, and
/// renames found pods whose addresses the config gives to others.
pub(super) async fn search(
    directory: &PodDirectory,
    table: &RouteTable,
    netns_dirs: Option<Vec<PathBuf>>,
) {
    let unknown: std::collections::BTreeSet<IpAddr> = table
        .meshed_local_ips()
        .into_iter()
        .filter(|ip| directory.pod_with(*ip).is_none())
        .collect();
    // Only against a config the control plane sent since the proxy
    // started: a kept one may give a deleted pod's address, and with it
    // its identity, to whatever pod holds it now.
    if let Some(dirs) = netns_dirs.filter(|_| !table.restored && !unknown.is_empty()) {
        let wanted = unknown.clone();
        let found = tokio::task::spawn_blocking(move || {
            let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            pod::find_pod_namespaces(&wanted, &dirs, Path::new("/proc"))
        })
        .await
        .unwrap_or_default();
        let mut by_netns: BTreeMap<PathBuf, Vec<IpAddr>> = BTreeMap::new();
        for (ip, path) in found {
            by_netns.entry(path).or_default().push(ip);
        }
        let known = directory.pods();
        for (netns, mut ips) in by_netns {
            info!(netns = %netns.display(), ?ips, "found a running pod's namespace");
            // A namespace already known (an address added later, say):
            // the same pod, with one more address.
            if let Some(pod) = known.iter().find(|pod| pod.netns == netns) {
                ips.extend(
                    pod.ips
                        .iter()
                        .filter(|ip| !ips.contains(ip))
                        .copied()
                        .collect::<Vec<_>>(),
                );
                directory.add(AnnouncedPod { ips, ..pod.clone() });
                continue;
            }
            let workload = ips.iter().find_map(|ip| table.local_workload(*ip));
            directory.add(AnnouncedPod {
                netns,
                ips,
                namespace: workload
                    .map(|w| w.namespace().to_string())
                    .unwrap_or_default(),
                name: workload.map(|w| w.name()).unwrap_or_default(),
                uid: workload
                    .map(|w| w.local().pod_uid.to_string())
                    .unwrap_or_default(),
                found: true,
            });
        }
    }
    rename(directory, table);
}

/// Whether a pod found by its addresses is still the pod it was found as
/// (see [`rename`] for one whose address the config gives to
/// another pod): served while the config names it there, meshed; let go
/// once the config says it is not meshed, or names nobody there. A config
/// kept from the last run decides neither way: it may be older than the
/// pod (the pod's capture stays, its connections wait).
pub(super) fn decide(table: &RouteTable, pod: &AnnouncedPod) -> Outcome {
    let found_as = ServedPod::of(pod);
    match pod.ips.iter().find_map(|ip| found_as.workload(table, *ip)) {
        Some(workload) if workload.meshed() => Outcome::Served,
        Some(_) => Outcome::NotMeshed,
        None if table.generation == 0 || table.restored => {
            Outcome::Pending("a pod found on the node waits for the control plane's config".into())
        }
        None => Outcome::NotMeshed,
    }
}

/// A found pod is known by what the config says of its addresses: when a
/// config from the control plane gives them to another meshed pod, the pod
/// is that one now (its capture stays; its listeners start again as it).
pub(super) fn rename(directory: &PodDirectory, table: &RouteTable) {
    if table.restored || table.generation == 0 {
        return;
    }
    for pod in directory.pods().into_iter().filter(|pod| pod.found) {
        let found_as = ServedPod::of(&pod);
        if pod
            .ips
            .iter()
            .any(|ip| found_as.workload(table, *ip).is_some())
        {
            continue;
        }
        let now = pod.ips.iter().find_map(|ip| table.local_workload(*ip));
        if let Some(workload) = now.filter(|workload| workload.meshed()) {
            info!(netns = %pod.netns.display(), was = %found_as.uid, now = %workload.uid,
                "the config gives a found pod's address to another pod: serving it as that one");
            directory.add(AnnouncedPod {
                namespace: workload.namespace().to_string(),
                name: workload.name(),
                uid: workload.local().pod_uid.to_string(),
                ..pod
            });
        }
    }
}
