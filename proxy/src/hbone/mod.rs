//! HBONE, the tunnel protocol of Istio's ambient mode: pod-to-pod TCP carried
//! as HTTP/2 `CONNECT` streams inside mutual TLS between node proxies, so
//! that weft and ztunnel nodes can talk to each other.
//!
//! This module is the protocol, both sides, and nothing around it: it does
//! not capture traffic, choose destinations, open transparent sockets or
//! decide policy. The data plane hands it a dialer (for the source pod's IP
//! and socket mark) and, on the server side, a TLS stream already accepted
//! and an [`InboundHandler`] that decides what a `CONNECT` may reach.
//!
//! Where to start reading:
//! - [`HbonePool::connect`]: the client side; one [`HboneRequest`] becomes
//!   one [`HboneStream`], on a pooled connection when one has room.
//! - [`HboneStream`]: a `CONNECT` stream as `AsyncRead + AsyncWrite`, with
//!   HTTP/2 flow control, half-close and byte counts ([`TunnelStats`]).
//! - [`serve_connection`]: the server side of one HBONE connection.
//!
//! Modules, from the leaves up: `error`, `tuning`, `key_exchange` → `windows`, `headers`, `slots` →
//! `stream` → `client` → `pool`; `server` uses `stream`. Nothing points back.

mod client;
mod error;
mod headers;
mod key_exchange;
mod pool;
mod server;
mod slots;
mod stream;
mod tuning;
mod windows;

pub use client::{EarlyData, HboneRequest};
pub use error::HboneError;
pub use headers::{
    BAGGAGE, Baggage, Forwarded, TRACEPARENT, TraceParent, WorkloadKind, parse_forwarded,
};
pub use key_exchange::KeyExchangeMetrics;
pub use pool::{Dialer, HbonePool, PoolConfig, direct_dialer};
pub use server::{
    HandshakeDeadlines, InboundHandler, InboundRequest, Refusal, ServerSettings, accept_tls,
    accept_tls_within, check_connect, serve_connection,
};
pub use stream::{HboneStream, TunnelStats, copy_tunnel};
pub use tuning::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HBONE_PORT, HboneSocket, Keepalive, MAX_FRAME_SIZE,
    MAX_STREAMS_PER_CONNECTION, PING_INTERVAL, PING_TIMEOUT, READ_BUFFER, STREAM_WINDOW,
    hbone_socket,
};
pub use windows::{Window, Windows};
