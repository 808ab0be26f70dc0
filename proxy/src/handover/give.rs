//! The running proxy's side of a hand-over: it waits on the hand-over
//! socket for a successor, gives it every listening socket, and stops
//! accepting once the successor serves.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{info, warn};

use super::wire::{self, Message};
use super::{HandedPod, HandoverError, NodeSocketKind, PodsRequest};
use crate::listening::{ListeningControl, ListeningState, TaskEnd};

/// What the running proxy hands over, and to whom it reports.
pub struct Giver {
    /// The hand-over socket.
    pub listener: UnixSeqpacketListener,
    /// Copies of the node's sockets (the hand-over socket's among them).
    pub node_sockets: Vec<(NodeSocketKind, OwnedFd)>,
    /// The task that serves the pods, if the data plane runs.
    pub pods: Option<mpsc::Sender<PodsRequest>>,
    /// Whose turn it is to accept.
    pub listening: Arc<ListeningControl>,
    /// Set once the sockets belong to the successor.
    pub handed_over: watch::Sender<bool>,
    /// How long a successor may take to say what it wants.
    pub hello_wait: Duration,
}

/// Serves the hand-over socket until a successor took the sockets over.
pub async fn serve(mut giver: Giver) -> TaskEnd {
    loop {
        let socket = match giver.listener.accept().await {
            Ok(socket) => socket,
            Err(error) => {
                warn!(%error, "hand-over socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        info!("a new proxy asks to take over");
        match give_to(&giver, &socket).await {
            Ok(()) => return TaskEnd::HandedOver("hand-over socket"),
            Err(error) => {
                warn!(%error, "handing over to the new proxy failed; serving on as before")
            }
        }
    }
}

/// One successor, from `Hello` to `Released`. On failure everything is as
/// it was before it came.
async fn give_to(giver: &Giver, socket: &UnixSeqpacket) -> Result<(), HandoverError> {
    super::check_peer(socket)?;
    let hello = tokio::time::timeout(giver.hello_wait, wire::recv(socket))
        .await
        .map_err(|_| HandoverError::Refused("no Hello in time".into()))??;
    if !matches!(hello.0, Message::Hello { .. }) {
        return Err(HandoverError::Malformed(format!(
            "expected Hello, got {:?}",
            hello.0
        )));
    }
    let pods = freeze(giver.pods.as_ref()).await;
    giver.listening.set(ListeningState::Paused);
    let given = async {
        for (kind, fd) in &giver.node_sockets {
            wire::send(socket, &Message::NodeSocket { kind: *kind }, &[fd]).await?;
        }
        for pod in &pods {
            let listeners: Vec<&OwnedFd> = pod.listeners.iter().collect();
            let message = Message::Pod {
                pod: pod.pod.clone(),
                netns: pod.netns,
            };
            wire::send(socket, &message, &listeners).await?;
        }
        wire::send(socket, &Message::Done, &[]).await?;
        info!(
            pods = pods.len(),
            "sockets handed over; waiting until the new proxy is ready"
        );
        // No deadline: the successor gets ready in its own time (config,
        // certificates), and its exit ends the wait.
        match wire::recv(socket).await?.0 {
            Message::Taken => Ok(()),
            other => Err(HandoverError::Malformed(format!(
                "expected Taken, got {other:?}"
            ))),
        }
    };
    match given.await {
        Ok(()) => {
            giver.listening.set(ListeningState::Released);
            giver.handed_over.send_replace(true);
            if let Err(error) = wire::send(socket, &Message::Released, &[]).await {
                warn!(%error, "telling the new proxy of the release failed");
            }
            info!("the new proxy took over: this one accepts nothing more and drains");
            Ok(())
        }
        Err(error) => {
            giver.listening.set(ListeningState::Accepting);
            if let Some(pods) = &giver.pods {
                let _ = pods.send(PodsRequest::Thaw).await;
            }
            Err(error)
        }
    }
}

/// The served pods, frozen; none if the pods' task is gone (the data plane
/// is stopping: the successor then finds and serves them itself).
async fn freeze(pods: Option<&mpsc::Sender<PodsRequest>>) -> Vec<HandedPod> {
    let Some(pods) = pods else {
        return Vec::new();
    };
    let (reply, frozen) = oneshot::channel();
    if pods.send(PodsRequest::Freeze(reply)).await.is_err() {
        return Vec::new();
    }
    frozen.await.unwrap_or_default()
}
