//! The kubelet's probes of the served pods: the node reaches a meshed
//! pod uncaptured only on the ports the config says the kubelet probes,
//! from the node's probe source address (see `capture::node_source`).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use tracing::warn;

use super::Served;
use crate::capture::pod;
use crate::capture::{CaptureConfig, node_source};
use crate::dataplane::ServedPod;
use crate::dataplane::routes::RouteTable;

/// Installs (or replaces) the node's rule that gives its own connections
/// to the served pods' probe ports the node's source address, so that the
/// kubelet's probes pass.
pub(super) async fn set_node_sources(probes: BTreeSet<SocketAddr>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || node_source::set(&CaptureConfig::default(), &probes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The ports the kubelet probes on `pod`, as the config says.
pub(super) fn probe_ports_of(table: &RouteTable, pod: &ServedPod) -> BTreeSet<u16> {
    pod.ips
        .iter()
        .find_map(|ip| pod.workload(table, *ip))
        .map(|workload| workload.local().probe_ports.clone())
        .unwrap_or_default()
}

/// Lets the node reach each served pod's probe ports as the config now
/// says (a pod served before its config came has none yet: its probes
/// are the plaintext of an unknown client until then).
pub(super) async fn follow_probe_ports(table: &RouteTable, served: &mut BTreeMap<PathBuf, Served>) {
    for (path, serving) in served.iter_mut() {
        let ports = probe_ports_of(table, &serving.pod);
        if ports == serving.probe_ports {
            continue;
        }
        let (netns, wanted) = (serving.netns.clone(), ports.clone());
        let set = tokio::task::spawn_blocking(move || {
            pod::set_probe_ports(&netns, &CaptureConfig::default(), &wanted)
        })
        .await;
        match set {
            Ok(Ok(())) => serving.probe_ports = ports,
            Ok(Err(error)) => {
                warn!(netns = %path.display(), %error, "setting a pod's probe ports failed")
            }
            Err(error) => {
                warn!(netns = %path.display(), %error, "setting a pod's probe ports failed")
            }
        }
    }
}
