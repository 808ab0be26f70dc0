//! The control side of a node proxy, wired together: the config stream, the
//! workload certificates and the admin endpoint, each a task, sharing state
//! through watch channels. The binary starts one of these; so do the tests.
//!
//! The control tasks can run on a runtime of their own (the binary does
//! this): signing requests, key generation and applying a large config then
//! never hold up the data plane's thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::certificates::{CertificateMap, NodeCertificates};
use crate::control_plane::{ControlPlaneClient, ControlPlaneStatus, ViewReceiver};
use crate::handover::{self, Inherited};
use crate::listening::{self, ListeningControl, ListeningState, TaskEnd};
use crate::logging::LogFilter;
use crate::node_sockets;
use crate::node_state::NodeState;
use crate::transport::ControlPlaneTransport;
use crate::{Error, ProxyConfig};

/// A running node proxy (control side). Dropping it stops every task.
pub struct NodeProxy {
    admin_addr: SocketAddr,
    view: ViewReceiver,
    status: watch::Receiver<ControlPlaneStatus>,
    certificates: watch::Receiver<CertificateMap>,
    drain_requested: watch::Receiver<bool>,
    /// True once a new proxy process took the sockets over.
    handed_over: watch::Receiver<bool>,
    /// Whose turn it is to accept on the node's sockets.
    listening: Arc<ListeningControl>,
    data_plane: Option<crate::dataplane::RunningDataPlane>,
    tasks: JoinSet<TaskEnd>,
    /// The last good state on the node, if kept.
    state: Option<NodeState>,
}

impl NodeProxy {
    /// Checks what can be checked up front (the control-plane address, the
    /// root file, the admin address), then starts the tasks. The control
    /// plane need not be reachable yet: the client keeps trying.
    pub async fn start(config: ProxyConfig) -> Result<NodeProxy, Error> {
        NodeProxy::start_in_process(config, tokio::runtime::Handle::current(), None).await
    }

    /// [`NodeProxy::start`] as the binary runs it: the control tasks (config
    /// stream, certificates, admin endpoint) spawned on `control`, the data
    /// plane on the current runtime, and the admin endpoint able to change
    /// `log_filter`.
    pub async fn start_in_process(
        config: ProxyConfig,
        control: tokio::runtime::Handle,
        log_filter: Option<LogFilter>,
    ) -> Result<NodeProxy, Error> {
        let transport = Arc::new(ControlPlaneTransport::new(&config)?);
        match transport.load_roots().await {
            Ok(roots) => info!(
                path = %config.root_cert.display(),
                roots = roots.roots().len(),
                "loaded the roots that authenticate the control plane"
            ),
            // On Kubernetes the roots are a ConfigMap the control plane writes
            // on its first start, mounted as optional: until it exists the
            // file is missing. The client looks for it every second (it reads
            // the file again for every connection attempt).
            Err(e) if crate::control_plane::is_missing_roots(&e) => {
                warn!(
                    path = %config.root_cert.display(),
                    "the control-plane roots are not there yet; connecting once they appear"
                );
            }
            Err(e) => return Err(e),
        }
        // The state directory holds the hand-over socket too: made (private
        // to this user) before anything is bound in it.
        let state = match &config.state_dir {
            Some(dir) => Some(NodeState::open(dir)?),
            None => None,
        };
        // A proxy already running on the node hands its sockets over; a
        // cold start binds them.
        let taken = match &config.state_dir {
            Some(dir) => {
                let wait = Duration::from_millis(config.handover_timeout_ms);
                handover::take(&dir.join(handover::SOCKET_NAME), wait, &config.pod_uid).await
            }
            None => None,
        };
        let (inherited, predecessor) = match taken {
            Some((inherited, predecessor)) => (inherited, Some(predecessor)),
            None => (Inherited::default(), None),
        };
        let sockets = node_sockets::open(&config, inherited.node)?;
        let admin_addr = sockets
            .admin
            .local_addr()
            .map_err(|source| Error::BindNodeSocket {
                kind: handover::NodeSocketKind::Admin,
                addr: config.admin_addr,
                source,
            })?;
        let (listening_control, listening) = listening::channel();
        let listening_control = Arc::new(listening_control);
        let (handed_over_tx, handed_over) = watch::channel(false);
        let (pods_requests, pods_requested) = tokio::sync::mpsc::channel(4);

        let mut client = ControlPlaneClient::new(
            transport.clone(),
            config.node.clone(),
            config.max_config_message_bytes,
        );
        if let Some(state) = &state {
            let interval = Duration::from_millis(config.state_write_interval_ms);
            client.keep_in(state.clone(), interval);
        }
        let view = client.view();
        // The data plane's route table is made on the control thread, with
        // each applied view (before the data plane sees it).
        let routes = crate::dataplane::Routes::follow(view.clone());
        client.before_publishing(routes.preparer());
        let status = client.status();
        let mut node_certificates = NodeCertificates::new(transport, view.clone());
        if let Some(state) = &state {
            node_certificates.keep_in(state.clone());
        }
        let certificates = node_certificates.subscribe();
        // The data plane counts who talked to whom; the client reports it.
        let ledger = Arc::new(crate::traffic_ledger::TrafficLedger::new(
            config.traffic_report_max_edges,
        ));
        if config.traffic_report_interval_seconds > 0 {
            client.report_traffic(crate::traffic_ledger::TrafficReporting {
                ledger: ledger.clone(),
                interval: Duration::from_secs(config.traffic_report_interval_seconds),
                certificates: certificates.clone(),
                certificates_settle: Duration::from_millis(config.certificate_report_settle_ms),
            });
        }
        let data_plane_config = config.clone();
        let (drain_requests, drain_requested) = watch::channel(false);
        let rejections = crate::rejections::Rejections::default();
        let admin_state = AdminState {
            config: Arc::new(config),
            view: view.clone(),
            status: status.clone(),
            certificates: certificates.clone(),
            log_filter,
            drain_requested: drain_requests,
            rejections: rejections.clone(),
            warnings: Arc::new(crate::warnings::WarningLimiter::new(
                data_plane_config.log_warnings_per_cause,
                Duration::from_millis(data_plane_config.log_warnings_interval_ms),
            )),
            socket: sockets.admin_socket,
        };

        let mut tasks = JoinSet::new();
        tasks.spawn_on(
            async move {
                client.run().await;
                TaskEnd::Stopped("control-plane client")
            },
            &control,
        );
        tasks.spawn_on(
            async move {
                node_certificates.run().await;
                TaskEnd::Stopped("certificate renewal")
            },
            &control,
        );
        let (admin_listener, admin_listening) = (sockets.admin, listening.clone());
        tasks.spawn_on(
            async move {
                admin::serve(admin_listener, admin_state, admin_listening).await;
                TaskEnd::HandedOver("admin endpoint")
            },
            &control,
        );
        info!(%admin_addr, "admin endpoint listening");
        let data_plane = match sockets.monitoring {
            Some(monitoring) if data_plane_config.data_plane => Some(
                crate::dataplane::start(
                    &data_plane_config,
                    crate::dataplane::Start {
                        routes,
                        certificates: certificates.clone(),
                        state: state.clone(),
                        monitoring,
                        cni: sockets.cni,
                        listening: listening.clone(),
                        listening_control: listening_control.clone(),
                        pods: inherited.pods,
                        pod_listeners: inherited.pod_listeners,
                        predecessor,
                        pods_requested,
                        rejections,
                        ledger,
                    },
                    &mut tasks,
                )
                .await?,
            ),
            _ => {
                // Nothing to serve: the predecessor may stop at once.
                if let Some(predecessor) = predecessor {
                    let wait = Duration::from_millis(data_plane_config.handover_timeout_ms);
                    tokio::spawn(predecessor.release(wait));
                }
                None
            }
        };
        if let Some(listener) = sockets.handover {
            let giver = handover::Giver {
                listener,
                node_sockets: sockets.copies,
                pods: data_plane.is_some().then_some(pods_requests),
                listening: listening_control.clone(),
                handed_over: handed_over_tx,
                wait: Duration::from_millis(data_plane_config.handover_timeout_ms),
                draining: data_plane.as_ref().map(|plane| plane.draining()),
                state: state.clone(),
                pod_uid: data_plane_config.pod_uid.clone(),
                predecessor_pod_uid: inherited.predecessor_pod_uid.clone(),
            };
            tasks.spawn(handover::serve(giver));
        }
        Ok(NodeProxy {
            admin_addr,
            view,
            status,
            certificates,
            drain_requested,
            handed_over,
            listening: listening_control,
            data_plane,
            tasks,
            state,
        })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The applied config.
    pub fn view(&self) -> ViewReceiver {
        self.view.clone()
    }

    /// The link to the control plane.
    pub fn status(&self) -> watch::Receiver<ControlPlaneStatus> {
        self.status.clone()
    }

    /// The workload certificates.
    pub fn certificates(&self) -> watch::Receiver<CertificateMap> {
        self.certificates.clone()
    }

    /// Resolves once someone asked for a drain on the admin endpoint
    /// (`POST /drain`); the owner then calls [`NodeProxy::shutdown`], as
    /// it does on SIGTERM. A receiver of its own, so that waiting on it
    /// does not borrow the proxy.
    pub fn drain_requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut requested = self.drain_requested.clone();
        async move {
            // An error means the admin task is gone; `stopped` reports that.
            if requested.wait_for(|requested| *requested).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once a new proxy process on the node took the sockets over
    /// (see [`crate::handover`]); the owner then calls
    /// [`NodeProxy::shutdown`] to drain, and exits on SIGTERM.
    pub fn handed_over(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut handed_over = self.handed_over.clone();
        async move {
            if handed_over.wait_for(|done| *done).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until a task stops, which none should (tasks whose sockets
    /// went to a successor are done, not stopped): returns its name, or why
    /// it stopped if it panicked.
    pub async fn stopped(&mut self) -> String {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(TaskEnd::HandedOver(_))) => {}
                Some(Ok(TaskEnd::Stopped(name))) => return format!("the {name} stopped"),
                Some(Err(e)) => return format!("a task failed: {e}"),
                None => return "no tasks are running".to_owned(),
            }
        }
    }

    /// Drains the data plane (stop accepting, let open connections finish
    /// within the deadline, leave the capture rules to the next proxy),
    /// then stops every task and waits until they are gone. If the mesh is
    /// being uninstalled, the capture rules and the state kept on the node
    /// (config, certificates and their keys) go too.
    pub async fn shutdown(mut self) {
        // A successor that holds the sockets serves from now on (it may not
        // be ready, but a connection waits in the queue rather than being
        // reset here).
        if self.listening.state() == ListeningState::Paused {
            info!("stopping while a new proxy takes over: leaving the sockets to it");
            self.listening.set(ListeningState::Released);
        }
        let mut cni_left_chained = false;
        if let Some(data_plane) = self.data_plane.take() {
            cni_left_chained = data_plane.drain().await;
        }
        self.tasks.shutdown().await;
        // A successor (one may have come during the drain) owns the node's
        // state and capture now.
        let handed_over = self.listening.state() == ListeningState::Released;
        let uninstalling = !handed_over
            && self
                .view
                .borrow()
                .as_ref()
                .is_some_and(|view| view.uninstalling());
        if let Some(state) = self.state.take().filter(|_| uninstalling) {
            match state.clear() {
                Ok(()) => {
                    info!(dir = %state.dir().display(), "the mesh is being uninstalled: removed the state kept on the node")
                }
                Err(error) => warn!(%error, "removing the state kept on the node failed"),
            }
            if cni_left_chained && let Err(error) = state.store_nothing_meshed() {
                warn!(%error, "weft-cni stays chained and cannot be told nothing is meshed");
            }
        }
    }
}
