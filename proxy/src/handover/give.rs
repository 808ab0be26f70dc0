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
use crate::node_state::NodeState;

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
    /// How long a successor may take to say what it wants, and the sending
    /// of the sockets may take.
    pub wait: Duration,
    /// True once this proxy is draining (stopping anyway).
    pub draining: Option<watch::Receiver<bool>>,
    /// The state kept on the node: no longer written once handed over.
    pub state: Option<NodeState>,
    /// This proxy's pod UID (empty: not on Kubernetes).
    pub pod_uid: String,
    /// The pod this proxy took over from, never handed back to.
    pub predecessor_pod_uid: String,
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
/// it was before it came (unless this proxy stopped meanwhile: then the
/// successor keeps everything).
async fn give_to(giver: &Giver, socket: &UnixSeqpacket) -> Result<(), HandoverError> {
    super::check_peer(socket)?;
    let hello = tokio::time::timeout(giver.wait, wire::recv(socket))
        .await
        .map_err(|_| HandoverError::Refused("no Hello in time".into()))??;
    let Message::Hello { pod_uid, .. } = hello.0 else {
        return Err(HandoverError::Malformed(format!(
            "expected Hello, got {:?}",
            hello.0
        )));
    };
    if !pod_uid.is_empty() && pod_uid == giver.predecessor_pod_uid {
        return Err(HandoverError::Refused(format!(
            "pod {pod_uid} is the one this proxy took over from (restarted?): it does not get the sockets back"
        )));
    }
    // The node's endpoints first, so that no CNI request starts here while
    // the pods are frozen.
    giver.listening.set(ListeningState::Paused);
    let pods = match freeze(giver.pods.as_ref()).await {
        Ok(pods) => pods,
        Err(reason) => {
            giver.listening.set(ListeningState::Accepting);
            return Err(HandoverError::Refused(format!(
                "cannot hand the pods over: {reason}"
            )));
        }
    };
    // Stopping anyway: the successor serves from now on, ready or not (a
    // connection waits in the queue for it rather than being reset here).
    if giver
        .draining
        .as_ref()
        .is_some_and(|draining| *draining.borrow())
    {
        giver.listening.set(ListeningState::Released);
    }
    let sent = tokio::time::timeout(giver.wait, async {
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
        let done = Message::Done {
            pod_uid: giver.pod_uid.clone(),
        };
        wire::send(socket, &done, &[]).await
    });
    let given = async {
        sent.await.map_err(|_| {
            HandoverError::Refused("the new proxy did not take the sockets in time".into())
        })??;
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
            if let Some(state) = &giver.state {
                state.retire();
            }
            giver.handed_over.send_replace(true);
            if let Err(error) = wire::send(socket, &Message::Released, &[]).await {
                warn!(%error, "telling the new proxy of the release failed");
            }
            info!("the new proxy took over: this one accepts nothing more and drains");
            Ok(())
        }
        Err(error) if giver.listening.state() == ListeningState::Released => {
            // This proxy stopped during the hand-over and left everything
            // to the successor: whatever became of it, nothing comes back.
            if let Some(state) = &giver.state {
                state.retire();
            }
            Err(error)
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
async fn freeze(pods: Option<&mpsc::Sender<PodsRequest>>) -> Result<Vec<HandedPod>, String> {
    let Some(pods) = pods else {
        return Ok(Vec::new());
    };
    let (reply, frozen) = oneshot::channel();
    if pods.send(PodsRequest::Freeze(reply)).await.is_err() {
        return Ok(Vec::new());
    }
    frozen.await.unwrap_or_else(|_| Ok(Vec::new()))
}
