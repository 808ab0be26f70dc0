//! The data plane: the listeners that carry pods' TCP traffic, and what
//! they share. Reads the applied config and the workload certificates from
//! the control side and never writes to it.
//!
//! - [`outbound`] (15001): traffic leaving local pods.
//! - [`inbound`] (15008): HBONE tunnels arriving for local pods.
//! - [`plaintext`] (15006): plaintext arriving for meshed local pods.
//! - [`gate`]: the one authorization decision every path into a meshed
//!   local pod passes; [`reauthorize`]: the same for open connections when
//!   policy changes.
//! - [`routes`]: where a connection goes; [`balancer`]: endpoint choice
//!   and TrafficPolicy state; [`telemetry`]: metrics and access logs;
//!   [`drain`]: graceful shutdown.

mod addresses;
pub mod admission;
pub mod baggage;
pub mod balancer;
pub mod drain;
mod found_pods;
pub mod gate;
mod idle;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
mod pod_listeners;
pub mod pod_namespaces;
pub mod pods;
pub mod reauthorize;
pub mod routes;
mod startup;
pub mod telemetry;

pub use startup::{RunningDataPlane, Start, start};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use weft_certs::Identity;

use crate::certificates::CertificateMap;
use crate::control_plane::ViewReceiver;
use crate::hbone::HbonePool;
use crate::node_view::NodeView;
use drain::Drain;
use routes::RouteTable;
use telemetry::TrafficMetrics;

/// What every connection handler shares.
pub struct DataPlane {
    /// The applied config, indexed for lookups.
    pub routes: Arc<Routes>,
    /// The node's workload certificates.
    pub certificates: watch::Receiver<CertificateMap>,
    /// Metric families.
    pub metrics: Arc<TrafficMetrics>,
    /// Pooled HBONE connections to other nodes.
    pub pool: Arc<HbonePool>,
    /// How served HBONE connections run: their receive windows (from the
    /// memory budget dialed connections share), keepalive and handshake
    /// deadline.
    pub hbone: crate::hbone::ServerSettings,
    /// Graceful shutdown.
    pub drain: Drain,
    /// TLS server configs per local identity, rebuilt when its certificate changes.
    pub server_configs: inbound::ServerConfigs,
    /// The connections, handshakes and peers the listeners hold, within
    /// the configured limits.
    pub admission: Arc<admission::Admission>,
    /// Open inbound connections, decided again when policy changes.
    pub inbound: Arc<reauthorize::InboundRegistry>,
    /// How long a connection waits for a certificate or config it needs
    /// (`--pending-connection-wait-ms`).
    pub pending_wait: std::time::Duration,
    /// The namespaces of the pods served in their own (capture mode
    /// `pod`), where their connections' sockets are made.
    pub pods: Arc<pod_namespaces::PodNamespaces>,
    /// Whose turn it is to accept: the pods' listeners stop once a new
    /// proxy process took them over.
    pub listening: crate::listening::Listening,
    /// How often the warnings a pod or peer can trigger are logged.
    pub warnings: Arc<crate::warnings::WarningLimiter>,
    /// The cluster's name in the baggage of this node's tunnels
    /// (`--cluster-name`).
    pub cluster_name: String,
}

impl DataPlane {
    /// The node's certificates once they hold one for `identity`, waiting
    /// up to [`DataPlane::pending_wait`] for it (a pod's first connection
    /// can come before its certificate); `None` if none came.
    pub async fn certificates_with(&self, identity: &Identity) -> Option<CertificateMap> {
        certificates_with(&self.certificates, identity, self.pending_wait).await
    }

    /// The route table once it knows `ip` as the meshed local pod `pod`,
    /// waiting up to [`DataPlane::pending_wait`] for such a config (a
    /// connection can come for a pod before its config, or while the config
    /// still gives its address to a deleted pod); the table and the pod, or
    /// the latest table and `None`.
    pub async fn with_local_pod(
        &self,
        pod: &ServedPod,
        ip: std::net::IpAddr,
    ) -> (Arc<RouteTable>, Option<Arc<crate::node_view::Workload>>) {
        let meshed_pod =
            |table: &RouteTable| pod.workload(table, ip).filter(|w| w.meshed()).cloned();
        let table = self.routes.current();
        if let Some(pod) = meshed_pod(&table) {
            return (table, Some(pod));
        }
        tracing::debug!(%ip, wait = ?self.pending_wait, "waiting for the config of a local pod");
        let mut tables = self.routes.subscribe();
        let found = tokio::time::timeout(self.pending_wait, async {
            loop {
                let table = self.routes.current();
                if let Some(pod) = meshed_pod(&table) {
                    return Some((table, pod));
                }
                if tables.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some((table, pod))) => (table, Some(pod)),
            _ => (self.routes.current(), None),
        }
    }
}

/// The route table of the applied config. The control-plane client makes
/// the table of each view it applies ([`Routes::prepare`], registered with
/// [`ControlPlaneClient::before_publishing`](crate::ControlPlaneClient::before_publishing)),
/// on its own thread and before it publishes the view, so the data-plane
/// thread only picks up a finished table: a delta never stalls traffic for
/// its size. For a view published without that (tests, or one applied
/// before the data plane started), a task keeps the table in step, and a
/// connection that arrives before that task's turn builds the table
/// itself; either way nothing accepted after a config was applied (and
/// shown in the config dump, and acknowledged) runs on the config before.
/// All tables share one balancing state, so it survives config changes.
pub struct Routes {
    view: ViewReceiver,
    balancers: Arc<balancer::Balancers>,
    table: watch::Sender<Arc<RouteTable>>,
}

impl Routes {
    /// Builds the table of the current view and starts the task that
    /// follows it.
    pub fn follow(view: ViewReceiver) -> Arc<Routes> {
        let balancers = Arc::new(balancer::Balancers::default());
        let initial = view
            .borrow()
            .as_deref()
            .map(|v| RouteTable::default().next(v, &balancers))
            .unwrap_or_default();
        let routes = Arc::new(Routes {
            view: view.clone(),
            balancers,
            table: watch::channel(Arc::new(initial)).0,
        });
        let (follower, mut changes) = (Arc::downgrade(&routes), view);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                changes.borrow_and_update();
                let Some(routes) = follower.upgrade() else {
                    return;
                };
                routes.current();
            }
        });
        routes
    }

    /// Makes the table of `view` (a view about to be published) now, on
    /// the caller's thread, unless one as new is there already.
    pub fn prepare(&self, view: &NodeView) {
        let table = self.table.borrow().clone();
        if view.generation() > table.generation {
            self.install(table.next(view, &self.balancers));
        }
    }

    /// [`Routes::prepare`] as work for the control-plane client.
    pub fn preparer(self: &Arc<Routes>) -> crate::control_plane::BeforePublishing {
        let routes = Arc::downgrade(self);
        Arc::new(move |view| {
            if let Some(routes) = routes.upgrade() {
                routes.prepare(view);
            }
        })
    }

    /// The table of the config applied now.
    pub fn current(&self) -> Arc<RouteTable> {
        // The view first: a table is installed before its view is
        // published, so the table read after it is at least as new unless
        // no one prepared it.
        let view = self.view.borrow().clone();
        let table = self.table.borrow().clone();
        let Some(view) = view.filter(|v| v.generation() > table.generation) else {
            return table;
        };
        self.install(table.next(&view, &self.balancers));
        self.table.borrow().clone()
    }

    /// Publishes `newer` unless a newer table is there already (two
    /// builders may race; the newest version wins).
    fn install(&self, newer: RouteTable) {
        let mut newer = Some(Arc::new(newer));
        self.table.send_if_modified(|current| {
            let newest = newer
                .as_ref()
                .is_some_and(|t| t.generation > current.generation);
            if let Some(table) = newer.take().filter(|_| newest) {
                *current = table;
            }
            newest
        });
    }

    /// Changes of the table, for those who act on every new config.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.table.subscribe()
    }
}

/// The certificates once they hold one for `identity`, waiting up to
/// `wait` for it; `None` if none came.
async fn certificates_with(
    certificates: &watch::Receiver<CertificateMap>,
    identity: &Identity,
    wait: std::time::Duration,
) -> Option<CertificateMap> {
    let mut certificates = certificates.clone();
    let has = |map: &CertificateMap| map.contains_key(identity);
    if let Some(ready) = Some(certificates.borrow().clone()).filter(has) {
        return Some(ready);
    }
    tracing::debug!(%identity, ?wait, "waiting for a certificate");
    match tokio::time::timeout(wait, certificates.wait_for(has)).await {
        Ok(Ok(map)) => Some(map.clone()),
        _ => None,
    }
}

/// The pod a listener inside a pod's namespace serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedPod {
    /// Its addresses (those its namespace holds).
    pub ips: std::collections::BTreeSet<std::net::IpAddr>,
    /// `<namespace>/<name>`, as the container runtime announced it (or,
    /// for a pod found on the node, as the config named it then); empty if
    /// nobody said.
    pub uid: String,
    /// Its `metadata.uid`, as the runtime announced it; empty if it did
    /// not say.
    pub pod_uid: String,
}

impl ServedPod {
    /// What a listener of the announced (or found) `pod` serves.
    pub fn of(pod: &crate::pod_directory::AnnouncedPod) -> ServedPod {
        let uid = if pod.namespace.is_empty() || pod.name.is_empty() {
            String::new()
        } else {
            format!("{}/{}", pod.namespace, pod.name)
        };
        ServedPod {
            ips: pod.ips.iter().copied().collect(),
            uid,
            pod_uid: pod.uid.clone(),
        }
    }

    /// What the pod's connections are counted under (see
    /// [`admission`]): its name, or, for a pod nobody named, its first
    /// address.
    pub fn admission_key(&self) -> Arc<str> {
        match self.ips.first() {
            _ if !self.uid.is_empty() => Arc::from(self.uid.as_str()),
            Some(ip) => Arc::from(ip.to_string()),
            None => Arc::from(""),
        }
    }

    /// Whether `ip` is one of the pod's own addresses.
    pub fn owns(&self, ip: std::net::IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// The config's workload at `ip`, if it is this pod. A pod that takes
    /// over a deleted pod's address is not that pod, whatever a config
    /// that has not caught up yet says: its connections never carry the
    /// deleted pod's identity or policy.
    pub fn workload<'t>(
        &self,
        table: &'t RouteTable,
        ip: std::net::IpAddr,
    ) -> Option<&'t Arc<crate::node_view::Workload>> {
        let same_pod = |w: &&Arc<crate::node_view::Workload>| {
            (self.uid.is_empty() || w.uid == *self.uid.as_str())
                && (self.pod_uid.is_empty()
                    || w.local().pod_uid.is_empty()
                    || *w.local().pod_uid == *self.pod_uid)
        };
        table.local_workload(ip).filter(same_pod)
    }
}

/// A listener's pod, shared by its connections.
pub type ListenerPod = Arc<ServedPod>;

/// Runs a capture listener: each connection whose original destination is
/// known gets its own task, with a span naming source and destination, and
/// counts as open for the drain while `handle` runs.
///
/// A listener serves the pod whose namespace it is in (`pod`, its
/// addresses) and no other: an outbound connection from an address the
/// pod does not own (a spoofed one) and an inbound one to such an address
/// are refused. The redirected connections' destinations come from
/// `SO_ORIGINAL_DST` (HBONE, not redirected, is addressed to the pod
/// itself).
pub async fn serve_captured<F, Fut>(
    listener: tokio::net::TcpListener,
    plane: Arc<DataPlane>,
    listener_name: &'static str,
    pod: ListenerPod,
    handle: F,
) where
    F: Fn(
        Arc<DataPlane>,
        ListenerPod,
        tokio::net::TcpStream,
        std::net::SocketAddr,
        std::net::SocketAddr,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let outbound = listener_name == "outbound";
    let redirected = listener_name != "hbone";
    let pod_key = pod.admission_key();
    while let Some((stream, source)) =
        next_connection(&listener, &plane.drain, &plane.listening, listener_name).await
    {
        let destination = if redirected {
            crate::sockets::redirected_destination(&stream)
        } else {
            crate::sockets::original_destination(&stream)
        };
        let destination = match destination {
            // Not captured (someone dialled the listener itself): refuse
            // rather than connect to ourselves.
            Ok(destination) if destination.ip().is_loopback() => continue,
            Ok(destination) => destination,
            Err(error) => {
                if let Some(suppressed) = plane.warnings.allow("no_original_destination") {
                    tracing::warn!(%error, %source, listener = listener_name, suppressed,
                        "no original destination");
                }
                continue;
            }
        };
        let own = if outbound { source } else { destination };
        if !pod.owns(own.ip()) {
            if let Some(suppressed) = plane.warnings.allow("spoofed_address") {
                tracing::warn!(%source, %destination, listener = listener_name, pod = ?pod,
                    suppressed, "refused: the address is not the pod's own (spoofed)");
            }
            let direction = if outbound {
                telemetry::Direction::Outbound
            } else {
                telemetry::Direction::Inbound
            };
            plane.metrics.failure(direction, "spoofed_address");
            crate::copy::reset_on_close(&stream);
            continue;
        }
        let from_outside = (!outbound).then_some(source.ip());
        let admitted = match plane
            .admission
            .connection(listener_name, &pod_key, from_outside)
        {
            Ok(admitted) => admitted,
            Err(refused) => {
                if let Some(suppressed) = plane.warnings.allow(refused.reason()) {
                    tracing::warn!(%source, %destination, listener = listener_name,
                        pod = %pod_key, reason = refused.reason(), suppressed,
                        "refused: a connection limit was reached");
                }
                crate::copy::reset_on_close(&stream);
                continue;
            }
        };
        let span = tracing::info_span!("connection", listener = listener_name, src = %source, dst = %destination);
        let guard = plane.drain.track();
        let connection = handle(plane.clone(), pod.clone(), stream, source, destination);
        tokio::spawn(crate::lanes::movable(
            async move {
                let _guard = guard;
                let _admitted = admitted;
                connection.await;
            }
            .instrument(span),
        ));
    }
}

/// The next connection a listener should serve; `None` once a new proxy
/// process took the listener over (it accepts from the same queue, so
/// nothing waiting there is lost). While draining without one, new
/// connections are reset on arrival instead: the capture rules keep sending
/// them here until the proxy exits, and a reset fails them at once where a
/// closed listener would leave them to time out.
pub async fn next_connection(
    listener: &tokio::net::TcpListener,
    drain: &Drain,
    listening: &crate::listening::Listening,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            () = listening.released() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) if drain.is_draining() => {
                tracing::debug!(%peer, listener = what, "draining: resetting a new connection");
                crate::copy::reset_on_close(&stream);
            }
            Ok(accepted) => {
                // Small writes back to the pod (a response) must leave at
                // once: Nagle against the pod's delayed ACK costs 40 ms.
                let _ = accepted.0.set_nodelay(true);
                return Some(accepted);
            }
            Err(error) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(%error, listener = what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Proxies between `client` and a metered upstream until both directions
/// end; an error aborts both and is noted in the upstream's access-log line.
pub async fn relay<A, B>(client: &mut A, mut upstream: telemetry::Metered<B>)
where
    A: AsyncRead + AsyncWrite + crate::copy::Abort + Unpin,
    B: AsyncRead + AsyncWrite + crate::copy::Abort + Unpin,
{
    if let Err(error) = crate::copy::copy_or_abort(client, &mut upstream).await {
        tracing::debug!(%error, "connection ended with an error");
        upstream.failed(error);
    }
}

#[cfg(test)]
mod tests;
