//! The proxy's sockets, and the packet marks and routing table that the
//! capture rules ([`crate::capture`]) and these sockets agree on.
//!
//! - a [`pod_listener`] in a meshed pod's namespace receives the
//!   connections the pod's rules redirect to it; where they were going is
//!   [`redirected_destination`] (HBONE, not redirected, is addressed to
//!   the listener itself: [`original_destination`]);
//! - [`connect_from`] (or [`outgoing_socket`] made inside a pod's
//!   namespace, then [`connect_socket`]) dials out with a pod's or a
//!   client's IP as the source (so the far end sees the real client) and
//!   with [`PROXY_MARK`], so that the capture rules leave the proxy's own
//!   packets alone.
//!
//! Dialling from a foreign address needs `CAP_NET_ADMIN` (`IP_TRANSPARENT`,
//! `SO_MARK`), and works only together with the pod's rules: replies to it
//! reach the proxy because those rules mark them and route them locally.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Where a meshed pod's rules redirect the TCP it opens.
pub const OUTBOUND_PORT: u16 = 15001;

/// Where a meshed pod's rules redirect plaintext TCP to it.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Where the proxy listens in a meshed pod for TCP to its port 15008:
/// HBONE tunnels from other nodes' proxies. The protocol owns the number.
pub use crate::hbone::HBONE_PORT;

/// `SO_MARK` of every connection the proxy makes itself. The capture rules
/// never steer a packet carrying this bit, and it must not overlap
/// [`CAPTURE_MARK`], or the proxy's own packets would be routed back to it.
pub const PROXY_MARK: u32 = 0x2;

/// The bit the capture rules set on packets that belong to the proxy's
/// transparent sockets (steered ones and replies to them); the policy rule
/// `fwmark CAPTURE_MARK/CAPTURE_MARK` sends them to [`CAPTURE_ROUTE_TABLE`].
pub const CAPTURE_MARK: u32 = 0x1;

/// The routing table that holds only `local default dev lo`: whatever is
/// looked up there is delivered on this host, whatever its destination.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;

/// Priority of the policy rule that sends marked packets to
/// [`CAPTURE_ROUTE_TABLE`]: before `main` (32766), after `local` (0).
pub const CAPTURE_RULE_PRIORITY: u32 = 32764;

/// Backlog of the listeners in pods: a burst of a pod's new connections
/// lands on one listener.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Binds a plain listener for a pod's redirected traffic (see
/// `capture::pod`), in the namespace of the calling thread: `SO_REUSEADDR`
/// (a restarted proxy binds again while old connections linger),
/// `IPV6_V6ONLY` for IPv6, non-blocking, backlog [`LISTEN_BACKLOG`].
///
/// Must be called inside a tokio runtime.
pub fn pod_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| context(e, format!("creating a listening socket for {addr}")))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| context(e, format!("setting SO_REUSEADDR on {addr}")))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| context(e, format!("setting IPV6_V6ONLY on {addr}")))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| context(e, format!("making the listener on {addr} non-blocking")))?;
    socket
        .bind(&addr.into())
        .map_err(|e| context(e, format!("binding a listener to {addr}")))?;
    socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| context(e, format!("listening on {addr}")))?;
    TcpListener::from_std(socket.into())
}

/// Where a connection that was not redirected was going: its own local
/// address (HBONE arrives at the proxy's listener in the pod as
/// addressed).
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr()
}

/// Opens a TCP connection to `destination` from the proxy, marked with
/// `mark` (`SO_MARK`, normally [`PROXY_MARK`]) so the capture rules never
/// steer it, with `TCP_NODELAY`.
///
/// With `source`, the socket is `IP_TRANSPARENT` and bound to `source:0`
/// first, so the connection carries a foreign IP, typically the pod the
/// proxy relays for; the capture rules' `socket transparent` match then
/// brings the replies back to this socket. `source` and `destination` must
/// be of the same IP family.
///
/// Must be called inside a tokio runtime. Needs `CAP_NET_ADMIN`.
pub async fn connect_from(
    source: Option<IpAddr>,
    destination: SocketAddr,
    mark: u32,
) -> io::Result<TcpStream> {
    let socket = outgoing_socket(source, destination, mark)?;
    connect_socket(socket, source, destination).await
}

/// The socket [`connect_from`] connects, before it does: marked, with
/// `TCP_NODELAY`, transparent and bound to `source` if given, non-blocking.
/// A socket belongs to the network namespace of the thread that makes it,
/// so one made inside a pod's namespace (see `capture::pod`) connects from
/// there, wherever [`connect_socket`] later runs.
pub fn outgoing_socket(
    source: Option<IpAddr>,
    destination: SocketAddr,
    mark: u32,
) -> io::Result<Socket> {
    if let Some(source) = source
        && source.is_ipv4() != destination.is_ipv4()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("connecting from {source} to {destination}: the IP families differ"),
        ));
    }
    let socket = Socket::new(
        Domain::for_address(destination),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|e| context(e, format!("creating a socket to {destination}")))?;
    socket
        .set_mark(mark)
        .map_err(|e| context(e, format!("setting SO_MARK {mark:#x} for {destination}")))?;
    socket
        .set_tcp_nodelay(true)
        .map_err(|e| context(e, format!("setting TCP_NODELAY for {destination}")))?;
    if let Some(source) = source {
        set_transparent(&socket, source)?;
        let from = SocketAddr::new(source, 0);
        socket
            .bind(&from.into())
            .map_err(|e| context(e, format!("binding to {from} to connect to {destination}")))?;
    }
    socket.set_nonblocking(true).map_err(|e| {
        context(
            e,
            format!("making the socket to {destination} non-blocking"),
        )
    })?;
    Ok(socket)
}

/// Connects a socket from [`outgoing_socket`] (`source` only names it in
/// errors), giving up after [`CONNECT_TIMEOUT`].
pub async fn connect_socket(
    socket: Socket,
    source: Option<IpAddr>,
    destination: SocketAddr,
) -> io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(socket.into());
    let from = source.map_or_else(|| "the proxy".to_owned(), |ip| ip.to_string());
    // A peer that drops SYNs would otherwise hold both proxies for the
    // kernel's whole SYN-retry time (about two minutes).
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(destination)).await {
        Ok(connected) => {
            connected.map_err(|e| context(e, format!("connecting from {from} to {destination}")))
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connecting from {from} to {destination}: no answer within {CONNECT_TIMEOUT:?}"
            ),
        )),
    }
}

/// Where a connection that a NAT `redirect` brought to one of the proxy's
/// listeners was going (`SO_ORIGINAL_DST`, or its IPv6 twin): the
/// destination the pod dialled, or the pod's own address and port for an
/// inbound one (see `capture::pod`).
pub fn redirected_destination<S: std::os::fd::AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = if socket.local_addr()?.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    original
        .and_then(|addr| {
            addr.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "not an IP socket address")
            })
        })
        .map_err(|e| {
            context(
                e,
                "reading the original destination (SO_ORIGINAL_DST)".into(),
            )
        })
}

/// How long a TCP connect may take before it counts as failed.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets `IP_TRANSPARENT` or `IPV6_TRANSPARENT`, after the family of `ip`.
fn set_transparent(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    let set = match ip {
        IpAddr::V4(_) => socket.set_ip_transparent_v4(true),
        IpAddr::V6(_) => socket.set_ip_transparent_v6(true),
    };
    set.map_err(|e| {
        context(
            e,
            format!("setting IP_TRANSPARENT for {ip} (needs CAP_NET_ADMIN)"),
        )
    })
}

/// The same error, its message prefixed with the operation that failed.
fn context(error: io::Error, operation: String) -> io::Error {
    io::Error::new(error.kind(), format!("{operation}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_mark_is_never_the_capture_mark() {
        assert_eq!(PROXY_MARK & CAPTURE_MARK, 0);
    }

    #[tokio::test]
    async fn families_must_match() {
        let error = connect_from(
            Some("10.0.0.1".parse().expect("an IPv4 address")),
            "[::1]:80".parse().expect("an IPv6 socket address"),
            PROXY_MARK,
        )
        .await
        .err();
        assert_eq!(error.map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
    }
}
