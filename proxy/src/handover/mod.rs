//! Upgrades that drop nothing: a new proxy process on the node takes over
//! the listening sockets of the one running, instead of binding its own.
//!
//! Why sockets and not ports: a listening socket is one accept queue. The
//! successor receives the very sockets (`SCM_RIGHTS` over a Unix socket in
//! the state directory, readable by root only), so a connection that
//! arrives during the switch waits in that queue for whichever process
//! accepts next; none is refused, reset or left in a queue that closes.
//! Binding a second socket beside the old one (`SO_REUSEPORT`) would split
//! arrivals between two queues, and the old one's would be reset when it
//! closes. The pods' capture rules redirect to the same sockets before,
//! during and after (the successor installs each pod's table again, in one
//! transaction that never removes it).
//!
//! The switch (see [`wire`] for the messages):
//! 1. a starting proxy with a state directory connects to
//!    `<state-dir>/handover.sock`; nobody there means a cold start;
//! 2. the running one freezes its set of served pods (it serves no new pod
//!    and lets none go), pauses its node endpoints (readiness, admin,
//!    metrics, the CNI socket: the successor answers them from now on) and
//!    sends every node socket and every served pod's listeners;
//! 3. the successor serves each pod's listeners as soon as it serves the
//!    pod (a config kept in the state directory decides that at once; both
//!    processes accept on them for a moment), and once it is ready (every
//!    pod served, a config applied) says `Taken`;
//! 4. the predecessor stops accepting anywhere, says `Released` and drains:
//!    its open connections run to their end or to the drain deadline
//!    (HBONE peers are told GOAWAY), its certificates keep renewing, and it
//!    exits on SIGTERM once drained (exiting earlier would make Kubernetes
//!    restart it, and the restarted process would take the sockets back).
//!
//! If the successor dies or gives up before `Taken`, the predecessor thaws
//! and serves on as if nothing happened; if the predecessor dies during the
//! switch, the successor keeps what it received and binds what it did not.
//! A predecessor that is stopping anyway (SIGTERM, no successor yet) leaves
//! everything to the successor the moment it comes. A proxy never hands
//! over to the pod it took over from (its container, restarted after a
//! crash, would take the sockets from the newer one).

mod give;
pub mod wire;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_seqpacket::UnixSeqpacket;
use tracing::{info, warn};

pub use give::{Giver, serve};
pub use wire::{HandoverError, NetnsId, NodeSocketKind};
use wire::{Message, PROTOCOL_VERSION};

use crate::pod_directory::AnnouncedPod;

/// The hand-over socket's name in the state directory.
pub const SOCKET_NAME: &str = "handover.sock";

/// A pod as the predecessor hands it over.
#[derive(Debug)]
pub struct HandedPod {
    /// The pod, as its directory has it.
    pub pod: AnnouncedPod,
    /// The namespace its listeners are in, if it serves the pod.
    pub netns: Option<NetnsId>,
    /// Its listeners (copies: the predecessor keeps serving on them until
    /// it is released).
    pub listeners: Vec<OwnedFd>,
}

/// What the giving side asks of the task that serves the pods.
#[derive(Debug)]
pub enum PodsRequest {
    /// Stop changing the set of served pods, and say what it is (or why
    /// it cannot: then it thaws at once).
    Freeze(oneshot::Sender<Result<Vec<HandedPod>, String>>),
    /// The hand-over failed: go on as before.
    Thaw,
}

/// The listeners a successor received for one pod.
#[derive(Debug)]
pub struct InheritedListeners {
    /// The namespace they are in.
    pub netns: NetnsId,
    /// The sockets.
    pub listeners: Vec<OwnedFd>,
}

/// What a starting proxy received from the one running.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The node's sockets, by kind.
    pub node: BTreeMap<NodeSocketKind, OwnedFd>,
    /// Every pod the predecessor knew.
    pub pods: Vec<AnnouncedPod>,
    /// The listeners of the pods it served, by namespace path.
    pub pod_listeners: BTreeMap<PathBuf, InheritedListeners>,
    /// The predecessor's pod UID (empty if unknown).
    pub predecessor_pod_uid: String,
}

/// The link to the predecessor, kept until the successor is ready.
#[derive(Debug)]
pub struct Predecessor {
    socket: UnixSeqpacket,
}

/// Connects to the running proxy's hand-over socket at `path` and receives
/// its sockets, within `wait`. `None`: nobody to take over from (a cold
/// start), or the exchange failed (logged; the predecessor then serves on,
/// and what was received is closed again).
pub async fn take(path: &Path, wait: Duration, pod_uid: &str) -> Option<(Inherited, Predecessor)> {
    let socket = match UnixSeqpacket::connect(path).await {
        Ok(socket) => socket,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            info!(socket = %path.display(), "no running proxy to take over from");
            return None;
        }
        Err(error) => {
            warn!(socket = %path.display(), %error, "cannot reach the running proxy's hand-over socket; starting fresh");
            return None;
        }
    };
    match tokio::time::timeout(wait, receive(&socket, pod_uid)).await {
        Ok(Ok(inherited)) => {
            info!(
                node_sockets = inherited.node.len(),
                pods = inherited.pods.len(),
                served_pods = inherited.pod_listeners.len(),
                "took over the running proxy's sockets"
            );
            Some((inherited, Predecessor { socket }))
        }
        Ok(Err(error)) => {
            warn!(%error, "taking over from the running proxy failed; starting fresh");
            None
        }
        Err(_) => {
            warn!(
                ?wait,
                "the running proxy did not hand over in time; starting fresh"
            );
            None
        }
    }
}

/// The successor's half of steps 1 and 2.
async fn receive(socket: &UnixSeqpacket, pod_uid: &str) -> Result<Inherited, HandoverError> {
    check_peer(socket)?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        pod_uid: pod_uid.to_owned(),
    };
    wire::send(socket, &hello, &[]).await?;
    let mut inherited = Inherited::default();
    loop {
        let (message, sockets) = wire::recv(socket).await?;
        match message {
            Message::NodeSocket { kind } => {
                let [fd] = <[OwnedFd; 1]>::try_from(sockets).map_err(|sockets| {
                    HandoverError::Malformed(format!(
                        "node socket {kind:?} came with {} descriptors",
                        sockets.len()
                    ))
                })?;
                inherited.node.insert(kind, fd);
            }
            Message::Pod { pod, netns } => {
                match netns {
                    Some(netns) if !sockets.is_empty() => {
                        inherited.pod_listeners.insert(
                            pod.netns.clone(),
                            InheritedListeners {
                                netns,
                                listeners: sockets,
                            },
                        );
                    }
                    _ => {}
                }
                inherited.pods.push(pod);
            }
            Message::Done { pod_uid } => {
                inherited.predecessor_pod_uid = pod_uid;
                return Ok(inherited);
            }
            other => {
                return Err(HandoverError::Malformed(format!(
                    "unexpected {other:?} while receiving sockets"
                )));
            }
        }
    }
}

impl Predecessor {
    /// Step 3: tells the predecessor that this process serves, and waits
    /// (up to `wait`) until it has stopped accepting.
    pub async fn release(self, wait: Duration) {
        let released = async {
            wire::send(&self.socket, &Message::Taken, &[]).await?;
            match wire::recv(&self.socket).await?.0 {
                Message::Released => Ok(()),
                other => Err(HandoverError::Malformed(format!(
                    "unexpected {other:?} instead of Released"
                ))),
            }
        };
        match tokio::time::timeout(wait, released).await {
            Ok(Ok(())) => info!("the previous proxy released the sockets: this one serves alone"),
            Ok(Err(error)) => {
                warn!(%error, "the previous proxy did not confirm the release (gone?)")
            }
            Err(_) => warn!(
                ?wait,
                "the previous proxy did not confirm the release in time"
            ),
        }
    }
}

/// Only a process of this proxy's own user may take part: the sockets give
/// whoever holds them every meshed pod's traffic. (The socket's directory
/// is private to that user too.)
pub(crate) fn check_peer(socket: &UnixSeqpacket) -> Result<(), HandoverError> {
    let peer = socket.peer_cred().map_err(|source| HandoverError::Io {
        operation: "reading the other proxy's credentials",
        source,
    })?;
    let own = nix::unistd::geteuid().as_raw();
    if peer.uid() != own {
        return Err(HandoverError::Refused(format!(
            "the other side runs as uid {}, not as this proxy's {own}",
            peer.uid()
        )));
    }
    Ok(())
}
