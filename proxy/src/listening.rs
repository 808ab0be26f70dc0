//! Whose turn it is to accept on the node's listening sockets, when a new
//! proxy process takes them over from this one (see [`crate::handover`]).
//!
//! A listening socket handed to a successor is one socket with one accept
//! queue, open in both processes: whichever calls `accept` gets the next
//! connection, and nothing is lost between them. So this process only has
//! to stop calling `accept` at the right moment:
//!
//! - `Accepting`: the normal state;
//! - `Paused`: a successor holds the sockets and is starting; it answers
//!   the node's endpoints (readiness, admin, metrics, the CNI plugin)
//!   alone, while the pods' listeners are served by both;
//! - `Released`: the successor serves; this process accepts nothing more
//!   and lets go of its copies (its open connections drain).
//!
//! Without a successor nothing ever leaves `Accepting`.
//!
//! A leaf module: the accept loops (`http_server`, `cni_api`, the data
//! plane's listeners) follow it, `handover` sets it.

use tokio::sync::watch;

/// The state of this process's listening sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListeningState {
    /// This process accepts on all of them.
    Accepting,
    /// A successor is starting: only the pods' listeners accept here.
    Paused,
    /// The successor took them over: nothing accepts here.
    Released,
}

/// Sets the state; held by the hand-over.
#[derive(Debug)]
pub struct ListeningControl(watch::Sender<ListeningState>);

/// Followed by every accept loop.
#[derive(Clone, Debug)]
pub struct Listening(watch::Receiver<ListeningState>);

/// A new control in `Accepting`, and its first follower.
pub fn channel() -> (ListeningControl, Listening) {
    let (tx, rx) = watch::channel(ListeningState::Accepting);
    (ListeningControl(tx), Listening(rx))
}

impl ListeningControl {
    /// Moves to `state` (`Released` is final: nothing leaves it).
    pub fn set(&self, state: ListeningState) {
        self.0.send_if_modified(|current| {
            let changed = *current != state && *current != ListeningState::Released;
            if changed {
                *current = state;
            }
            changed
        });
    }

    /// The state now.
    pub fn state(&self) -> ListeningState {
        *self.0.borrow()
    }
}

impl Listening {
    /// The state now.
    pub fn state(&self) -> ListeningState {
        *self.0.borrow()
    }

    /// Resolves once the sockets are released to a successor; never if the
    /// control is gone without that (the process is ending anyway).
    pub async fn released(&self) {
        self.wait_for(|state| state == ListeningState::Released)
            .await;
    }

    /// Resolves once this process no longer accepts on the node's
    /// endpoints (paused for a successor, or released to it).
    pub async fn node_endpoints_left(&self) {
        self.wait_for(|state| state != ListeningState::Accepting)
            .await;
    }

    /// For the node's endpoints (readiness, admin, metrics, the CNI
    /// socket): the next thing `accept` gives while it is this process's
    /// turn (waiting while paused); `None` once released. `accept` must be
    /// cancel-safe (tokio's listeners' `accept` is).
    pub async fn node_endpoint_accept<F, Fut, T>(&self, mut accept: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        loop {
            self.wait_for(|state| state != ListeningState::Paused).await;
            if self.state() == ListeningState::Released {
                return None;
            }
            tokio::select! {
                accepted = accept() => return Some(accepted),
                () = self.node_endpoints_left() => {}
            }
        }
    }

    async fn wait_for(&self, wanted: impl Fn(ListeningState) -> bool) {
        let mut states = self.0.clone();
        if states.wait_for(|state| wanted(*state)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How one of the proxy's tasks ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEnd {
    /// It stopped, which it should not (named).
    Stopped(&'static str),
    /// Its sockets went to a successor: its work is done.
    HandedOver(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn node_endpoints_wait_while_paused_and_stop_once_released() {
        let (control, listening) = channel();
        assert_eq!(
            listening.node_endpoint_accept(|| async { 1 }).await,
            Some(1)
        );
        control.set(ListeningState::Paused);
        let waiting = tokio::spawn({
            let listening = listening.clone();
            async move { listening.node_endpoint_accept(|| async { 2 }).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        control.set(ListeningState::Accepting);
        assert_eq!(waiting.await.ok(), Some(Some(2)));

        // An accept in progress ends when the turn does.
        let pending = tokio::spawn({
            let listening = listening.clone();
            async move {
                listening
                    .node_endpoint_accept(std::future::pending::<()>)
                    .await
            }
        });
        control.set(ListeningState::Released);
        assert_eq!(pending.await.ok(), Some(None));
        listening.released().await;
        // Released is final.
        control.set(ListeningState::Accepting);
        assert_eq!(listening.state(), ListeningState::Released);
    }
}
