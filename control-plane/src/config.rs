//! The control plane's configuration: one struct, from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;
use weft_certs::KeyExchange;

/// How to run the control plane.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(
    name = "weft-control-plane",
    version,
    about = "The weft mesh control plane"
)]
#[command(subcommand_negates_reqs = true)]
pub struct ControlPlaneConfig {
    /// A one-off command instead of serving.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,

    /// Where the cluster comes from.
    #[arg(long, env = "WEFT_SOURCE", value_enum, default_value_t = Source::Manifests)]
    pub source: Source,

    /// Directory of Kubernetes manifests (YAML) describing the cluster;
    /// watched for changes. Required with `--source manifests`.
    #[arg(long, env = "WEFT_MANIFESTS", required_if_eq("source", "manifests"))]
    pub manifests: Option<PathBuf>,

    /// File of `<node> <token>` lines: the bootstrap token of each node
    /// proxy. Required with `--source manifests`.
    #[arg(long, env = "WEFT_NODE_TOKENS", required_if_eq("source", "manifests"))]
    pub node_tokens: Option<PathBuf>,

    /// Kubernetes: the audience node proxies' ServiceAccount tokens must be
    /// bound to.
    #[arg(long, env = "WEFT_TOKEN_AUDIENCE", default_value = "weft")]
    pub token_audience: String,

    /// Kubernetes: the node proxies' ServiceAccount, in the control plane's
    /// namespace. Only its tokens authenticate a node.
    #[arg(
        long,
        env = "WEFT_PROXY_SERVICE_ACCOUNT",
        default_value = "weft-node-proxy"
    )]
    pub proxy_service_account: String,

    /// Kubernetes: the Secret (in the control plane's namespace) holding the
    /// generated root CA; created if absent, never overwritten.
    #[arg(long, env = "WEFT_CA_SECRET", default_value = "weft-ca")]
    pub ca_secret: String,

    /// Kubernetes: the Lease (in the control plane's namespace) that picks the
    /// one replica writing status conditions.
    #[arg(long, env = "WEFT_LEASE", default_value = "weft-control-plane")]
    pub lease: String,

    /// Kubernetes: the ConfigMap (in the control plane's namespace) where
    /// the mesh roots are published for node proxies.
    #[arg(long, env = "WEFT_ROOTS_CONFIG_MAP", default_value = "weft-root-ca")]
    pub roots_config_map: String,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = weft_certs::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Local manifests: directory for state, the generated CA (`ca.pem`,
    /// private) and the roots for proxies to bootstrap from (`root-cert.pem`).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// Bring-your-own CA: PEM chain of the signing certificate up to its root.
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Bring-your-own CA: the signing key (PKCS#8 PEM).
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Lifetime of workload certificates, in seconds.
    #[arg(long, env = "WEFT_CERT_LIFETIME_SECONDS", default_value_t = 24 * 3600)]
    pub cert_lifetime_seconds: u64,

    /// Namespace of the control plane: its own identity, and on Kubernetes
    /// where its Secret and ConfigMap live.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE_NAMESPACE",
        default_value = crate::crd::DEFAULT_MESH_NAMESPACE
    )]
    pub namespace: String,

    /// ServiceAccount of the control plane's own identity.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE_SERVICE_ACCOUNT",
        default_value = "weft-control-plane"
    )]
    pub service_account: String,

    /// The TLS key exchange of the gRPC port: `post-quantum-preferred`
    /// (X25519MLKEM768 first, X25519 allowed) or `post-quantum-required`
    /// (X25519MLKEM768 only; a proxy without it cannot connect).
    #[arg(long, env = "WEFT_KEY_EXCHANGE", default_value_t = KeyExchange::default())]
    #[serde(serialize_with = "serialize_display")]
    pub key_exchange: KeyExchange,

    /// gRPC (config streams, certificate signing) over TLS.
    #[arg(long, env = "WEFT_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,

    /// Health, metrics and debug pages.
    #[arg(long, env = "WEFT_MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    pub monitoring_addr: SocketAddr,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The largest config message sent to a proxy, in bytes. A proxy that
    /// assembles updates from parts gets messages of about
    /// `--config-part-bytes`, larger only for a single larger entry; an
    /// older proxy gets each update whole (a node's full state grows with
    /// the cluster, about 170 to 280 bytes per pod and per Service endpoint). The
    /// same default as the proxy's `--max-config-message-bytes`; a larger
    /// message is not sent, with an error in this log naming the size.
    #[arg(long, env = "WEFT_MAX_CONFIG_MESSAGE_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_config_message_bytes: usize,

    /// The size of an update's parts, in bytes: a full state (and a large
    /// delta) goes to a proxy as messages of about this size, so that each
    /// stream's buffers, here and in the proxy, stay about this large
    /// however large the cluster.
    #[arg(long, env = "WEFT_CONFIG_PART_BYTES", default_value_t = 64 * 1024)]
    pub config_part_bytes: usize,

    /// Mesh changes kept for config streams that fall behind (a slow
    /// proxy, a burst of changes): a stream catches up through them by the
    /// keys that changed; one further behind is sent a full state again.
    #[arg(long, env = "WEFT_CONFIG_HISTORY", default_value_t = 1024)]
    pub config_history: usize,

    /// Full states being sent at once. Each is written a part at a time,
    /// but keeps the mesh it was taken from alive until its last part is
    /// out (a slow proxy, a busy mesh): proxies beyond this wait their turn,
    /// so a thousand reconnecting together hold at most this many meshes.
    #[arg(long, env = "WEFT_MAX_CONCURRENT_FULL_STATES", default_value_t = 16)]
    pub max_concurrent_full_states: usize,

    /// After SIGTERM, how long this replica serves on, new connections
    /// included, before it closes its config streams (the proxies reconnect
    /// to another replica) and stops once its certificate requests are
    /// answered, in seconds. Kubernetes takes a terminating pod out of its
    /// Service at once, but each node learns it a moment later: until then
    /// new connections still come here, and must not be refused.
    #[arg(long, env = "WEFT_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,

    /// How long a certificate request for a pod this replica has not seen
    /// with an IP yet waits for it, in milliseconds, before it is refused.
    /// A node's proxy learns of a new pod from its CNI plugin, a moment
    /// before the kubelet reports the pod's IP to the API server (and a
    /// replica that just started sees it later still).
    #[arg(long, env = "WEFT_SIGN_WAIT_FOR_POD_MS", default_value_t = 5000)]
    pub sign_wait_for_pod_ms: u64,

    /// Bounds on what clients of the gRPC and monitoring ports can make
    /// the control plane hold.
    #[command(flatten)]
    pub limits: crate::listeners::ListenerLimits,

    /// Bounds on the TokenReviews that node authentication sends to the
    /// API server (Kubernetes source).
    #[command(flatten)]
    pub token_reviews: crate::kubernetes::TokenReviewLimits,

    /// How many certificate requests may wait so at once (see
    /// `--sign-wait-for-pod-ms`); more are refused at once, so that nodes
    /// asking for pods that never come cannot pile requests up.
    #[arg(long, env = "WEFT_SIGN_WAITING_MAX", default_value_t = 1000)]
    pub sign_waiting_max: usize,

    /// How far back the dashboard's traffic page reaches, in seconds: the
    /// proxies' traffic reports are summed over this window.
    #[arg(long, env = "WEFT_DASHBOARD_TRAFFIC_WINDOW_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(30..=86_400))]
    pub dashboard_traffic_window_seconds: u64,

    /// Pairs of workloads the dashboard holds over the window, from all
    /// nodes together; connections between further pairs are counted
    /// (`weft_control_plane_traffic_events_left_out_total`), not named.
    #[arg(
        long,
        env = "WEFT_DASHBOARD_TRAFFIC_MAX_EDGES",
        default_value_t = 20_000
    )]
    pub dashboard_traffic_max_edges: usize,

    /// Edges read from one proxy's traffic report; the rest of a larger
    /// report is refused and counted. The same as the proxies'
    /// `--traffic-report-max-edges` by default.
    #[arg(
        long,
        env = "WEFT_DASHBOARD_TRAFFIC_MAX_EDGES_PER_REPORT",
        default_value_t = 2_000
    )]
    pub dashboard_traffic_max_edges_per_report: usize,

    /// Other replicas' monitoring addresses (`ip:port`, comma-separated),
    /// whose nodes and traffic the dashboard merges with its own: each
    /// proxy reports to one replica. On Kubernetes the control plane's
    /// other running pods are found without it.
    #[arg(long, env = "WEFT_DASHBOARD_PEERS", value_delimiter = ',')]
    pub dashboard_peers: Vec<SocketAddr>,

    /// How long the dashboard waits for another replica's view, in
    /// milliseconds; a replica that does not answer is left out, and the
    /// overview names it.
    #[arg(long, env = "WEFT_DASHBOARD_PEER_TIMEOUT_MS", default_value_t = 2_000)]
    pub dashboard_peer_timeout_ms: u64,
}

impl ControlPlaneConfig {
    /// The bounds of the dashboard's traffic record.
    pub fn traffic_limits(&self) -> crate::reported_traffic::TrafficLimits {
        crate::reported_traffic::TrafficLimits {
            window: std::time::Duration::from_secs(self.dashboard_traffic_window_seconds),
            max_edges: self.dashboard_traffic_max_edges,
            max_edges_per_report: self.dashboard_traffic_max_edges_per_report,
        }
    }
}

/// Where the cluster comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A directory of YAML manifests (the embedded default).
    Manifests,
    /// The Kubernetes API server (`KUBECONFIG`, or in-cluster).
    Kubernetes,
}

/// One-off commands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Print weft's CustomResourceDefinitions as YAML (what `deploy/crds/`
    /// holds).
    Crds,
    /// Explain whether a connection would be allowed, and by which policy
    /// and rule, from the cluster as the source (`--manifests` or
    /// `--source kubernetes`) describes it. Exits 1 when it is denied.
    Explain(crate::explain::ExplainArgs),
    /// Tell every node proxy that the mesh is being uninstalled, so that
    /// each removes its capture when it stops (a stopping proxy otherwise
    /// leaves it, holding its meshed pods' traffic until the next proxy
    /// serves it), and wait until each has confirmed. Run it before
    /// deleting weft; the Helm chart does (a pre-delete hook). Needs
    /// `--source kubernetes` credentials in the control plane's namespace.
    Uninstall(crate::kubernetes::UninstallArgs),
    /// Check that weft can be installed (`--pre`: Kubernetes version, CRDs,
    /// your permissions, node kernels), or that the installed mesh is
    /// healthy: the control plane ready, a proxy on every node and each on
    /// its latest config, certificates valid, policies Accepted, and a test
    /// connection in a throwaway namespace mutual TLS and refused by a
    /// throwaway DENY. Prints ✓ or ✗ per check and exits 1 when one failed.
    Check(crate::check::CheckArgs),
    /// What the pods of `check`'s test connection run.
    #[command(hide = true)]
    CheckPeer(crate::check::peer::PeerArgs),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes a value the config dump shows by its name.
fn serialize_display<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}
