//! Wiring: loads the CA and the sources, derives the mesh, and serves gRPC
//! and monitoring until shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};
use weft_api::v1 as pb;
use weft_certs::{Identity, MeshCa, SigningPolicy};

use crate::Error;
use crate::cluster::ClusterState;
use crate::config::{ControlPlaneConfig, Source};
use crate::config_stream::ConfigStreamService;
use crate::dashboard::Dashboard;
use crate::fanout::Published;
use crate::grpc_connections::{GrpcBounds, tls_connections};
use crate::kubernetes::{self, TokenReviewer};
use crate::listeners::Rejections;
use crate::manifests::{ManifestProblem, watch_dir};
use crate::mesh::Mesh;
use crate::monitoring::{self, Monitoring};
use crate::node_auth::{NodeAuthenticator, NodeTokens};
use crate::registry::NodeRegistry;
use crate::reported_traffic::ReportedTraffic;
use crate::serving_cert::ServingCertificate;
use crate::signing::SigningService;

/// The operator's own CA (`--ca-cert`, `--ca-key`), if configured.
fn bring_your_own_ca(config: &ControlPlaneConfig) -> Result<Option<MeshCa>, Error> {
    let (Some(cert), Some(key)) = (&config.ca_cert, &config.ca_key) else {
        return Ok(None);
    };
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| {
            Error::Certs(weft_certs::Error::ReadFile {
                path: path.to_owned(),
                source,
            })
        })
    };
    Ok(Some(MeshCa::from_pem(
        &config.trust_domain,
        &read(cert)?,
        &read(key)?,
    )?))
}

/// What a source provides: the CA, how node proxies prove their node, and
/// the cluster's objects with any problems found reading them.
struct Backing {
    ca: MeshCa,
    auth: NodeAuthenticator,
    cluster: watch::Receiver<Arc<ClusterState>>,
    problems: watch::Receiver<Vec<ManifestProblem>>,
    /// Whether this replica writes status (holds the Lease).
    leader: watch::Receiver<bool>,
}

/// Local manifests: the CA and the roots in the state directory, bootstrap
/// tokens from a file, the cluster from the manifests directory.
/// The sources' counters, registered whichever source runs: a dashboard or
/// alert on one finds its series, at zero, on the other.
struct SourceMetrics {
    manifest_reloads: Counter,
    watch_errors: Counter,
}

impl SourceMetrics {
    fn new(metrics: &mut Registry) -> SourceMetrics {
        let source = SourceMetrics {
            manifest_reloads: Counter::default(),
            watch_errors: Counter::default(),
        };
        metrics.register(
            "weft_control_plane_manifest_reloads",
            "Times the manifests directory was re-read after a change (local manifests)",
            source.manifest_reloads.clone(),
        );
        metrics.register(
            "weft_control_plane_watch_errors",
            "Failed watches of the API server, each retried with backoff (Kubernetes)",
            source.watch_errors.clone(),
        );
        source
    }
}

fn local_backing(
    config: &ControlPlaneConfig,
    source_metrics: &SourceMetrics,
) -> Result<Backing, Error> {
    let (Some(manifests), Some(node_tokens)) = (&config.manifests, &config.node_tokens) else {
        return Err(Error::Config(
            "--source manifests needs --manifests and --node-tokens".into(),
        ));
    };
    let write_failed = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::WriteFile { path, source }
    };
    std::fs::create_dir_all(&config.state_dir).map_err(write_failed(&config.state_dir))?;
    let ca = match bring_your_own_ca(config)? {
        Some(ca) => ca,
        None => MeshCa::load_or_generate(
            &config.state_dir.join("ca.pem"),
            &config.trust_domain,
            SystemTime::now(),
        )?,
    };
    let root_file = config.state_dir.join("root-cert.pem");
    std::fs::write(&root_file, ca.trust_bundle().to_pem()).map_err(write_failed(&root_file))?;
    info!(roots = %root_file.display(), "wrote the mesh roots for proxies");

    let (cluster, problems) = watch_dir(manifests, source_metrics.manifest_reloads.clone())?;
    // One replica on one directory: it is the only writer there is.
    let (_, leader) = watch::channel(true);
    Ok(Backing {
        ca,
        auth: NodeAuthenticator::Tokens(NodeTokens::load(node_tokens)?),
        cluster,
        problems,
        leader,
    })
}

/// Kubernetes: the CA in a Secret (or the operator's), the roots published
/// in a ConfigMap, node proxies authenticated by TokenReview, the cluster
/// from watchers.
async fn kubernetes_backing(
    config: &ControlPlaneConfig,
    source_metrics: &SourceMetrics,
    rejections: &Rejections,
) -> Result<Backing, Error> {
    let client = kubernetes::connect().await?;
    let ca = match bring_your_own_ca(config)? {
        Some(ca) => ca,
        None => {
            kubernetes::load_or_create_ca(
                &client,
                &config.namespace,
                &config.ca_secret,
                &config.trust_domain,
            )
            .await?
        }
    };
    kubernetes::publish_roots(
        &client,
        &config.namespace,
        &config.roots_config_map,
        &ca.trust_bundle().to_pem(),
    )
    .await?;
    let auth = NodeAuthenticator::Kubernetes(Box::new(TokenReviewer::new(
        client.clone(),
        (
            &config.token_audience,
            &config.namespace,
            &config.proxy_service_account,
        ),
        config.token_reviews.clone(),
        rejections.clone(),
    )));
    let cluster = kubernetes::watch_cluster(
        client.clone(),
        &config.namespace,
        source_metrics.watch_errors.clone(),
    )
    .await;
    // Every replica serves; the one holding the Lease also writes status.
    let holder = format!(
        "{}-{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "weft-control-plane".into()),
        rand::random::<u32>()
    );
    let leader = kubernetes::hold_lease(client.clone(), &config.namespace, &config.lease, holder);
    tokio::spawn(kubernetes::write_statuses(
        client,
        cluster.clone(),
        leader.clone(),
        config.namespace.clone(),
    ));
    // The API server validates objects; there is no file to report on.
    let (_, problems) = watch::channel(Vec::new());
    Ok(Backing {
        ca,
        auth,
        cluster,
        problems,
        leader,
    })
}

/// Binds the configured ports and runs the control plane until `shutdown`
/// resolves.
pub async fn run(
    config: ControlPlaneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { what, addr, source })
    };
    let grpc = bind("gRPC", config.grpc_addr).await?;
    let monitoring = bind("monitoring", config.monitoring_addr).await?;
    run_on(config, grpc, monitoring, shutdown).await
}

/// Runs the control plane on already bound listeners (tests bind port 0).
pub async fn run_on(
    config: ControlPlaneConfig,
    grpc: TcpListener,
    monitoring_listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut metrics = Registry::default();
    let nodes = NodeRegistry::new(&mut metrics);
    let rejections = Rejections::new(&mut metrics);
    let source_metrics = SourceMetrics::new(&mut metrics);
    let Backing {
        ca,
        auth,
        mut cluster,
        problems,
        leader,
    } = match config.source {
        Source::Manifests => local_backing(&config, &source_metrics)?,
        Source::Kubernetes => kubernetes_backing(&config, &source_metrics, &rejections).await?,
    };
    let ca = Arc::new(ca.with_policy(SigningPolicy {
        lifetime: Duration::from_secs(config.cert_lifetime_seconds),
        ..SigningPolicy::default()
    }));
    let trust = pb::TrustBundle {
        trust_domain: config.trust_domain.clone(),
        roots_pem: ca.trust_bundle().to_pem(),
    };
    let auth = Arc::new(auth);
    let cluster_for_pages = cluster.clone();
    let mesh_namespace = config.namespace.clone();
    let mut derived_from = cluster.borrow_and_update().clone();
    let initial = Mesh::derive(&derived_from, trust.clone(), &mesh_namespace);
    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(Published::first(initial)));
    let keep = config.config_history;
    // This task owns the only sender of the mesh: when it ends, every config
    // stream sees the channel close and finishes, which lets the gRPC server
    // drain instead of waiting on streams that never end. The work itself
    // runs on a blocking thread: the async workers answer the proxies'
    // keepalives and serve their streams meanwhile.
    let derive = tokio::spawn(async move {
        while cluster.changed().await.is_ok() {
            let state = cluster.borrow_and_update().clone();
            let previous = mesh_tx.borrow().clone();
            let (trust, mesh_namespace) = (trust.clone(), mesh_namespace.clone());
            let before = derived_from.clone();
            let after = state.clone();
            // The mesh of the new cluster from the last one's, re-deriving
            // what changed between the two snapshots (crate::mesh_update).
            let next = tokio::task::spawn_blocking(move || {
                let mut mesh = previous.mesh.next(&before, &after, trust, &mesh_namespace);
                mesh.continue_uninstall(&previous.mesh, &after, &mesh_namespace);
                previous.next(mesh, keep)
            })
            .await;
            match next {
                Ok(Some(next)) => {
                    derived_from = state;
                    mesh_tx.send_replace(Arc::new(next));
                }
                Ok(None) => derived_from = state,
                // The next change is derived from the last snapshot that
                // was, so what this one changed is not lost.
                Err(error) => error!(%error, "deriving the mesh failed; keeping the last one"),
            }
        }
    });

    let identity = Identity::new(
        &config.trust_domain,
        &config.namespace,
        &config.service_account,
    )?;
    let serving = ServingCertificate::start(ca.clone(), identity.clone())?;
    let tls = TlsAcceptor::from(weft_certs::control_plane_server_config(
        serving,
        config.key_exchange,
    )?);

    let local = |listener: &TcpListener| {
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    info!(grpc = %local(&grpc), monitoring = %local(&monitoring_listener), %identity, "control plane serving");

    let (shutting_down, shutting_down_rx) = watch::channel(false);
    let shutdown_delay = Duration::from_secs(config.shutdown_delay_seconds);
    let traffic = Arc::new(ReportedTraffic::new(config.traffic_limits(), &mut metrics));
    metrics.register_collector(Box::new(crate::node_health::HealthMetrics {
        registry: nodes.clone(),
        mesh: mesh_rx.clone(),
        leader,
    }));
    let monitoring = Arc::new(Monitoring {
        metrics,
        dashboard: Dashboard {
            nodes: nodes.clone(),
            mesh: mesh_rx.clone(),
            cluster: cluster_for_pages,
            traffic: traffic.clone(),
            mesh_namespace: config.namespace.clone(),
            trust_domain: config.trust_domain.clone(),
            verdicts: Default::default(),
            peers: crate::dashboard::Peers {
                fixed: config.dashboard_peers.clone(),
                namespace: config.namespace.clone(),
                own_pod: std::env::var("HOSTNAME").ok(),
                port: config.monitoring_addr.port(),
                timeout: Duration::from_millis(config.dashboard_peer_timeout_ms),
            },
        },
        problems,
        config_json: serde_json::to_string_pretty(&config).unwrap_or_default(),
        shutting_down: shutting_down_rx,
    });
    let monitoring_task = tokio::spawn(monitoring::serve(
        monitoring_listener,
        monitoring,
        config.limits.clone(),
        rejections.clone(),
    ));

    let config_service = ConfigStreamService::new(
        mesh_rx.clone(),
        auth.clone(),
        nodes.clone(),
        config.max_config_message_bytes,
    )
    .with_max_streams_per_node(config.limits.max_config_streams_per_node)
    .with_max_full_states(config.max_concurrent_full_states)
    .with_part_bytes(config.config_part_bytes)
    .with_traffic(traffic);
    let signing_service = SigningService::new(ca, mesh_rx, auth, nodes).waiting_for_pods(
        Duration::from_millis(config.sign_wait_for_pod_ms),
        config.sign_waiting_max,
    );
    let bounds = GrpcBounds::new(&config.limits, rejections);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            weft_api::encoded::node_config_server::NodeConfigServer::new(config_service)
                .max_encoding_message_size(config.max_config_message_bytes),
        )
        .add_service(pb::certificates_server::CertificatesServer::new(
            signing_service,
        ))
        .serve_with_incoming_shutdown(tls_connections(grpc, tls, bounds), async move {
            shutdown.await;
            // Serve on while the nodes learn that this replica is leaving
            // its Service; then end the config streams (no more config
            // comes from here: the proxies reconnect elsewhere at once) and
            // stop accepting; signing requests in flight are answered.
            shutting_down.send_replace(true);
            info!(
                delay = ?shutdown_delay,
                "shutting down: serving on while the Service stops sending connections here"
            );
            tokio::time::sleep(shutdown_delay).await;
            info!("closing the config streams and stopping");
            derive.abort();
        })
        .await;
    monitoring_task.abort();
    info!("control plane stopped");
    Ok(result?)
}
