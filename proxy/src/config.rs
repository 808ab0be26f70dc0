//! The proxy's own settings, from flags and environment variables, in one
//! typed struct. It is logged at start-up and shown by the admin endpoint, so
//! what the proxy believes it was told is never a guess. It holds paths, not
//! secrets: the token is read from its file on every use.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;
use weft_certs::{Identity, KeyExchange};

use crate::limits::{ConnectionLimits, HttpLimits, MemoryLimits};

/// The control plane's identity unless configured otherwise.
pub const DEFAULT_CONTROL_PLANE_IDENTITY: &str =
    "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane";

/// How the proxy writes its logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the node proxy is configured with.
#[derive(Clone, Debug, clap::Parser, Serialize)]
#[command(name = "weft-proxy", version, about = "The weft node proxy")]
pub struct ProxyConfig {
    /// The Kubernetes node this proxy runs on.
    #[arg(long, env = "WEFT_NODE")]
    pub node: String,

    /// The control plane's gRPC address, host:port (TLS).
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE",
        default_value = "127.0.0.1:15012",
        value_parser = parse_host_port
    )]
    pub control_plane: String,

    /// File holding the node's token for the control plane; re-read on
    /// every connection, so it can be rotated in place.
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    pub token_file: PathBuf,

    /// PEM file with the mesh roots that authenticate the control plane
    /// before any config arrives; re-read on every connection.
    #[arg(long, env = "WEFT_ROOT_CERT")]
    pub root_cert: PathBuf,

    /// The SPIFFE identity the control plane must prove.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE_IDENTITY",
        default_value = DEFAULT_CONTROL_PLANE_IDENTITY,
        value_parser = parse_identity
    )]
    #[serde(serialize_with = "crate::node_view::display")]
    pub control_plane_identity: Identity,

    /// The cluster's name, sent in the `baggage` of every tunnel
    /// (`k8s.cluster.name`) for the destination's telemetry; Istio's
    /// default cluster name is `Kubernetes`. Empty: not sent.
    #[arg(long, env = "WEFT_CLUSTER_NAME", default_value = "Kubernetes")]
    pub cluster_name: String,

    /// The TLS key exchange of HBONE tunnels and of the control-plane
    /// connection: `post-quantum-preferred` (X25519MLKEM768 first, X25519
    /// allowed, for peers without ML-KEM) or `post-quantum-required`
    /// (X25519MLKEM768 only; a peer without it fails the handshake, as with
    /// ztunnel's `COMPLIANCE_POLICY=pqc`).
    #[arg(long, env = "WEFT_KEY_EXCHANGE", default_value_t = KeyExchange::default())]
    #[serde(serialize_with = "crate::node_view::display")]
    pub key_exchange: KeyExchange,

    /// Where the admin endpoint listens (config dump, certificates, health).
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// The admin socket: the one way to change the proxy (`POST /drain`,
    /// `POST /logging`), for a process in the proxy's own container running
    /// as its user (`weft-proxy admin ...` through `kubectl exec`). The TCP
    /// admin port only reads. Unset: nothing can change the proxy.
    #[arg(long, env = "WEFT_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,

    /// Whether to run the data plane (listeners for captured traffic). Off,
    /// the proxy only talks to the control plane and keeps certificates.
    #[arg(long, env = "WEFT_DATA_PLANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub data_plane: bool,

    /// Whether to capture meshed pods' traffic into the data plane
    /// (nftables and policy routing inside each pod's network namespace,
    /// see `capture`; needs CAP_NET_ADMIN, CAP_SYS_ADMIN and, to find
    /// running pods, CAP_SYS_PTRACE). Off, the data plane serves nothing.
    #[arg(long, env = "WEFT_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub capture: bool,

    /// The Unix socket on which weft's CNI plugin announces new and
    /// deleted pods and their network namespaces. Unset: no
    /// announcements are taken.
    #[arg(long, env = "WEFT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// Where the container runtime looks for CNI plugin binaries (e.g.
    /// `/opt/cni/bin`, mounted into the proxy's container). With
    /// `--cni-conf-dir`, the proxy installs weft's CNI plugin there and
    /// chains it onto the node's network configuration (and takes both
    /// away when the mesh is uninstalled). Unset: the plugin is not
    /// installed, and new pods are found by search only.
    #[arg(long, env = "WEFT_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,

    /// Where the container runtime reads the node's network configuration
    /// (e.g. `/etc/cni/net.d`, mounted into the proxy's container).
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,

    /// The `weft-cni` binary to install. Unset: the one beside this
    /// program.
    #[arg(long, env = "WEFT_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,

    /// The proxy's CNI socket as the runtime sees it on the node (written
    /// into the plugin's configuration).
    #[arg(long, env = "WEFT_CNI_NODE_SOCKET", default_value = crate::cni_plugin::DEFAULT_SOCKET)]
    pub cni_node_socket: PathBuf,

    /// The proxy's state directory as the runtime sees it on the node
    /// (written into the plugin's configuration: the plugin reads the
    /// meshed namespaces there when the proxy is down).
    #[arg(long, env = "WEFT_CNI_NODE_STATE_DIR", default_value = crate::cni_plugin::DEFAULT_STATE_DIR)]
    pub cni_node_state_dir: PathBuf,

    /// Namespaces whose pods the plugin leaves alone (comma-separated):
    /// weft's own must be among them, or its pods could wait for a proxy
    /// that needs them.
    #[arg(
        long,
        env = "WEFT_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub cni_exclude_namespaces: Vec<String>,

    /// How often the proxy checks that its plugin is still chained into
    /// the node's network configuration (a network plugin may rewrite it),
    /// in seconds.
    #[arg(long, env = "WEFT_CNI_RECHECK_SECONDS", default_value_t = 30)]
    pub cni_recheck_seconds: u64,

    /// Search the node's network namespaces (those mounted in
    /// `--netns-dir` and every process's) for meshed pods nobody announced,
    /// such as pods running before weft was installed. Off where pod
    /// addresses are not unique among the node's namespaces (the testbed
    /// runs several clusters side by side).
    #[arg(long, env = "WEFT_FIND_RUNNING_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub find_running_pods: bool,

    /// Where mounted network namespaces are searched for running pods.
    #[arg(long, env = "WEFT_NETNS_DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,

    /// How often a meshed pod that could not be served yet (its namespace
    /// unknown, its rules not installed) is tried again, in milliseconds.
    #[arg(long, env = "WEFT_POD_RETRY_MS", default_value_t = 1000)]
    pub pod_retry_ms: u64,

    /// Prometheus metrics (`/metrics`). Loopback unless configured: the
    /// DaemonSet sets the node's address, where Prometheus scrapes, and
    /// nothing else on the node's interfaces (a pod's network) reaches it.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "127.0.0.1:15020",
          value_parser = parse_listen_addr)]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`, and `/uninstall`, which the uninstall
    /// Job asks). Loopback unless configured: the DaemonSet sets the node's
    /// address, where the uninstall Job reaches it.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "127.0.0.1:15021",
          value_parser = parse_listen_addr)]
    pub readiness_addr: SocketAddr,

    /// How long open connections may run on after a new proxy process took
    /// over this one's sockets (an upgrade), in seconds. Generous: a
    /// long-lived connection (a database session, a stream) runs to its end
    /// through an upgrade, while the new process serves everything new.
    /// The DaemonSet's `terminationGracePeriodSeconds` must be a little
    /// longer.
    #[arg(long, env = "WEFT_DRAIN_SECONDS", default_value_t = 3600)]
    pub drain_seconds: u64,

    /// The same when the proxy stops with no successor (SIGTERM, `POST
    /// /drain`, an uninstall), in seconds: short, because meanwhile the
    /// node's new meshed connections are refused.
    #[arg(long, env = "WEFT_STOP_DRAIN_SECONDS", default_value_t = 10)]
    pub stop_drain_seconds: u64,

    /// How long a starting proxy waits for the running one to hand over its
    /// sockets (see `handover`), and later for it to confirm that it stopped
    /// accepting, in milliseconds; also how long a running proxy waits for
    /// a new one to say what it wants. A hand-over that takes longer fails:
    /// the running proxy serves on, the new one starts fresh.
    #[arg(long, env = "WEFT_HANDOVER_TIMEOUT_MS", default_value_t = 10_000)]
    pub handover_timeout_ms: u64,

    /// The UID of this proxy's own pod (the DaemonSet passes it from the
    /// downward API). A proxy never hands its sockets back to the pod it
    /// took them over from: that pod's container, restarted after a crash,
    /// would take them from the newer one. Empty: not on Kubernetes.
    #[arg(long, env = "WEFT_POD_UID", default_value = "")]
    pub pod_uid: String,

    /// How long a captured connection may wait for what it needs to go
    /// meshed, in milliseconds: the source pod's certificate (outbound) or
    /// the addressed pod's config and certificate (inbound), which a pod's
    /// first connections (an init container's) can arrive ahead of. It then
    /// proceeds meshed, or is closed; it never goes out in plaintext.
    #[arg(long, env = "WEFT_PENDING_CONNECTION_WAIT_MS", default_value_t = 5000)]
    pub pending_connection_wait_ms: u64,

    /// Where the proxy keeps its last good state on the node: the applied
    /// config and the workload certificates with their keys (see
    /// `node_state.rs`). A proxy that restarts serves and enforces it until
    /// the control plane sends a newer one, so a restart while the control
    /// plane is unreachable loses no policy. Created private to the
    /// proxy's user. Unset: nothing is kept.
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// The least time between two writes of the stored config, in
    /// milliseconds: a node's full state can be megabytes, and a busy
    /// cluster changes it many times a second. A change is written at once
    /// unless the last write was less than this long ago; a crash within
    /// this time of a change may restart without it (the control plane
    /// sends it again once reachable).
    #[arg(long, env = "WEFT_STATE_WRITE_INTERVAL_MS", default_value_t = 200)]
    pub state_write_interval_ms: u64,

    /// Threads that carry traffic. With 1 (the default) the data plane runs
    /// on one single-threaded runtime: a connection's tasks (its copy loop
    /// and its HTTP/2 connection) never wake each other across threads, and
    /// the proxy stays small. Raise it on nodes whose pods push more than
    /// one core of traffic. Control work has a thread of its own either way.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,

    /// How many task turns the data-plane runtime takes between looks at
    /// which sockets became ready (tokio's `event_interval`, 61 by
    /// default there). While a bulk transfer keeps tasks runnable, a
    /// connection that becomes ready is noticed only at the next look: at
    /// 61 a neighbour's request waited ~8 ms behind a same-node bulk
    /// upload, at 2 ~2 ms (bench/RESULTS.md, noisy neighbour).
    #[arg(long, env = "WEFT_EVENT_INTERVAL", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub event_interval: u32,

    /// A connection task (a copy loop, an HBONE connection) that keeps
    /// the data-plane thread busy (by the thread's CPU clock) for more than
    /// this share of a `--bulk-lane-window-ms` window moves to the bulk
    /// lane, a thread of its own, so that a bulk transfer does not delay
    /// the requests of the node's other pods; it comes back once it has
    /// been busy less than a tenth of that for a second (or ten windows).
    /// 0 keeps every task on the data-plane thread.
    #[arg(long, env = "WEFT_BULK_LANE_PERCENT", default_value_t = 20,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub bulk_lane_percent: u8,

    /// The window of `--bulk-lane-percent`, in milliseconds.
    #[arg(long, env = "WEFT_BULK_LANE_WINDOW_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub bulk_lane_window_ms: u64,

    /// Bounds on the connections and handshakes pods and peers can make
    /// the data plane hold (see `limits`).
    #[command(flatten)]
    pub limits: ConnectionLimits,

    /// Bounds on the proxy's own HTTP endpoints (admin, metrics,
    /// readiness).
    #[command(flatten)]
    pub http_limits: HttpLimits,

    /// Bounds on the memory peers and pods can make the data plane hold
    /// (HBONE windows, held copy buffers).
    #[command(flatten)]
    pub memory_limits: MemoryLimits,

    /// Warnings of one cause that a pod or peer can trigger (a refused
    /// connection, a failed handshake) logged per
    /// `--log-warnings-interval-ms`; the rest are counted, and the next one
    /// logged says how many were left out.
    #[arg(long, env = "WEFT_LOG_WARNINGS_PER_CAUSE", default_value_t = 10)]
    pub log_warnings_per_cause: u32,

    /// The interval of `--log-warnings-per-cause`, in milliseconds.
    #[arg(long, env = "WEFT_LOG_WARNINGS_INTERVAL_MS", default_value_t = 10_000)]
    pub log_warnings_interval_ms: u64,

    /// Log lines waiting for the writer at most. Lines are written by a
    /// thread of their own, so a slow sink never stalls traffic; beyond
    /// this, new lines are dropped (and counted in
    /// `weft_proxy_log_lines_dropped_total`).
    #[arg(long, env = "WEFT_LOG_BUFFER_LINES", default_value_t = 16_384,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub log_buffer_lines: usize,

    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,weft_proxy=debug`).
    #[arg(long, env = "WEFT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// The largest config update the proxy accepts from the control plane,
    /// in bytes, whether it comes whole or in parts (the control plane
    /// sends parts of about 64 KiB, so the stream's read buffer stays that
    /// size; the whole is held while it is put together). A node's full
    /// state grows with the cluster (about 170 to 280 bytes per pod and
    /// per Service endpoint): 128 MiB holds well over 450,000 of them.
    #[arg(long, env = "WEFT_MAX_CONFIG_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_CONFIG_MESSAGE_BYTES)]
    pub max_config_message_bytes: usize,

    /// How often the proxy reports who talked to whom (connections, bytes,
    /// refusals by policy) and the certificates it holds up its config
    /// stream, for the control plane's dashboard, in seconds. 0: never.
    #[arg(
        long,
        env = "WEFT_TRAFFIC_REPORT_INTERVAL_SECONDS",
        default_value_t = 10
    )]
    pub traffic_report_interval_seconds: u64,

    /// How long after the node's certificates change it reports them,
    /// without waiting for the report interval, in milliseconds: the
    /// certificates of pods starting together go in one report.
    #[arg(long, env = "WEFT_CERTIFICATE_REPORT_SETTLE_MS", default_value_t = 500)]
    pub certificate_report_settle_ms: u64,

    /// Pairs of workloads a traffic report holds at most; connections
    /// between further pairs are counted, not named, until the next report.
    #[arg(long, env = "WEFT_TRAFFIC_REPORT_MAX_EDGES", default_value_t = 2_000)]
    pub traffic_report_max_edges: usize,
}

/// The default of [`ProxyConfig::max_config_message_bytes`], the same as the
/// control plane's.
pub const DEFAULT_MAX_CONFIG_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Every field, as the JSON the admin endpoint's config dump shows (one
/// source for both, so neither can leave a field out).
impl fmt::Display for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&json)
    }
}

/// `ip:port`, `[v6]:port`, or `v6:port` as a template makes it from a
/// bare address (the DaemonSet's `$(WEFT_HOST_IP):15020` on an IPv6 node).
fn parse_listen_addr(input: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = input.parse() {
        return Ok(addr);
    }
    let (ip, port) = input
        .rsplit_once(':')
        .ok_or_else(|| format!("{input:?}: expected ip:port"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|e| format!("{input:?}: {ip:?} is not an IP address: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{input:?}: {port:?} is not a port: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_identity(input: &str) -> Result<Identity, String> {
    Identity::parse(input).map_err(|e| e.to_string())
}

/// Accepts `host:port` and `[v6]:port`; the host is resolved when connecting.
fn parse_host_port(input: &str) -> Result<String, String> {
    split_host_port(input).map(|_| input.to_owned())
}

/// Splits `host:port` (or `[v6]:port`) into its host, without brackets, and
/// port.
pub(crate) fn split_host_port(input: &str) -> Result<(&str, u16), String> {
    let (host, port) = input
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("port {port:?} is not a number from 1 to 65535: {e}"))?;
    if port == 0 {
        return Err("port 0 cannot be dialled".into());
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains(':') && !input.starts_with('[') {
        return Err("an IPv6 address must be written in brackets, [addr]:port".into());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_apply_and_required_flags_are_required() {
        let config = ProxyConfig::try_parse_from([
            "weft-proxy",
            "--node",
            "node-1",
            "--token-file",
            "/run/token",
            "--root-cert",
            "/run/roots.pem",
        ])
        .unwrap();
        assert_eq!(config.control_plane, "127.0.0.1:15012");
        assert_eq!(
            config.control_plane_identity.as_str(),
            DEFAULT_CONTROL_PLANE_IDENTITY
        );
        assert_eq!(config.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, "info");
        let printed = config.to_string();
        assert!(printed.contains(r#""node":"node-1""#), "{printed}");
        assert!(printed.contains(r#""pod_retry_ms":1000"#), "{printed}");

        let missing = ProxyConfig::try_parse_from(["weft-proxy", "--token-file", "/t"]);
        assert!(missing.is_err());
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let parse = |flag: &str, value: &str| {
            ProxyConfig::try_parse_from([
                "weft-proxy",
                "--node=n",
                "--token-file=/t",
                "--root-cert=/r",
                flag,
                value,
            ])
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let err = parse("--control-plane-identity", "spiffe://cluster.local/x").unwrap_err();
        assert!(err.contains("path must be /ns/"), "{err}");
        assert!(parse("--control-plane", "cp.weft-system.svc:15012").is_ok());
        assert!(parse("--control-plane", "[::1]:15012").is_ok());
        assert!(parse("--control-plane", "cp:http").is_err());
        assert!(parse("--control-plane", "::1:15012").is_err());
        assert!(parse("--log-format", "xml").is_err());
        // The DaemonSet's $(WEFT_HOST_IP):15020, on an IPv6 node too.
        assert!(parse("--metrics-addr", "10.0.0.7:15020").is_ok());
        assert!(parse("--metrics-addr", "fd00::7:15020").is_ok());
        assert!(parse("--metrics-addr", "[fd00::7]:15020").is_ok());
        assert!(parse("--metrics-addr", "node-1:15020").is_err());
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("a.b:1").unwrap(), ("a.b", 1));
        assert_eq!(
            split_host_port("[fd00::1]:15012").unwrap(),
            ("fd00::1", 15012)
        );
        assert!(split_host_port(":15012").is_err());
        assert!(split_host_port("host:0").is_err());
    }
}

/// `weft-proxy probe-ready`: the DaemonSet's readiness probe, run in the
/// proxy's container. Exits 0 if the proxy answering on the node's
/// readiness port runs in this pod and is ready, else 1. (An HTTP probe of
/// the port would be answered by the previous proxy during an upgrade,
/// before the new one has taken over.) Reads the container's environment,
/// so the probe needs no arguments.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "weft-proxy probe-ready")]
pub struct ReadinessProbeConfig {
    /// The node's readiness port, as the proxy serves it.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "127.0.0.1:15021",
          value_parser = parse_listen_addr)]
    pub readiness_addr: SocketAddr,

    /// The UID of the pod the probe runs in.
    #[arg(long, env = "WEFT_POD_UID", default_value = "")]
    pub pod_uid: String,

    /// How long to wait for each of connecting, sending and reading the
    /// answer, in milliseconds.
    #[arg(long, env = "WEFT_PROBE_TIMEOUT_MS", default_value_t = 1000)]
    pub timeout_ms: u64,
}

/// `weft-proxy admin`: asks the proxy of this container for a change, on
/// its admin socket (run it with `kubectl exec` in the proxy's container;
/// the proxy takes changes from nowhere else).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "weft-proxy admin")]
pub struct AdminCommand {
    /// The proxy's admin socket.
    #[arg(
        long,
        env = "WEFT_ADMIN_SOCKET",
        default_value = "/var/run/weft-admin/admin.sock"
    )]
    pub admin_socket: PathBuf,

    /// What to ask for.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// A change `weft-proxy admin` asks for.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum AdminAction {
    /// Drain and exit, as on SIGTERM (`POST /drain`).
    Drain,
    /// Replace the log filter (`POST /logging?level=<filter>`), e.g.
    /// `info,weft_proxy::dataplane=debug`.
    Logging {
        /// The filter, in tracing's EnvFilter syntax.
        filter: String,
    },
}

impl AdminAction {
    /// The request's path and query.
    pub fn path(&self) -> String {
        match self {
            AdminAction::Drain => "/drain".into(),
            AdminAction::Logging { filter } => format!(
                "/logging?{}",
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("level", filter)
                    .finish()
            ),
        }
    }
}
