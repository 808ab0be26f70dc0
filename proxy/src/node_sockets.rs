//! The node's own listening sockets: the admin endpoint, metrics,
//! readiness, the CNI plugin's socket and the hand-over socket. A proxy
//! that starts cold binds them; one that takes over from a running proxy
//! uses the ones it was handed (see [`crate::handover`]), so the ports and
//! paths never go unanswered. Either way a copy of each is kept for the
//! next hand-over.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use tokio_seqpacket::UnixSeqpacketListener;
use tracing::{info, warn};

use crate::handover::NodeSocketKind;
use crate::{Error, ProxyConfig};

/// The node's sockets, bound or taken over.
#[derive(Debug)]
pub struct NodeSockets {
    /// The admin endpoint.
    pub admin: TcpListener,
    /// Metrics and readiness, when the data plane runs.
    pub monitoring: Option<(TcpListener, TcpListener)>,
    /// The CNI plugin's socket, if configured.
    pub cni: Option<UnixListener>,
    /// The admin socket, if configured: never handed over, a new proxy
    /// takes its path (the newest proxy is the one to change).
    pub admin_socket: Option<UnixListener>,
    /// The hand-over socket, with a state directory.
    pub handover: Option<UnixSeqpacketListener>,
    /// A copy of each, for the next hand-over.
    pub copies: Vec<(NodeSocketKind, OwnedFd)>,
}

/// Binds the node's sockets, or takes the ones in `inherited`. The TCP
/// ones come first: if a running proxy holds them and did not hand them
/// over, starting fails here, before the paths of its Unix sockets are
/// taken from it.
pub fn open(
    config: &ProxyConfig,
    mut inherited: BTreeMap<NodeSocketKind, OwnedFd>,
) -> Result<NodeSockets, Error> {
    let mut copies = Vec::new();
    let mut tcp = |kind: NodeSocketKind, addr: SocketAddr| -> Result<TcpListener, Error> {
        let listener = match inherited.remove(&kind).map(|fd| adopt_tcp(fd, addr)) {
            Some(Ok(listener)) => listener,
            Some(Err(reason)) => {
                warn!(?kind, %addr, %reason, "not using the handed-over socket; binding a new one");
                bind_tcp(kind, addr)?
            }
            None => bind_tcp(kind, addr)?,
        };
        copies.push((kind, copy(&listener, kind)?));
        Ok(listener)
    };
    let admin = tcp(NodeSocketKind::Admin, config.admin_addr)?;
    let monitoring = if config.data_plane {
        Some((
            tcp(NodeSocketKind::Metrics, config.metrics_addr)?,
            tcp(NodeSocketKind::Readiness, config.readiness_addr)?,
        ))
    } else {
        None
    };
    let cni = match &config.cni_socket {
        Some(path) => {
            let listener = match inherited
                .remove(&NodeSocketKind::Cni)
                .map(|fd| adopt_unix(fd, path))
            {
                Some(Ok(listener)) => listener,
                Some(Err(reason)) => {
                    warn!(socket = %path.display(), %reason, "not using the handed-over CNI socket; binding a new one");
                    bind_cni(path)?
                }
                None => bind_cni(path)?,
            };
            copies.push((NodeSocketKind::Cni, copy(&listener, NodeSocketKind::Cni)?));
            Some(listener)
        }
        None => None,
    };
    let admin_socket = match &config.admin_socket {
        Some(path) => Some(bind_private(path).map_err(|source| Error::BindAdminSocket {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let handover = match &config.state_dir {
        Some(dir) => {
            let path = dir.join(crate::handover::SOCKET_NAME);
            let listener = match inherited.remove(&NodeSocketKind::Handover) {
                Some(fd) => UnixSeqpacketListener::try_from(fd),
                None => bind_handover(&path),
            }
            .map_err(|source| Error::BindHandover {
                path: path.clone(),
                source,
            })?;
            copies.push((
                NodeSocketKind::Handover,
                copy(&listener, NodeSocketKind::Handover)?,
            ));
            Some(listener)
        }
        None => None,
    };
    Ok(NodeSockets {
        admin,
        monitoring,
        cni,
        admin_socket,
        handover,
        copies,
    })
}

fn bind_tcp(kind: NodeSocketKind, addr: SocketAddr) -> Result<TcpListener, Error> {
    let failed = |source| Error::BindNodeSocket { kind, addr, source };
    let listener = TcpListener::bind(addr).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    Ok(listener)
}

/// A handed-over TCP listener, if it listens on the port this proxy is
/// configured to (a new version may have moved a port). On another address
/// of that port it is kept all the same: the running proxy holds the port
/// until it exits, so a socket of this proxy's own could not be bound
/// (an upgrade from a version that listened on every address); the
/// configured address applies from the next fresh start.
fn adopt_tcp(fd: OwnedFd, wanted: SocketAddr) -> Result<TcpListener, String> {
    let listener = TcpListener::from(fd);
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if wanted.port() != 0 && local.port() != wanted.port() {
        return Err(format!("it listens on {local}"));
    }
    if local.ip() != wanted.ip() {
        warn!(%local, configured = %wanted,
            "serving on the handed-over socket's address: the configured one applies from the next fresh start");
    }
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

/// A handed-over Unix listener, if it is bound at `path` (a new version
/// may have moved it).
fn adopt_unix(fd: OwnedFd, path: &Path) -> Result<UnixListener, String> {
    let listener = UnixListener::from(fd);
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if local.as_pathname() != Some(path) {
        return Err(format!("it is bound at {local:?}"));
    }
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    info!(socket = %path.display(), "serving the CNI socket handed over");
    Ok(listener)
}

fn bind_cni(path: &Path) -> Result<UnixListener, Error> {
    crate::cni_api::bind(path).map_err(|source| Error::BindCniSocket {
        path: path.to_owned(),
        source,
    })
}

/// Binds the hand-over socket at `path` (replacing a stale one), for this
/// proxy's user only.
fn bind_handover(path: &Path) -> std::io::Result<UnixSeqpacketListener> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixSeqpacketListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds a stream socket at `path` (replacing whatever socket was there),
/// for this proxy's user only.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn copy(socket: &impl AsFd, kind: NodeSocketKind) -> Result<OwnedFd, Error> {
    socket
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::CopySocket { kind, source })
}
