//! The bounds on what pods and peers can make the proxy hold: connections,
//! TLS handshakes and the time they may take, and memory. Part of [`crate::ProxyConfig`]
//! (flags and environment variables), so they show in the config dump and
//! an operator can change them without a rebuild. The data plane's
//! `admission` module enforces them; this module only says what they are.
//!
//! The defaults are sized for a node of a few hundred pods: no legitimate
//! pod comes near them, and together they keep the proxy's file
//! descriptors (two per proxied connection) within the node-wide cap.

use serde::Serialize;

/// Connection and handshake limits of the data plane's listeners.
#[derive(Clone, Debug, clap::Args, Serialize, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections the node's pod listeners (15001, 15006, 15008) hold at
    /// once, all pods together. Each proxied connection takes two file
    /// descriptors; the proxy raises its own descriptor limit to fit.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Connections one local pod holds at once in each direction: those
    /// it opens (15001), and those arriving for it (15006, and each HBONE
    /// stream on 15008). A flood into a pod does not stop it calling out.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_POD", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: u32,

    /// Inbound connections (15006, 15008) one source address holds at
    /// once, across the node's pods.
    #[arg(long, env = "WEFT_MAX_INBOUND_CONNECTIONS_PER_SOURCE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inbound_connections_per_source: u32,

    /// The share of `max_connections` above which the node counts as
    /// saturated, in percent: from there on, a pod holding more than its
    /// fair share (the cap divided among the pods holding connections) is
    /// refused, so the connections left go to the pods holding few.
    #[arg(long, env = "WEFT_FAIR_SHARE_ABOVE_PERCENT", default_value_t = 75,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub fair_share_above_percent: u8,

    /// HBONE TLS handshakes (15008) in progress at once on the node.
    #[arg(long, env = "WEFT_MAX_HANDSHAKES", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,

    /// HBONE TLS handshakes in progress at once from one source address: a
    /// pod holding silent connections to 15008 uses up its own share, not
    /// the node's.
    #[arg(long, env = "WEFT_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_source: u32,

    /// How long a new HBONE connection may stay silent before its TLS
    /// ClientHello starts, in milliseconds. A peer proxy sends it at once.
    #[arg(long, env = "WEFT_HANDSHAKE_START_TIMEOUT_MS", default_value_t = 1000)]
    pub handshake_start_timeout_ms: u64,

    /// How long an HBONE connection's TLS handshake may take in all, in
    /// milliseconds.
    #[arg(long, env = "WEFT_HANDSHAKE_TIMEOUT_MS", default_value_t = 5000)]
    pub handshake_timeout_ms: u64,

    /// HBONE connections (15008) one authenticated peer identity holds at
    /// once on the node. A peer node pools one connection per source
    /// identity, destination identity and destination pod, so this is
    /// reached only by a workload that opens connections of its own.
    #[arg(long, env = "WEFT_MAX_HBONE_CONNECTIONS_PER_PEER", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_hbone_connections_per_peer: u32,

    /// How often an HBONE connection (served or dialed) is pinged, in
    /// seconds.
    #[arg(long, env = "WEFT_HBONE_PING_INTERVAL_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_ping_interval_seconds: u64,

    /// How long a ping may go unanswered before the connection is given
    /// up, in seconds.
    #[arg(long, env = "WEFT_HBONE_PING_TIMEOUT_SECONDS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_ping_timeout_seconds: u64,

    /// How long an HBONE connection (dialed or served) may carry no stream
    /// before it is closed, in seconds.
    #[arg(long, env = "WEFT_HBONE_IDLE_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_idle_timeout_seconds: u64,

    /// How long dialing an HBONE connection may take, with its TLS and
    /// HTTP/2 handshakes, in milliseconds.
    #[arg(long, env = "WEFT_HBONE_CONNECT_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_connect_timeout_ms: u64,
}

impl ConnectionLimits {
    /// How HBONE connections, served and dialed, notice a peer that
    /// stopped answering.
    pub fn hbone_keepalive(&self) -> crate::hbone::Keepalive {
        crate::hbone::Keepalive {
            interval: std::time::Duration::from_secs(self.hbone_ping_interval_seconds),
            timeout: std::time::Duration::from_secs(self.hbone_ping_timeout_seconds),
        }
    }

    /// The number of connections from which the node counts as saturated.
    pub fn saturated_at(&self) -> u32 {
        let share = u64::from(self.max_connections) * u64::from(self.fair_share_above_percent);
        u32::try_from(share / 100).unwrap_or(self.max_connections)
    }

    /// [`ConnectionLimits::handshake_start_timeout_ms`] as a duration.
    pub fn handshake_start_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_start_timeout_ms)
    }

    /// [`ConnectionLimits::handshake_timeout_ms`] as a duration.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The file descriptors these limits may need at most: two per
    /// connection, and room for the proxy's own (listeners, control, logs).
    pub fn file_descriptors_needed(&self) -> u64 {
        2 * u64::from(self.max_connections) + 4096
    }
}

impl Default for ConnectionLimits {
    /// The flags' defaults.
    fn default() -> ConnectionLimits {
        flag_defaults()
    }
}

/// A flattened group's flag defaults, whatever the environment says (a
/// test's `WEFT_*` variables are for the proxies it starts, not for it).
fn flag_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    command
        .try_get_matches_from(["defaults"])
        .ok()
        .and_then(|matches| T::from_arg_matches(&matches).ok())
        .unwrap_or_else(|| unreachable!("every limit has a default"))
}

/// Limits of the proxy's own HTTP endpoints (admin, metrics, readiness),
/// each endpoint on its own: a slow or greedy client of one cannot take
/// the proxy's file descriptors or another endpoint's connections.
#[derive(Clone, Debug, clap::Args, Serialize, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers, and how
    /// long a kept-alive connection may wait for its next request, in
    /// milliseconds (a slowloris client is closed after this).
    #[arg(long, env = "WEFT_HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 5000)]
    pub http_header_read_timeout_ms: u64,

    /// Connections each endpoint holds at once; more are reset.
    #[arg(long, env = "WEFT_HTTP_MAX_CONNECTIONS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,

    /// Connections each endpoint holds at once from one source address:
    /// a pod that reaches the node's metrics port cannot take the slots
    /// Prometheus needs.
    #[arg(long, env = "WEFT_HTTP_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections_per_source: u32,

    /// How long a kept-alive connection lives, in seconds: then it is
    /// closed after the request under way, and the client reconnects.
    #[arg(
        long,
        env = "WEFT_HTTP_MAX_CONNECTION_AGE_SECONDS",
        default_value_t = 300
    )]
    pub http_max_connection_age_seconds: u64,
}

impl Default for HttpLimits {
    /// The flags' defaults.
    fn default() -> HttpLimits {
        flag_defaults()
    }
}

impl HttpLimits {
    /// [`HttpLimits::http_header_read_timeout_ms`] as a duration.
    pub fn header_read_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.http_header_read_timeout_ms)
    }

    /// [`HttpLimits::http_max_connection_age_seconds`] as a duration.
    pub fn max_connection_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.http_max_connection_age_seconds)
    }
}

/// What peers and pods can make the proxy hold in memory: HBONE receive
/// windows and the buffers of connections whose other side pushes back.
/// Full-size windows and buffers come out of a budget; past it,
/// connections keep working with small ones (or, for HBONE, are refused
/// once not even a small window fits), so the memory stays bounded.
#[derive(Clone, Debug, clap::Args, Serialize, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Each HBONE `CONNECT` stream's receive window, in KiB.
    #[arg(long, env = "WEFT_HBONE_STREAM_WINDOW_KIB", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub hbone_stream_window_kib: u32,

    /// An HBONE connection's receive window while half the window budget
    /// has room for it, in KiB.
    #[arg(long, env = "WEFT_HBONE_CONNECTION_WINDOW_KIB", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub hbone_connection_window_kib: u32,

    /// An HBONE connection's receive window once half the budget is taken,
    /// in KiB (from the other half).
    #[arg(long, env = "WEFT_HBONE_MIN_CONNECTION_WINDOW_KIB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub hbone_min_connection_window_kib: u32,

    /// What one HBONE stream may queue for sending beyond what the peer
    /// has read, in KiB (a peer that stops reading holds this much per
    /// stream).
    #[arg(long, env = "WEFT_HBONE_SEND_BUFFER_KIB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(16..=65_536))]
    pub hbone_send_buffer_kib: u32,

    /// `CONNECT` streams one served HBONE connection carries at once (and
    /// a dialed one, unless the peer allows fewer).
    #[arg(long, env = "WEFT_HBONE_MAX_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub hbone_max_streams_per_connection: u32,

    /// The receive windows of all HBONE connections together, in MiB: the
    /// most that peers can make the proxy hold by sending data the
    /// tunnels' targets do not read. Half is for served connections, half
    /// for dialed ones. Sized, with the held-buffer budget, to fit the
    /// DaemonSet's memory limit (512 MiB).
    #[arg(long, env = "WEFT_HBONE_WINDOW_BUDGET_MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_window_budget_mib: u64,

    /// The full-size (256 KiB) buffers of connections whose other side
    /// pushes back, all together, in MiB. Past it, such a connection reads
    /// 16 KiB at a time, so each direction of each connection holds at
    /// most that much more.
    #[arg(long, env = "WEFT_HELD_BUFFER_BUDGET_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub held_buffer_budget_mib: u64,
}

impl Default for MemoryLimits {
    /// The flags' defaults.
    fn default() -> MemoryLimits {
        flag_defaults()
    }
}

impl MemoryLimits {
    /// The HBONE windows these limits give: for served connections and
    /// for dialed ones, each with half the budget, so that peers opening
    /// connections to the node's pods cannot leave its pods without
    /// windows to call out with.
    pub fn hbone_windows(&self) -> (crate::hbone::Windows, crate::hbone::Windows) {
        let windows = || {
            crate::hbone::Windows::new(
                self.hbone_stream_window_kib.saturating_mul(1024),
                self.hbone_connection_window_kib.saturating_mul(1024),
                self.hbone_min_connection_window_kib.saturating_mul(1024),
                self.hbone_max_streams_per_connection,
                self.hbone_window_budget_mib.saturating_mul(1024 * 1024) / 2,
            )
            .with_send_buffer(self.hbone_send_buffer_kib.saturating_mul(1024))
        };
        (windows(), windows())
    }

    /// [`MemoryLimits::held_buffer_budget_mib`] in bytes.
    pub fn held_buffer_budget(&self) -> u64 {
        self.held_buffer_budget_mib.saturating_mul(1024 * 1024)
    }

    /// The most that peers and pods can make the proxy hold in buffers,
    /// in bytes, with `connections` open at most: the window and
    /// held-buffer budgets, and per connection a small buffer each way
    /// past the held budget plus, were each one an HBONE stream whose peer
    /// stops reading, its send buffer.
    pub fn worst_case_bytes(&self, connections: &ConnectionLimits) -> u64 {
        let per_connection = 2 * crate::copy::SMALL_READ as u64
            + u64::from(self.hbone_send_buffer_kib).saturating_mul(1024);
        self.hbone_window_budget_mib
            .saturating_mul(1024 * 1024)
            .saturating_add(self.held_buffer_budget())
            .saturating_add(per_connection.saturating_mul(u64::from(connections.max_connections)))
    }

    /// The `--max-connections` whose worst case fits in `memory_limit`
    /// bytes with room for the proxy's own use (`reserved`); `None` if
    /// not even one connection fits beside the budgets.
    pub fn connections_fitting(&self, memory_limit: u64, reserved: u64) -> Option<u32> {
        let budgets = self
            .hbone_window_budget_mib
            .saturating_mul(1024 * 1024)
            .saturating_add(self.held_buffer_budget())
            .saturating_add(reserved);
        let per_connection = 2 * crate::copy::SMALL_READ as u64
            + u64::from(self.hbone_send_buffer_kib).saturating_mul(1024);
        let fitting = memory_limit.checked_sub(budgets)? / per_connection;
        (fitting > 0).then(|| u32::try_from(fitting).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_case_is_the_budgets_and_what_each_connection_may_hold() {
        let (memory, connections) = (MemoryLimits::default(), ConnectionLimits::default());
        let mib = 1024 * 1024;
        // 256 MiB of windows, 64 MiB of held buffers, 16,384 connections
        // of 32 KiB small buffers and a 256 KiB send buffer each.
        assert_eq!(
            memory.worst_case_bytes(&connections),
            (256 + 64) * mib + 16_384 * 288 * 1024
        );
        // In the DaemonSet's 512 MiB, with 64 MiB for the proxy itself:
        // (512 - 64 - 320) MiB / 288 KiB.
        assert_eq!(memory.connections_fitting(512 * mib, 64 * mib), Some(455));
        let fitting = ConnectionLimits {
            max_connections: 455,
            ..connections
        };
        assert!(memory.worst_case_bytes(&fitting) + 64 * mib <= 512 * mib);
        assert_eq!(memory.connections_fitting(256 * mib, 64 * mib), None);
    }
}
