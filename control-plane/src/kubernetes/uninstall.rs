//! `weft-control-plane uninstall`: tells every node proxy that the mesh is
//! going away, before anything is deleted, and waits until each has heard.
//!
//! A node proxy that stops leaves its capture in place, so that its meshed
//! pods' traffic is held or refused, never sent in plaintext, until the next
//! proxy (an upgrade, a restart) serves it. Only an uninstall may remove it,
//! and a proxy cannot tell an uninstall from an upgrade by itself: both
//! delete its pod. So the Helm chart runs this first (a pre-delete hook):
//! 1. it annotates the node proxies' DaemonSet with
//!    [`UNINSTALL_ANNOTATION`]; the control plane sees that and tells every
//!    proxy (`ConfigUpdate.uninstalling`), which will then remove its capture
//!    when it stops;
//! 2. it asks every running proxy's readiness port for `/uninstall` until
//!    each answers 200 ("I will remove my capture"), and fails after the
//!    timeout naming the proxies that did not (and takes the annotation
//!    back), so that the uninstall stops before it could leave a node's
//!    pods cut off.
//!
//! The DaemonSet, annotation included, goes with the installation.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tracing::{info, warn};

use crate::Error;
use crate::mesh::{NODE_PROXY_DAEMONSET, UNINSTALL_ANNOTATION};

/// What `uninstall` is told.
#[derive(Clone, Debug, clap::Args)]
pub struct UninstallArgs {
    /// How long to wait for every node proxy to confirm, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
    /// The node proxies' readiness port, where they confirm.
    #[arg(long, default_value_t = 15021)]
    pub proxy_readiness_port: u16,
    /// How often to ask the proxies that have not confirmed yet, in
    /// milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
}

/// Runs the uninstall announcement in `namespace` (see the module docs).
pub async fn announce_uninstall(
    client: kube::Client,
    namespace: &str,
    args: &UninstallArgs,
) -> Result<(), Error> {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let annotation = serde_json::json!({
        "metadata": {"annotations": {UNINSTALL_ANNOTATION: "true"}}
    });
    let patched = daemon_sets
        .patch(
            NODE_PROXY_DAEMONSET,
            &PatchParams::default(),
            &Patch::Merge(&annotation),
        )
        .await;
    let daemon_set = match patched {
        Ok(daemon_set) => daemon_set,
        Err(kube::Error::Api(response)) if response.code == 404 => {
            info!(namespace, "no node proxies installed; nothing to announce");
            return Ok(());
        }
        Err(source) => {
            return Err(Error::Kubernetes {
                operation: format!(
                    "annotating DaemonSet {namespace}/{NODE_PROXY_DAEMONSET} with {UNINSTALL_ANNOTATION}"
                ),
                source,
            });
        }
    };
    info!(
        namespace,
        "told the control plane the mesh is being uninstalled; waiting for every node proxy to confirm"
    );
    let waited = wait_for_confirmations(client, namespace, &daemon_set, args).await;
    if waited.is_err() {
        // Taken back: the proxies that did hear would otherwise remove
        // their capture at their next restart, an upgrade included.
        let withdraw = serde_json::json!({
            "metadata": {"annotations": {UNINSTALL_ANNOTATION: null}}
        });
        if let Err(error) = daemon_sets
            .patch(
                NODE_PROXY_DAEMONSET,
                &PatchParams::default(),
                &Patch::Merge(&withdraw),
            )
            .await
        {
            warn!(%error, "could not take the uninstall annotation back");
        }
    }
    waited
}

/// Waits until every running node proxy (the pods of `daemon_set`)
/// confirms, or fails after the timeout naming those that did not.
async fn wait_for_confirmations(
    client: kube::Client,
    namespace: &str,
    daemon_set: &DaemonSet,
    args: &UninstallArgs,
) -> Result<(), Error> {
    let selector = daemon_set
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::Kubernetes {
                operation: format!("listing the node proxies ({selector}) in {namespace}"),
                source,
            })?;
        let mut waiting = Vec::new();
        for pod in &listed.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.as_ref();
            let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
            let ip = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            match ip {
                Some(ip) if running => {
                    let addr = SocketAddr::new(ip, args.proxy_readiness_port);
                    if let Err(reason) = confirmed(addr).await {
                        waiting.push(format!("{name} ({addr}: {reason})"));
                    }
                }
                // A proxy that is not running has no capture to keep: the
                // next one to start sees the annotation first.
                _ => {}
            }
        }
        if waiting.is_empty() {
            info!(
                proxies = listed.items.len(),
                "every node proxy will remove its capture when it stops"
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Config(format!(
                "after {} s, these node proxies have not confirmed the uninstall: {}. \
                 Deleting weft now would leave their nodes' meshed pods without a \
                 network; fix them (or delete their pods) and run it again",
                args.timeout_seconds,
                waiting.join("; ")
            )));
        }
        warn!(waiting = %waiting.join("; "), "waiting for node proxies to confirm the uninstall");
        tokio::time::sleep(Duration::from_millis(args.poll_interval_ms)).await;
    }
}

/// Asks one proxy's readiness port for `/uninstall`: `Ok` on a 200.
async fn confirmed(addr: SocketAddr) -> Result<(), String> {
    let address = addr.to_string();
    crate::http_get::get(&address, "/uninstall", Duration::from_secs(5))
        .await
        .map(drop)
}
