//! Graceful drain: on shutdown, stop accepting, give open connections a
//! deadline to finish, then let the runtime close what is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Shared by the listeners and every connection they serve.
#[derive(Clone, Debug)]
pub struct Drain {
    draining: watch::Receiver<bool>,
    open: Arc<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    count: AtomicUsize,
    closed: Notify,
}

/// Starts a drain; kept by whoever decides to shut down.
#[derive(Debug)]
pub struct DrainTrigger {
    draining: watch::Sender<bool>,
    open: Arc<OpenConnections>,
}

/// Held by a connection for its lifetime.
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Arc<OpenConnections>,
}

/// A drain signal and its trigger.
pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    let open = Arc::new(OpenConnections::default());
    (
        DrainTrigger {
            draining: tx,
            open: open.clone(),
        },
        Drain { draining: rx, open },
    )
}

impl Drain {
    /// Resolves when draining starts; listeners stop accepting then.
    pub async fn started(&self) {
        let mut draining = self.draining.clone();
        // An error means the trigger is gone, which also ends the proxy.
        let _ = draining.wait_for(|draining| *draining).await;
    }

    /// The raw signal (true once draining), for code that takes a watch.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.open.count.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard {
            open: self.open.clone(),
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.open.count.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.open.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.open.closed.notify_waiters();
        }
    }
}

impl DrainTrigger {
    /// The drain signal (true once draining).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Stops the listeners and waits until every connection has closed or
    /// `deadline` has passed; returns how many were still open.
    pub async fn drain(self, deadline: Duration) -> usize {
        let _ = self.draining.send(true);
        let all_closed = async {
            loop {
                let closed = self.open.closed.notified();
                if self.open.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                closed.await;
            }
        };
        let _ = tokio::time::timeout(deadline, all_closed).await;
        self.open.count.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_open_connections_until_they_close() {
        let (trigger, drain) = channel();
        let guard = drain.track();
        let listener = drain.clone();
        let stopped = tokio::spawn(async move { listener.started().await });
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(guard);
        });
        assert_eq!(trigger.drain(Duration::from_secs(30)).await, 0);
        stopped.await.unwrap();
        closer.await.unwrap();
        assert!(drain.is_draining());
    }

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        let (trigger, drain) = channel();
        let _stuck = drain.track();
        assert_eq!(trigger.drain(Duration::from_millis(10)).await, 1);
    }
}
