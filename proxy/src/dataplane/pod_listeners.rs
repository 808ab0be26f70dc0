//! A served pod's three listeners (outbound on loopback, inbound plaintext
//! and HBONE on every address, for each IP family the pod has): bound
//! inside its namespace, or taken from the proxy that served it before
//! (see `crate::handover`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;

use tokio::net::TcpListener;
use tracing::warn;

use crate::sockets::{self, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// The listeners a predecessor served a pod with, each known by its port.
pub(super) fn adopt_pod_listeners(
    sockets: Vec<OwnedFd>,
) -> Result<Vec<(Listener, TcpListener)>, String> {
    sockets
        .into_iter()
        .map(|socket| {
            let listener = std::net::TcpListener::from(socket);
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            let what = match local.port() {
                OUTBOUND_PORT => Listener::Outbound,
                INBOUND_PLAINTEXT_PORT => Listener::Plaintext,
                HBONE_PORT => Listener::Hbone,
                _ => return Err(format!("a handed-over listener on {local} is not a pod's")),
            };
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            Ok((what, listener))
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Listener {
    Outbound,
    Plaintext,
    Hbone,
}

/// Binds the pod's listeners on the calling thread (inside the pod's
/// namespace): outbound on loopback, where `redirect` sends the pod's own
/// connections; inbound plaintext and HBONE on every address. IPv6 ones
/// when the pod has IPv6; if they cannot be bound, the pod's IPv6 TCP is
/// refused by its rules (they redirect to nothing).
pub(super) fn bind_pod_listeners() -> Result<Vec<(Listener, TcpListener)>, String> {
    let mut bound = Vec::new();
    let mut families = vec![(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        Ipv4Addr::UNSPECIFIED.into(),
    )];
    if Path::new("/proc/sys/net/ipv6").exists() {
        families.push((
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            Ipv6Addr::UNSPECIFIED.into(),
        ));
    }
    for (family, (loopback, any)) in families.into_iter().enumerate() {
        let wanted = [
            (Listener::Outbound, SocketAddr::new(loopback, OUTBOUND_PORT)),
            (
                Listener::Plaintext,
                SocketAddr::new(any, INBOUND_PLAINTEXT_PORT),
            ),
            (Listener::Hbone, SocketAddr::new(any, HBONE_PORT)),
        ];
        for (what, addr) in wanted {
            match sockets::pod_listener(addr) {
                Ok(listener) => bound.push((what, listener)),
                Err(error) if family == 0 => return Err(error.to_string()),
                Err(error) => {
                    warn!(%error, "no IPv6 listener in the pod: its IPv6 TCP is refused");
                }
            }
        }
    }
    Ok(bound)
}
