//! The bounds on what clients of the control plane's two ports can make it
//! hold: TLS handshakes and connections on 15012 (any process that reaches
//! the Service can open one; `grpc_connections` enforces them), and
//! connections and slow requests on 15014. Settings in
//! [`ListenerLimits`] (part of the typed config); refusals counted in
//! `weft_control_plane_rejected_total{listener,reason}`; an accept that
//! fails (out of file descriptors) backs off instead of spinning.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

/// Limits of the control plane's listeners.
#[derive(Clone, Debug, clap::Args, Serialize, PartialEq, Eq)]
pub struct ListenerLimits {
    /// TLS handshakes in progress at once on the gRPC port (15012). A
    /// proxy refused here retries with backoff.
    #[arg(long, env = "WEFT_MAX_HANDSHAKES", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,

    /// The same from one source address (a node's proxy needs one).
    #[arg(long, env = "WEFT_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_source: u32,

    /// Config streams one node holds at once (its proxy needs one; two
    /// during an upgrade, when the new process starts beside the old).
    #[arg(long, env = "WEFT_MAX_CONFIG_STREAMS_PER_NODE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_config_streams_per_node: u32,

    /// Established connections the gRPC port holds at once (a node's
    /// proxy needs one or a few; more during an upgrade).
    #[arg(long, env = "WEFT_MAX_GRPC_CONNECTIONS", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_grpc_connections: u32,

    /// Established connections on which no call has authenticated yet, in
    /// all: a connection gives its place back once a call on it carries a
    /// valid node token.
    #[arg(long, env = "WEFT_MAX_GRPC_UNAUTHENTICATED_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_grpc_unauthenticated_connections: u32,

    /// The same from one source address (nodes behind one SNAT address
    /// share it only while they connect).
    #[arg(long, env = "WEFT_MAX_GRPC_CONNECTIONS_PER_SOURCE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_grpc_connections_per_source: u32,

    /// How long an established gRPC connection may go without a call
    /// whose node token checks out, in milliseconds; then it is closed.
    #[arg(
        long,
        env = "WEFT_GRPC_AUTHENTICATE_WITHIN_MS",
        default_value_t = 10_000
    )]
    pub grpc_authenticate_within_ms: u64,

    /// How long a TLS handshake on the gRPC port may take, in
    /// milliseconds.
    #[arg(long, env = "WEFT_HANDSHAKE_TIMEOUT_MS", default_value_t = 5000)]
    pub handshake_timeout_ms: u64,

    /// How long a monitoring client (15014) may take to send a request's
    /// headers, or wait on a kept-alive connection, in milliseconds.
    #[arg(long, env = "WEFT_HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 5000)]
    pub http_header_read_timeout_ms: u64,

    /// Monitoring connections held at once; more are reset.
    #[arg(long, env = "WEFT_HTTP_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,

    /// Monitoring connections held at once from one source address.
    #[arg(long, env = "WEFT_HTTP_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections_per_source: u32,
}

impl ListenerLimits {
    /// How long a TLS handshake on the gRPC port may take.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// [`ListenerLimits::grpc_authenticate_within_ms`] as a duration.
    pub fn grpc_authenticate_within(&self) -> Duration {
        Duration::from_millis(self.grpc_authenticate_within_ms)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// `weft_control_plane_rejected_total{listener,reason}`.
#[derive(Clone, Debug, Default)]
pub struct Rejections {
    family: Family<RejectedLabels, Counter>,
}

impl Rejections {
    /// The family, registered in `registry`.
    pub fn new(registry: &mut Registry) -> Rejections {
        let rejections = Rejections::default();
        registry.register(
            "weft_control_plane_rejected",
            "Connections refused because a configured bound was reached",
            rejections.family.clone(),
        );
        rejections
    }

    /// Counts one refusal by `listener` (`grpc`, `monitoring`) for `reason`.
    pub fn count(&self, listener: &'static str, reason: &'static str) {
        self.family
            .get_or_create(&RejectedLabels { listener, reason })
            .inc();
    }
}

/// What a listener holds (handshakes in progress, open connections), in
/// all and per source address, within a cap for each.
#[derive(Debug)]
pub struct PerSource {
    max: u32,
    max_per_source: u32,
    /// The refusal reasons: over the cap in all, over the source's cap.
    reasons: (&'static str, &'static str),
    held: Mutex<(u32, HashMap<IpAddr, u32>)>,
}

/// One held; dropping it gives its place back.
pub struct Held {
    counts: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    /// TLS handshakes on the gRPC port.
    pub fn handshakes(limits: &ListenerLimits) -> Arc<PerSource> {
        PerSource::new(
            limits.max_handshakes,
            limits.max_handshakes_per_source,
            ("handshake_limit", "handshake_source_limit"),
        )
    }

    /// Established connections on the gRPC port (no cap per source).
    pub fn grpc_connections(limits: &ListenerLimits) -> Arc<PerSource> {
        PerSource::new(
            limits.max_grpc_connections,
            limits.max_grpc_connections,
            ("connection_limit", "connection_limit"),
        )
    }

    /// Established connections on the gRPC port that no call has
    /// authenticated yet.
    pub fn unauthenticated_grpc_connections(limits: &ListenerLimits) -> Arc<PerSource> {
        PerSource::new(
            limits.max_grpc_unauthenticated_connections,
            limits.max_grpc_connections_per_source,
            ("unauthenticated_limit", "source_limit"),
        )
    }

    /// Connections to the monitoring port.
    pub fn http_connections(limits: &ListenerLimits) -> Arc<PerSource> {
        PerSource::new(
            limits.http_max_connections,
            limits.http_max_connections_per_source,
            ("connection_limit", "source_limit"),
        )
    }

    fn new(max: u32, max_per_source: u32, reasons: (&'static str, &'static str)) -> Arc<Self> {
        Arc::new(PerSource {
            max,
            max_per_source,
            reasons,
            held: Mutex::default(),
        })
    }

    /// One more from `source`, or the reason it is refused.
    pub fn hold(self: &Arc<Self>, source: IpAddr) -> Result<Held, &'static str> {
        let mut guard = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, by_source) = &mut *guard;
        if *total >= self.max {
            return Err(self.reasons.0);
        }
        let from_source = by_source.entry(source).or_default();
        if *from_source >= self.max_per_source {
            return Err(self.reasons.1);
        }
        *from_source += 1;
        *total += 1;
        Ok(Held {
            counts: self.clone(),
            source,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut guard = self
            .counts
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, by_source) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(count) = by_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// The next connection on `listener`. A failed accept (out of file
/// descriptors, mostly) is logged and waited out, longer each time it
/// fails again (10 ms up to about 1 s): the loop never spins.
pub async fn accept(
    listener: &TcpListener,
    what: &'static str,
) -> (TcpStream, std::net::SocketAddr) {
    let mut failures = 0u32;
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(10 << failures.min(7));
                tracing::warn!(%error, listener = what, ?wait, "accepting a connection failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Makes closing `stream` a reset: the client learns at once.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    #[test]
    fn handshakes_are_held_to_their_caps_and_given_back() {
        let handshakes = PerSource::handshakes(&ListenerLimits {
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            max_config_streams_per_node: 4,
            max_grpc_connections: 8192,
            max_grpc_unauthenticated_connections: 1024,
            max_grpc_connections_per_source: 16,
            grpc_authenticate_within_ms: 10_000,
            handshake_timeout_ms: 5000,
            http_header_read_timeout_ms: 5000,
            http_max_connections: 64,
            http_max_connections_per_source: 8,
        });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let first = [handshakes.hold(a).unwrap(), handshakes.hold(a).unwrap()];
        assert_eq!(handshakes.hold(a).err(), Some("handshake_source_limit"));
        let _other = handshakes.hold(b).unwrap();
        assert_eq!(handshakes.hold(c).err(), Some("handshake_limit"));
        drop(first);
        assert!(handshakes.hold(a).is_ok());
        assert!(handshakes.hold(c).is_ok());
    }
}
