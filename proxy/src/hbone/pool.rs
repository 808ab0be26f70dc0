//! The client's pool of HBONE connections, keyed by (source identity,
//! destination identity, destination HBONE address, source IP).
//!
//! A request takes a stream slot on a pooled connection that has room (at
//! most [`MAX_STREAMS_PER_CONNECTION`]) and was made with the source's
//! current certificate; otherwise it dials. Concurrent requests that find no
//! room wait for the same dial instead of each dialing. Each connection has a
//! driver task that runs its HTTP/2 state machine and keepalive pings and
//! takes it out of the pool when it dies, when the pool retires it, or when it
//! has carried no stream for the idle timeout.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use h2::client::SendRequest;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpSocket, TcpStream};
use tracing::Instrument;
use weft_certs::{Identity, KeyExchange, WorkloadCertificate};

use super::client::{
    ClientConnection, EarlyData, Handshaken, HboneRequest, Retry, handshake, open_stream,
};
use super::error::HboneError;
use super::slots::{SlotLease, StreamSlots};
use super::stream::HboneStream;
use super::tuning::{
    HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, Keepalive, MAX_STREAMS_PER_CONNECTION, keepalive,
};
use super::windows::{Window, Windows};

/// Opens the TCP connection to a peer's HBONE address, from a given local
/// IP when there is one. The node proxy's dialer uses a transparent socket
/// bound to the source pod's IP with the proxy's socket mark; tests use
/// [`direct_dialer`].
pub type Dialer = Arc<
    dyn Fn(Option<IpAddr>, SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> + Send + Sync,
>;

/// A dialer with no special socket options: binds to the source IP when one
/// is given (it must be a local address), else lets the kernel choose.
pub fn direct_dialer() -> Dialer {
    Arc::new(|source_ip, address| {
        async move {
            let socket = match address {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if let Some(ip) = source_ip {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(address).await
        }
        .boxed()
    })
}

/// How the pool behaves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// A connection that has carried no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Dialing plus the TLS and HTTP/2 handshakes must finish within this.
    pub connect_timeout: Duration,
    /// Streams per connection before another connection is opened (the
    /// peer's own limit, if lower, applies too).
    pub max_streams_per_connection: usize,
    /// The receive windows connections ask for, and the budget they share
    /// (with the server side, when the data plane passes the same).
    pub windows: Windows,
    /// How a connection notices a server that stopped answering.
    pub keepalive: Keepalive,
    /// The TLS key exchange connections offer.
    pub key_exchange: KeyExchange,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: IDLE_TIMEOUT,
            connect_timeout: HANDSHAKE_TIMEOUT,
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            windows: Windows::default(),
            keepalive: Keepalive::default(),
            key_exchange: KeyExchange::default(),
        }
    }
}

/// The client side of HBONE: opens tunnels on pooled connections. Cheap to
/// clone; clones share the pool.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    dialer: Dialer,
    config: PoolConfig,
    next_id: AtomicU64,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
}

/// Which connections a request may share. The source IP is part of it
/// because the peer sees the connection's source address as the client's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    destination: Identity,
    hbone_addr: SocketAddr,
    source_ip: Option<IpAddr>,
}

type DialResult = Result<Arc<PooledConnection>, Arc<HboneError>>;

#[derive(Default)]
struct KeyEntry {
    connections: Vec<Arc<PooledConnection>>,
    /// The dial in progress, shared by every request waiting for it.
    dialing: Option<Shared<BoxFuture<'static, DialResult>>>,
}

struct PooledConnection {
    id: u64,
    send_request: SendRequest<Bytes>,
    slots: Arc<StreamSlots>,
    /// The source certificate the connection was made with.
    leaf: CertificateDer<'static>,
    not_before: SystemTime,
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("config", &self.inner.config)
            .field("connections", &self.connections())
            .finish()
    }
}

impl HbonePool {
    /// An empty pool that dials with `dialer`.
    pub fn new(dialer: Dialer, config: PoolConfig) -> HbonePool {
        HbonePool {
            inner: Arc::new(PoolInner {
                dialer,
                config,
                next_id: AtomicU64::new(1),
                keys: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Opens one tunnel: a `CONNECT` stream answered with 200. A request
    /// that meets a connection the peer is closing (GOAWAY) is retried once
    /// on another connection.
    pub async fn connect(&self, request: HboneRequest) -> Result<HboneStream, HboneError> {
        self.connect_sending(request, &EarlyData::default()).await
    }

    /// [`HbonePool::connect`], sending `early` right behind the `CONNECT`
    /// instead of after its answer (see `client::open_stream`). On success
    /// the bytes are in the tunnel. On failure, or if this future is
    /// dropped, [`EarlyData::may_have_arrived`] says whether they might
    /// have reached the destination anyway; if so, nothing is retried.
    pub async fn connect_sending(
        &self,
        request: HboneRequest,
        early: &EarlyData,
    ) -> Result<HboneStream, HboneError> {
        let span = tracing::debug_span!(
            "hbone_connect",
            source = %request.certificate.identity(),
            destination = %request.destination_identity,
            target = %request.target,
            via = %request.hbone_addr,
        );
        self.connect_once_or_twice(&request, early)
            .instrument(span)
            .await
    }

    /// Connections in the pool that take new streams (not those retired and
    /// only finishing their streams).
    pub fn connections(&self) -> usize {
        self.inner
            .lock()
            .values()
            .map(|entry| entry.connections.len())
            .sum()
    }

    /// Takes every connection made from `source_ip` (a pod that is no
    /// longer served: its namespace, where those sockets live, is going)
    /// out of the pool: they take no new streams and close once their
    /// streams end. A pod that gets the address next dials its own.
    /// Returns how many were retired.
    pub fn retire_source(&self, source_ip: IpAddr) -> usize {
        let mut keys = self.inner.lock();
        let mut retired = 0;
        keys.retain(|key, entry| {
            if key.source_ip != Some(source_ip) {
                return true;
            }
            for connection in &entry.connections {
                connection.slots.close();
                retired += 1;
            }
            false
        });
        retired
    }

    /// Tunnel streams open on pooled connections right now.
    pub fn streams(&self) -> usize {
        self.inner
            .lock()
            .values()
            .flat_map(|entry| &entry.connections)
            .map(|connection| connection.slots.active())
            .sum()
    }

    async fn connect_once_or_twice(
        &self,
        request: &HboneRequest,
        early: &EarlyData,
    ) -> Result<HboneStream, HboneError> {
        let key = PoolKey {
            source: request.certificate.identity().clone(),
            destination: request.destination_identity.clone(),
            hbone_addr: request.hbone_addr,
            source_ip: request.source_ip,
        };
        let mut retried = false;
        loop {
            let (connection, lease) = self.checkout(&key, request).await?;
            let failure = match open_stream(&connection.send_request, request, early, lease).await {
                Ok(stream) => return Ok(stream),
                Err(failure) => failure,
            };
            if failure.retry == Retry::OnAnotherConnection {
                self.inner.retire(&key, &connection);
            }
            if retried || failure.retry == Retry::Never || early.may_have_arrived() {
                return Err(failure.error);
            }
            tracing::debug!(error = %failure.error, "retrying once");
            retried = true;
        }
    }

    /// A slot on a usable connection, dialing (or joining a dial) if needed.
    async fn checkout(
        &self,
        key: &PoolKey,
        request: &HboneRequest,
    ) -> Result<(Arc<PooledConnection>, SlotLease), HboneError> {
        let max = self.inner.config.max_streams_per_connection;
        let mut dials_closed_early = 0;
        loop {
            let dial = {
                let mut keys = self.inner.lock();
                let entry = keys.entry(key.clone()).or_default();
                if let Some(found) = entry.reuse(&request.certificate, max) {
                    return Ok(found);
                }
                match &entry.dialing {
                    Some(dial) => dial.clone(),
                    None => {
                        // A task of its own, so the dial finishes (or times
                        // out) and cleans up even if every waiter gives up.
                        let task = tokio::spawn(self.dial(key.clone(), request.clone()));
                        let address = key.hbone_addr;
                        let dial = async move {
                            task.await.unwrap_or_else(|_| {
                                Err(Arc::new(HboneError::DialAborted { address }))
                            })
                        }
                        .boxed()
                        .shared();
                        entry.dialing = Some(dial.clone());
                        dial
                    }
                }
            };
            let connection = dial
                .await
                .map_err(|shared| Arc::try_unwrap(shared).unwrap_or_else(HboneError::SharedDial))?;
            if let Some(lease) = connection.try_lease(max) {
                return Ok((connection, lease));
            }
            // Filled by the requests that waited with us: look again, and
            // dial the next connection if there is still no room. A new
            // connection that closed before carrying anything is not dialed
            // again and again.
            if connection.slots.is_closed() {
                dials_closed_early += 1;
                if dials_closed_early > 1 {
                    return Err(HboneError::ClosedBeforeUse {
                        address: key.hbone_addr,
                    });
                }
            }
        }
    }

    /// Dials, handshakes and pools a connection for `key`.
    fn dial(&self, key: PoolKey, request: HboneRequest) -> BoxFuture<'static, DialResult> {
        let pool = Arc::downgrade(&self.inner);
        let dialer = Arc::clone(&self.inner.dialer);
        let config = self.inner.config.clone();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!(
            "hbone_dial",
            connection = id,
            source = %key.source,
            destination = %key.destination,
            address = %key.hbone_addr,
        );
        async move {
            let handshaken = establish(&dialer, &request, &config).await;
            let Handshaken {
                send_request,
                connection,
                window,
            } = match handshaken {
                Ok(handshaken) => handshaken,
                Err(error) => {
                    tracing::debug!(%error, "dial failed");
                    if let Some(pool) = pool.upgrade() {
                        pool.dial_finished(&key, None);
                    }
                    return Err(Arc::new(error));
                }
            };
            let pooled = Arc::new(PooledConnection {
                id,
                send_request,
                slots: StreamSlots::new(),
                leaf: request
                    .certificate
                    .chain()
                    .first()
                    .cloned()
                    .unwrap_or_else(|| CertificateDer::from(Vec::new())),
                not_before: request.certificate.not_before(),
            });
            tracing::debug!("connection established");
            let slots = Arc::clone(&pooled.slots);
            let driver = drive(
                (connection, window),
                slots,
                pool.clone(),
                key.clone(),
                id,
                config.clone(),
            );
            tokio::spawn(crate::lanes::movable(driver.in_current_span()));
            if let Some(pool) = pool.upgrade() {
                pool.dial_finished(&key, Some(Arc::clone(&pooled)));
            }
            Ok(pooled)
        }
        .instrument(span)
        .boxed()
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyEntry>> {
        // Every critical section leaves the map consistent.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the dial of `key`, pooling its connection if it made one.
    fn dial_finished(&self, key: &PoolKey, connection: Option<Arc<PooledConnection>>) {
        let mut keys = self.lock();
        let Some(entry) = keys.get_mut(key) else {
            return;
        };
        entry.dialing = None;
        match connection {
            Some(connection) => entry.connections.push(connection),
            None if entry.connections.is_empty() => {
                keys.remove(key);
            }
            None => {}
        }
    }

    /// No new streams on `connection`; it closes once its streams end.
    fn retire(&self, key: &PoolKey, connection: &PooledConnection) {
        connection.slots.close();
        self.forget(key, connection.id);
    }

    /// Takes connection `id` out of the pool.
    fn forget(&self, key: &PoolKey, id: u64) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(key) {
            entry.connections.retain(|c| c.id != id);
            if entry.connections.is_empty() && entry.dialing.is_none() {
                keys.remove(key);
            }
        }
    }
}

impl KeyEntry {
    /// A slot on a connection made with `cert` (or a newer certificate of
    /// the same identity). Connections made with an older certificate are
    /// retired on the way: they finish their streams but take no new ones.
    fn reuse(
        &mut self,
        cert: &WorkloadCertificate,
        max: usize,
    ) -> Option<(Arc<PooledConnection>, SlotLease)> {
        self.connections.retain(|connection| {
            let stale = connection.not_before < cert.not_before();
            if stale {
                tracing::debug!(
                    connection = connection.id,
                    "retired: made with an older certificate"
                );
                connection.slots.close();
            }
            !stale && !connection.slots.is_closed()
        });
        self.connections
            .iter()
            .filter(|connection| connection.made_with(cert))
            .find_map(|connection| {
                let lease = connection.try_lease(max)?;
                Some((Arc::clone(connection), lease))
            })
    }
}

impl PooledConnection {
    /// Whether new streams for `cert`'s workload may use this connection:
    /// made with that very certificate, or with a newer one.
    fn made_with(&self, cert: &WorkloadCertificate) -> bool {
        cert.chain().first() == Some(&self.leaf) || self.not_before > cert.not_before()
    }

    fn try_lease(&self, max: usize) -> Option<SlotLease> {
        let limit = max.min(self.send_request.current_max_send_streams());
        self.slots.try_acquire(limit)
    }
}

/// TCP from the dialer, then TLS and HTTP/2, within the config's connect
/// timeout and with receive windows from its budget.
async fn establish(
    dialer: &Dialer,
    request: &HboneRequest,
    config: &PoolConfig,
) -> Result<Handshaken, HboneError> {
    let address = request.hbone_addr;
    let timeout = config.connect_timeout;
    let window = config
        .windows
        .reserve()
        .ok_or(HboneError::WindowBudget { peer: address })?;
    let work = async {
        let tcp = dialer(request.source_ip, address)
            .await
            .map_err(|source| HboneError::Dial {
                address,
                source_ip: request.source_ip,
                source,
            })?;
        handshake(tcp, request, window, config.key_exchange).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HboneError::ConnectTimeout {
            address,
            after: timeout,
        })?
}

/// Runs one pooled connection until it dies, stops answering pings, or is
/// idle (or retired) with no streams left; then takes it out of the pool
/// and gives its receive window back to the budget.
async fn drive(
    (mut connection, _window): (ClientConnection, Window),
    slots: Arc<StreamSlots>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
    config: PoolConfig,
) {
    let (idle_timeout, keepalive_settings) = (config.idle_timeout, config.keepalive);
    let ping_pong = connection.ping_pong();
    let pings = async {
        match ping_pong {
            Some(ping_pong) => keepalive(ping_pong, keepalive_settings).await,
            None => std::future::pending().await,
        }
    };
    enum End {
        Closed(Result<(), h2::Error>),
        Unresponsive,
        Idle,
    }
    let end = tokio::select! {
        result = &mut connection => End::Closed(result),
        () = pings => End::Unresponsive,
        () = slots.until_idle(idle_timeout) => End::Idle,
    };
    slots.close();
    if let Some(pool) = pool.upgrade() {
        pool.forget(&key, id);
    }
    match end {
        End::Closed(Ok(())) => tracing::debug!("connection closed"),
        End::Closed(Err(error)) => tracing::debug!(%error, "connection failed"),
        End::Unresponsive => {
            let error = HboneError::KeepaliveTimeout {
                peer: key.hbone_addr,
                after: keepalive_settings.timeout,
            };
            tracing::warn!(%error, "giving up the connection");
        }
        End::Idle => {
            // The pool no longer holds the connection's handle, so HTTP/2
            // sends GOAWAY and closes now that no stream is left.
            tracing::debug!("closing the idle connection");
            let _ = tokio::time::timeout(config.connect_timeout, &mut connection).await;
        }
    }
}
