//! The simulated nodes: one config stream per node from this process, each
//! over its own TLS connection from its own loopback address (the control
//! plane bounds connections and handshakes per source address, as it should
//! for real nodes). A node says Hello, ACKs every version, PINGs and
//! reconnects like a proxy, and keeps only what the measurement needs: when
//! each update arrived and how big it was, its first full state, and for the
//! few pods the scenario changes (the *tracked* pods) the latest IP it heard
//! and since when. The stream itself ([`super::grpc`]) reads each message
//! without decoding it ([`super::light`]) and frees it once read, so that a
//! thousand nodes of a 50,000-pod cluster cost this process little memory
//! and CPU beside the control plane it measures.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use super::cluster::{Cluster, token};
use super::grpc::ConfigStream;
use super::light::{Carried, LightUpdate, TrackedPods};

/// The node whose updates are kept whole, to be applied afterwards as its
/// proxy would ([`super::proxy_side`]).
pub const PROXY_NODE: u32 = 1;

/// The largest config update a simulated node accepts: far above any full
/// state the scenario makes (the control plane has its own limit).
const MAX_UPDATE_BYTES: usize = 1 << 30;
/// How long connecting, the TLS handshake and opening the stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 PINGs as the node proxy sends them (`proxy/src/transport.rs`):
/// a control plane that answers none for this long loses the stream, and
/// the node reconnects and asks for a full state again, as a proxy would.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts of one node.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The control plane's identity, which its certificate must prove.
const CONTROL_PLANE_IDENTITY: &str = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane";

/// A node's first full state.
#[derive(Clone, Copy, Debug)]
pub struct FullState {
    /// When it arrived.
    pub at: Instant,
    /// Its size on the wire.
    pub bytes: usize,
    /// Workloads it carried, local and remote.
    pub workloads: usize,
}

/// One update's arrival (a full state after a reconnect included).
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// When.
    pub at: Instant,
    /// Its size on the wire.
    pub bytes: u32,
}

/// What a node last heard of one tracked pod.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// The pod's first IPv4 address in the latest update that carried it.
    pub ip: Option<Ipv4Addr>,
    /// When that address first arrived.
    pub since: Instant,
    /// When an update last carried the pod (any change of it).
    pub last: Instant,
}

/// Everything one node recorded.
#[derive(Debug, Default)]
pub struct NodeRecord {
    /// The first full state.
    pub first_full_state: Option<FullState>,
    /// Every update, full states included, in order.
    pub arrivals: Vec<Arrival>,
    /// By tracked pod (see [`Streams::tracked`]).
    pub seen: Vec<Option<Seen>>,
    /// Streams opened (more than one: the stream broke and was reopened).
    pub opened: u32,
    /// Node [`PROXY_NODE`] only: every update's bytes, in order, for the
    /// proxy's side of the measurement ([`super::proxy_side`]).
    pub messages: Vec<Vec<u8>>,
    /// Sends messages up the node's current stream (traffic reports).
    pub sender: Option<super::grpc::MessageSender>,
}

/// The simulated nodes' shared state.
pub struct Streams {
    server: SocketAddr,
    tls: TlsConnector,
    /// The tracked pods' uids and their slot in [`NodeRecord::seen`].
    tracked: TrackedPods,
    /// Node `n`'s record at index `n - 1`.
    records: Vec<Mutex<NodeRecord>>,
    /// Streams being opened; a node holds its permit until its first full
    /// state arrived (or the attempt failed).
    opening: Semaphore,
    /// Failed attempts and broken streams, by reason.
    failures: Mutex<BTreeMap<String, u32>>,
}

/// Locks `mutex`, also after a panic elsewhere (a record stays readable).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Streams {
    /// Streams for `nodes` nodes to the control plane at `server`, whose
    /// roots are `roots_pem`, opening at most `concurrency` at once and
    /// tracking the pods `tracked` (uids).
    pub fn new(
        server: SocketAddr,
        roots_pem: &str,
        nodes: u32,
        concurrency: usize,
        tracked: &[String],
    ) -> Result<Arc<Streams>> {
        let trust = weft_certs::TrustBundle::from_pem(roots_pem)
            .context("reading the control plane's roots")?;
        let expected: weft_certs::Identity = CONTROL_PLANE_IDENTITY
            .parse()
            .context("parsing the control plane's identity")?;
        let config = weft_certs::control_plane_client_config(
            &trust,
            &expected,
            weft_certs::KeyExchange::default(),
        )
        .context("building the TLS client config")?;
        let tracked = TrackedPods::new(tracked);
        let slots = tracked.len();
        Ok(Arc::new(Streams {
            server,
            tls: TlsConnector::from(config),
            tracked,
            records: (0..nodes)
                .map(|_| {
                    Mutex::new(NodeRecord {
                        seen: vec![None; slots],
                        ..NodeRecord::default()
                    })
                })
                .collect(),
            opening: Semaphore::new(concurrency.max(1)),
            failures: Mutex::default(),
        }))
    }

    /// Node `node`'s record (1-based).
    pub fn record(&self, node: u32) -> MutexGuard<'_, NodeRecord> {
        lock(&self.records[node as usize - 1])
    }

    /// The slot of a tracked pod.
    pub fn slot(&self, uid: &str) -> Option<usize> {
        self.tracked.slot(uid)
    }

    /// Failed attempts and broken streams so far, by reason.
    pub fn failures(&self) -> BTreeMap<String, u32> {
        lock(&self.failures).clone()
    }

    /// Follows node `node`'s stream for ever: opens it, reads it, and opens
    /// it again with backoff when it fails (as a proxy would).
    pub async fn follow(self: Arc<Self>, node: u32) {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let opened = self.record(node).opened;
            let result = self.stream_once(node).await;
            if self.record(node).opened > opened {
                backoff = FIRST_BACKOFF; // it was up: start over, as a proxy would
            }
            let reason = match result {
                Ok(()) => "the control plane ended the stream".to_owned(),
                Err(error) => format!("{error:#}"),
            };
            *lock(&self.failures).entry(shorten(&reason)).or_default() += 1;
            // Jitter, so that nodes refused together do not retry together.
            let jitter = Duration::from_millis(super::cluster::mix(u64::from(node)) % 100);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One stream, until it ends.
    async fn stream_once(&self, node: u32) -> Result<()> {
        let permit = self
            .opening
            .acquire()
            .await
            .context("the opening semaphore is closed")?;
        let name = Cluster::node_name(node);
        let mut stream = tokio::time::timeout(OPEN_TIMEOUT, self.open(node, &name))
            .await
            .with_context(|| format!("opening the stream took over {OPEN_TIMEOUT:?}"))??;
        {
            let mut record = self.record(node);
            record.opened += 1;
            record.sender = Some(stream.sender());
        }
        let mut permit = Some(permit);
        if node == PROXY_NODE {
            stream.keep_messages();
        }
        while let Some(received) = stream.next(MAX_UPDATE_BYTES, &self.tracked).await? {
            let update = &received.update;
            self.recorded(node, Instant::now(), received.bytes, update);
            if node == PROXY_NODE {
                self.record(node).messages.push(received.messages);
            }
            if update.full_state {
                permit.take();
            }
            stream.ack(update.version).await?;
        }
        Ok(())
    }

    /// Connects from the node's own loopback address and opens its stream.
    async fn open(&self, node: u32, name: &str) -> Result<ConfigStream> {
        let channel = self.channel(source_address(node)).await?;
        ConfigStream::open(channel, name, &token(node)).await
    }

    async fn channel(&self, source: Ipv4Addr) -> Result<Channel> {
        let (server, tls) = (self.server, self.tls.clone());
        Endpoint::from_static("http://control-plane")
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(tower::service_fn(move |_| {
                let tls = tls.clone();
                async move {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::from((source, 0)))?;
                    let tcp = socket.connect(server).await?;
                    tcp.set_nodelay(true)?;
                    let stream = tls.connect(ServerName::from(server.ip()), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .with_context(|| format!("connecting to {server} from {source}"))
    }

    fn recorded(&self, node: u32, at: Instant, bytes: usize, update: &LightUpdate) {
        let mut record = self.record(node);
        let workloads = update.workloads;
        if update.full_state && record.first_full_state.is_none() {
            record.first_full_state = Some(FullState {
                at,
                bytes,
                workloads,
            });
        }
        record.arrivals.push(Arrival {
            at,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        });
        for &Carried { slot, ip } in &update.tracked {
            let seen = &mut record.seen[slot];
            match seen {
                Some(seen) if seen.ip == ip => seen.last = at,
                _ => {
                    *seen = Some(Seen {
                        ip,
                        since: at,
                        last: at,
                    })
                }
            }
        }
    }
}

/// Node `node`'s own loopback address: 127.1.0.0 plus `node` (the control
/// plane counts handshakes and connections per source address).
pub fn source_address(node: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + node)
}

/// A failure reason without what differs between nodes (addresses), so that
/// reasons count together.
fn shorten(reason: &str) -> String {
    let generic: String = reason
        .split_whitespace()
        .map(|word| {
            if word.starts_with("127.") || word.starts_with("node-") {
                "<addr>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    generic.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_has_its_own_loopback_source() {
        assert_eq!(source_address(1), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_address(300), Ipv4Addr::new(127, 1, 1, 44));
        assert!(source_address(60_000).is_loopback());
    }

    #[test]
    fn reasons_count_together_across_nodes() {
        assert_eq!(
            shorten("connecting to 127.0.0.1:5 from 127.1.0.9: refused"),
            "connecting to <addr> from <addr> refused"
        );
    }
}
