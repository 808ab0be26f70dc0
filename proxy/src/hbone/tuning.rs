//! The numbers HBONE runs with (those ztunnel uses, so both ends agree on
//! what to expect), the HTTP/2 builders that apply them on each side, and the
//! keepalive that notices a peer which stopped answering.

use std::time::Duration;

use h2::{Ping, PingPong};

/// The port every meshed pod's HBONE traffic is addressed to.
pub const HBONE_PORT: u16 = 15008;

/// The HTTP/2 flow-control window of each `CONNECT` stream by default
/// (the proxy's config sets its own, see [`super::Windows`]): 4 MiB.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The HTTP/2 flow-control window of a whole connection by default: 16 MiB.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// What one stream may queue for sending beyond what the peer has read,
/// by default: 256 KiB.
pub const SEND_BUFFER: u32 = 256 * 1024;

/// The largest HTTP/2 frame either side accepts: 1 MiB.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// The read buffer under TLS on each HBONE connection. rustls reads the
/// socket 4 KiB at a time; a bulk transfer in 16 KiB records would otherwise
/// cost four or five system calls per record.
pub const READ_BUFFER: usize = 64 * 1024;

/// How much TLS may buffer for writing (rustls's default is 64 KiB): a bulk
/// transfer then goes out in one `writev` of 16 KiB records per 256 KiB.
pub const TLS_WRITE_BUFFER: usize = 256 * 1024;

/// The TCP connection under an HBONE connection's TLS, read through a
/// [`READ_BUFFER`]-sized buffer (writes go straight through).
pub type HboneSocket = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a freshly accepted or dialled connection for TLS.
pub fn hbone_socket(tcp: tokio::net::TcpStream) -> HboneSocket {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

/// How many `CONNECT` streams one connection carries at once by default.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// How long an HBONE connection may carry no stream before it is closed,
/// by default (dialed and served).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often an HBONE connection is pinged, by default.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a ping may go unanswered before the connection is given up,
/// by default.
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How an HBONE connection notices a peer that stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// How often the connection is pinged.
    pub interval: Duration,
    /// How long a ping may go unanswered before the connection is given up.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Keepalive {
        Keepalive {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

/// Bound on each of the TLS and HTTP/2 handshakes, on both sides, so that a
/// peer that connects and says nothing cannot hold a task forever (by
/// default: the proxy's config sets its own).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An upper bound on request header lists; HBONE requests are a few short
/// headers, so anything near this is abuse.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// The receive windows and send buffer of one connection (what
/// [`super::Window`] reserved for it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BufferSizes {
    pub(crate) stream_window: u32,
    pub(crate) connection_window: u32,
    pub(crate) send_buffer: usize,
}

/// The client's HTTP/2 settings, with the receive windows reserved for the
/// connection (see [`super::Window`]): each stream's and the connection's.
pub(crate) fn client_builder(sizes: BufferSizes) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(sizes.stream_window)
        .initial_connection_window_size(sizes.connection_window)
        .max_send_buffer_size(sizes.send_buffer)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_max_send_streams(MAX_STREAMS_PER_CONNECTION)
        .enable_push(false);
    builder
}

/// The server's HTTP/2 settings, with the receive windows reserved for
/// the connection and at most `max_streams` streams at once.
pub(crate) fn server_builder(sizes: BufferSizes, max_streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(sizes.stream_window)
        .initial_connection_window_size(sizes.connection_window)
        .max_send_buffer_size(sizes.send_buffer)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(max_streams);
    builder
}

/// Pings every `settings.interval` and returns only when a ping went
/// unanswered for `settings.timeout`. If the connection itself has ended,
/// the ping fails and this waits forever: the caller sees the end
/// elsewhere.
pub(crate) async fn keepalive(mut ping_pong: PingPong, settings: Keepalive) {
    loop {
        tokio::time::sleep(settings.interval).await;
        match tokio::time::timeout(settings.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_closed)) => std::future::pending::<()>().await,
            Err(_elapsed) => return,
        }
    }
}
