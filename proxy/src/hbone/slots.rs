//! How many tunnel streams a pooled connection carries, whether it may take
//! more, and when it has been idle long enough to close.
//!
//! One small lock per connection, taken when a stream opens or ends; the
//! connection's driver task is woken only when the last stream ends or the
//! connection is retired, never per stream.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The stream slots of one connection.
#[derive(Debug)]
pub(crate) struct StreamSlots {
    state: Mutex<SlotState>,
    changed: Notify,
}

#[derive(Debug)]
struct SlotState {
    active: usize,
    /// No new streams: retired (rotation, GOAWAY, error) or idle-closed.
    closed: bool,
    /// When `active` last dropped to zero (or the connection was made).
    idle_since: Instant,
}

/// One stream's claim on a slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct SlotLease {
    slots: Arc<StreamSlots>,
}

impl StreamSlots {
    pub(crate) fn new() -> Arc<StreamSlots> {
        Arc::new(StreamSlots {
            state: Mutex::new(SlotState {
                active: 0,
                closed: false,
                idle_since: Instant::now(),
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state stays consistent under every panic point (none hold it
        // across a call that can panic), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot, if the connection is open and carries fewer than `limit`.
    pub(crate) fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<SlotLease> {
        let mut state = self.lock();
        if state.closed || state.active >= limit {
            return None;
        }
        state.active += 1;
        Some(SlotLease {
            slots: Arc::clone(self),
        })
    }

    /// Takes no more streams; the connection closes when the last one ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_one();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Streams open right now.
    pub(crate) fn active(&self) -> usize {
        self.lock().active
    }

    /// Returns once the connection has no streams and either was closed or
    /// has had none for `idle_timeout`; in the second case it is now closed,
    /// decided under the lock so no stream can slip in at the last moment.
    /// Meant for a single waiter, the connection's driver.
    pub(crate) async fn until_idle(&self, idle_timeout: Duration) {
        loop {
            let wake_at = {
                let mut state = self.lock();
                if state.active > 0 {
                    None
                } else if state.closed {
                    return;
                } else {
                    let deadline = state.idle_since + idle_timeout;
                    if Instant::now() >= deadline {
                        state.closed = true;
                        return;
                    }
                    Some(deadline)
                }
            };
            match wake_at {
                // Busy: the release of the last stream will notify.
                None => self.changed.notified().await,
                Some(deadline) => {
                    tokio::select! {
                        () = self.changed.notified() => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    fn release(&self) {
        let mut state = self.lock();
        state.active = state.active.saturating_sub(1);
        if state.active == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.changed.notify_one();
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.slots.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_connection_closes_after_being_idle_and_not_while_busy() {
        let slots = StreamSlots::new();
        let lease = slots.try_acquire(2);
        assert!(lease.is_some());
        drop(slots.try_acquire(2));
        let waiting = tokio::time::timeout(IDLE * 6, slots.until_idle(IDLE));
        assert!(waiting.await.is_err(), "busy connections stay open");

        let started = Instant::now();
        drop(lease);
        slots.until_idle(IDLE).await;
        assert!(started.elapsed() >= IDLE);
        assert!(slots.try_acquire(2).is_none(), "closed for new streams");
    }

    #[tokio::test]
    async fn the_limit_and_a_retirement_refuse_new_streams() {
        let slots = StreamSlots::new();
        let first = slots.try_acquire(1);
        assert!(first.is_some());
        assert!(slots.try_acquire(1).is_none());
        slots.close();
        drop(first);
        assert!(slots.try_acquire(1).is_none());
        // Retired and empty: no idle wait.
        let hour = Duration::from_secs(3600);
        let ended = tokio::time::timeout(Duration::from_secs(30), slots.until_idle(hour)).await;
        assert!(ended.is_ok());
        assert_eq!(slots.active(), 0);
        assert!(slots.is_closed());
    }
}
