//! The hand-over conversation on the wire: one JSON message per
//! `SOCK_SEQPACKET` datagram, the descriptors it speaks of attached to it
//! (`SCM_RIGHTS`), so that a message and its sockets arrive together or not
//! at all.
//!
//! ```text
//! successor                         predecessor
//!   Hello {version}        ─────▶
//!                          ◀─────   NodeSocket {kind}        + 1 socket  (each)
//!                          ◀─────   Pod {pod, netns}         + its listeners (each)
//!                          ◀─────   Done
//!   (serves the sockets; once ready)
//!   Taken                  ─────▶
//!                          ◀─────   Released   (accepts nothing more; drains)
//! ```
//!
//! Fields a side does not know are ignored, so that versions next to each
//! other in an upgrade or a rollback understand each other.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};

pub use crate::capture::pod::NetnsId;
use crate::pod_directory::AnnouncedPod;

/// The conversation's version, in `Hello`. A predecessor answers any
/// version in its own (1): a newer successor must understand it.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest message either side reads (a pod's entry is well under a
/// kilobyte).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The most descriptors one message carries: a pod's listeners (outbound,
/// inbound plaintext and HBONE, for IPv4 and IPv6).
pub const MAX_SOCKETS_PER_MESSAGE: usize = 6;

/// One of the node's own listening sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeSocketKind {
    /// The admin endpoint (TCP).
    Admin,
    /// Prometheus metrics (TCP).
    Metrics,
    /// Readiness (TCP).
    Readiness,
    /// The CNI plugin's socket (Unix stream).
    Cni,
    /// The hand-over socket itself (Unix seqpacket), so that the
    /// successor can hand over to the next one in its turn.
    Handover,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Successor: asks for the sockets.
    Hello {
        /// [`PROTOCOL_VERSION`] of the successor.
        version: u32,
        /// The successor's pod UID, if on Kubernetes.
        #[serde(default)]
        pod_uid: String,
    },
    /// Predecessor: one node socket, attached.
    NodeSocket {
        /// Which.
        kind: NodeSocketKind,
    },
    /// Predecessor: a pod it knows; if it serves the pod, the listeners it
    /// serves it with are attached (TCP, each known by its local address).
    Pod {
        /// The pod, as the predecessor's directory has it.
        pod: AnnouncedPod,
        /// The namespace the attached listeners belong to (checked by the
        /// successor against the one it opens at the pod's path, which may
        /// name another namespace by then).
        #[serde(default)]
        netns: Option<NetnsId>,
    },
    /// Predecessor: that was all.
    Done {
        /// The predecessor's pod UID, if on Kubernetes: the successor will
        /// never hand over to it.
        #[serde(default)]
        pod_uid: String,
    },
    /// Successor: it serves; the predecessor is to stop accepting.
    Taken,
    /// Predecessor: it accepts nothing more.
    Released,
}

/// Why a message could not be read or sent.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket failed.
    #[error("{operation}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// The other side closed the connection.
    #[error("the other proxy closed the hand-over connection")]
    Closed,
    /// A message that is not one, or not the one expected.
    #[error("a malformed hand-over message: {0}")]
    Malformed(String),
    /// The other side may not take part.
    #[error("hand-over refused: {0}")]
    Refused(String),
}

impl Message {
    /// Parses one datagram.
    pub fn decode(bytes: &[u8]) -> Result<Message, HandoverError> {
        serde_json::from_slice(bytes).map_err(|e| HandoverError::Malformed(e.to_string()))
    }

    /// The datagram of this message.
    pub fn encode(&self) -> Vec<u8> {
        // A message holds only strings, numbers and paths the proxy made:
        // serializing it cannot fail; an empty datagram would be refused.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Sends `message` with `sockets` attached.
pub async fn send(
    socket: &UnixSeqpacket,
    message: &Message,
    sockets: &[&OwnedFd],
) -> Result<(), HandoverError> {
    let bytes = message.encode();
    let fds: Vec<_> = sockets.iter().map(|fd| fd.as_fd()).collect();
    let mut space = [0u8; 256];
    let mut ancillary = AncillaryMessageWriter::new(&mut space);
    if !fds.is_empty() {
        ancillary.add_fds(&fds).map_err(|_| HandoverError::Io {
            operation: "attaching sockets to a hand-over message",
            source: std::io::Error::other("too many sockets for one message"),
        })?;
    }
    socket
        .send_vectored_with_ancillary(&[IoSlice::new(&bytes)], &mut ancillary)
        .await
        .map_err(|source| HandoverError::Io {
            operation: "sending a hand-over message",
            source,
        })?;
    Ok(())
}

/// Receives the next message and the sockets attached to it (at most
/// [`MAX_SOCKETS_PER_MESSAGE`]; a message that carried more is refused,
/// and what came with it closed).
pub async fn recv(socket: &UnixSeqpacket) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buffer = vec![0u8; MAX_MESSAGE_BYTES];
    let mut space = [0u8; 256];
    let (read, ancillary) = socket
        .recv_vectored_with_ancillary(&mut [IoSliceMut::new(&mut buffer)], &mut space)
        .await
        .map_err(|source| HandoverError::Io {
            operation: "receiving a hand-over message",
            source,
        })?;
    let truncated = ancillary.is_truncated();
    let mut sockets = Vec::new();
    for message in ancillary.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(fds) = message {
            sockets.extend(fds);
        }
    }
    if read == 0 {
        return Err(HandoverError::Closed);
    }
    if truncated || sockets.len() > MAX_SOCKETS_PER_MESSAGE {
        return Err(HandoverError::Malformed(format!(
            "{} sockets attached, at most {MAX_SOCKETS_PER_MESSAGE} are expected",
            sockets.len()
        )));
    }
    let message = Message::decode(&buffer[..read])?;
    Ok((message, sockets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_the_wire_and_unknown_fields_are_ignored() {
        let pod = Message::Pod {
            pod: AnnouncedPod {
                netns: "/var/run/netns/cni-1".into(),
                ips: vec!["10.0.0.5".parse().expect("an IP")],
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: "u-1".into(),
                found: false,
            },
            netns: Some(NetnsId {
                dev: 4,
                ino: 4026532,
            }),
        };
        assert_eq!(Message::decode(&pod.encode()).ok(), Some(pod));
        let newer = br#"{"hello": {"version": 1, "features": ["x"]}}"#;
        assert_eq!(
            Message::decode(newer).ok(),
            Some(Message::Hello {
                version: 1,
                pod_uid: String::new()
            })
        );
        assert!(Message::decode(b"{\"launch\": {}}").is_err());
        assert!(Message::decode(b"").is_err());
    }

    #[tokio::test]
    async fn sockets_arrive_with_their_message() {
        let (a, b) = UnixSeqpacket::pair().expect("a socket pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let fd = OwnedFd::from(listener);
        send(
            &a,
            &Message::NodeSocket {
                kind: NodeSocketKind::Metrics,
            },
            &[&fd],
        )
        .await
        .expect("sent");
        let (message, sockets) = recv(&b).await.expect("received");
        assert_eq!(
            message,
            Message::NodeSocket {
                kind: NodeSocketKind::Metrics
            }
        );
        let [received] = <[OwnedFd; 1]>::try_from(sockets).expect("one socket");
        let received = std::net::TcpListener::from(received);
        assert_eq!(received.local_addr().expect("its address"), addr);
        drop(a);
        assert!(matches!(recv(&b).await, Err(HandoverError::Closed)));
    }
}
