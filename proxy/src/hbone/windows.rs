//! The flow-control windows of HBONE connections, and the node-wide memory
//! budget they are granted from.
//!
//! A connection's receive window is how much its peer may send before the
//! proxy reads: h2 keeps what arrived until the tunnel's reader takes it,
//! so a peer whose tunnel target stops reading can make the proxy hold the
//! whole window. Every connection, served or dialed, therefore takes its
//! window out of one budget: the full window while the full windows take
//! at most half the budget and the budget has room, else the smaller
//! floor while the budget has room for it, else no connection at all.
//! Capping full windows at half means a few connections with full windows
//! cannot leave the others without any.
//! The window goes back to the budget when the connection ends. The worst
//! the peers can make the proxy hold is the budget.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::tuning::{
    BufferSizes, CONNECTION_WINDOW, MAX_STREAMS_PER_CONNECTION, SEND_BUFFER, STREAM_WINDOW,
};

/// The window sizes HBONE connections ask for, and the budget they share.
/// Cheap to clone; clones share the budget.
#[derive(Clone, Debug)]
pub struct Windows {
    /// Each `CONNECT` stream's receive window, in bytes.
    pub stream: u32,
    /// A connection's receive window while the budget has it, in bytes.
    pub connection: u32,
    /// A connection's receive window once the budget cannot give the full
    /// one, in bytes.
    pub floor: u32,
    /// Streams a served connection may carry at once.
    pub max_streams: u32,
    /// What one stream may queue for sending beyond what the peer has
    /// read, in bytes.
    pub send_buffer: u32,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    limit: u64,
    reserved: Mutex<Reserved>,
}

#[derive(Debug, Default)]
struct Reserved {
    /// By every window.
    all: u64,
    /// By full windows (larger than the floor).
    full: u64,
}

impl Windows {
    /// Windows of these sizes within `budget` bytes, all connections
    /// together. The floor is kept at or below the full window.
    pub fn new(stream: u32, connection: u32, floor: u32, max_streams: u32, budget: u64) -> Windows {
        Windows {
            stream,
            connection,
            floor: floor.min(connection),
            max_streams,
            send_buffer: SEND_BUFFER,
            budget: Arc::new(Budget {
                limit: budget,
                reserved: Mutex::default(),
            }),
        }
    }

    /// The same, queueing at most `bytes` per stream for sending.
    pub fn with_send_buffer(mut self, bytes: u32) -> Windows {
        self.send_buffer = bytes;
        self
    }

    /// A window for one more connection: the full one, the floor, or none
    /// when the budget cannot give even that.
    pub fn reserve(&self) -> Option<Window> {
        let budget = &self.budget;
        let mut reserved = budget.lock();
        let fits = |size: u32| reserved.all + u64::from(size) <= budget.limit;
        let size = if fits(self.connection)
            && reserved.full + u64::from(self.connection) <= budget.limit / 2
        {
            self.connection
        } else if fits(self.floor) {
            self.floor
        } else {
            return None;
        };
        reserved.all += u64::from(size);
        let full = size > self.floor;
        if full {
            reserved.full += u64::from(size);
        }
        Some(Window {
            connection: size,
            stream: self.stream.min(size),
            send_buffer: self.send_buffer,
            full,
            budget: Arc::clone(budget),
        })
    }

    /// Bytes the windows of open connections take now.
    pub fn reserved(&self) -> u64 {
        self.budget.lock().all
    }
}

impl Default for Windows {
    /// ztunnel's sizes, with no budget.
    fn default() -> Windows {
        let max_streams = u32::try_from(MAX_STREAMS_PER_CONNECTION).unwrap_or(u32::MAX);
        Windows::new(
            STREAM_WINDOW,
            CONNECTION_WINDOW,
            CONNECTION_WINDOW,
            max_streams,
            u64::MAX,
        )
    }
}

impl Budget {
    fn lock(&self) -> MutexGuard<'_, Reserved> {
        // Each change is whole under the lock: a panic elsewhere leaves
        // the counts right.
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's windows, reserved from the budget until dropped.
#[derive(Debug)]
pub struct Window {
    /// The connection's receive window.
    pub connection: u32,
    /// Each stream's receive window (no larger than the connection's).
    pub stream: u32,
    /// What each stream may queue for sending.
    pub send_buffer: u32,
    full: bool,
    budget: Arc<Budget>,
}

impl Window {
    /// The sizes the HTTP/2 builders take.
    pub(crate) fn sizes(&self) -> BufferSizes {
        BufferSizes {
            stream_window: self.stream,
            connection_window: self.connection,
            send_buffer: usize::try_from(self.send_buffer).unwrap_or(usize::MAX),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let mut reserved = self.budget.lock();
        let size = u64::from(self.connection);
        reserved.all = reserved.all.saturating_sub(size);
        if self.full {
            reserved.full = reserved.full.saturating_sub(size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_windows_from_half_the_budget_floors_from_the_rest_then_none() {
        let windows = Windows::new(4096, 16_384, 1024, 100, 40_960);
        let full = windows.reserve();
        assert_eq!(
            full.as_ref().map(|w| (w.connection, w.stream)),
            Some((16_384, 4096))
        );
        let mut floors = Vec::new();
        while let Some(window) = windows.reserve() {
            assert_eq!((window.connection, window.stream), (1024, 1024));
            floors.push(window);
        }
        assert_eq!(floors.len(), 24, "the floors fill the budget");
        assert_eq!(windows.reserved(), 40_960);
        drop(full);
        assert_eq!(windows.reserve().map(|w| w.connection), Some(16_384));
        drop(floors);
        assert_eq!(windows.reserved(), 0);
    }
}
