//! Rate limits for the warnings a pod or a peer can trigger (a refused
//! connection, a failed handshake, a spoofed address). A flood of them
//! would otherwise become a flood of log lines: disk, the node's log
//! pipeline, and the proxy's time. Per cause, the first few in each
//! interval are logged; the rest are counted, and the next warning logged
//! for the cause says how many were left out.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Warnings allowed per cause and interval.
#[derive(Debug)]
pub struct WarningLimiter {
    per_interval: u32,
    interval: Duration,
    causes: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl WarningLimiter {
    /// At most `per_interval` warnings of each cause every `interval`
    /// (0: none at all).
    pub fn new(per_interval: u32, interval: Duration) -> WarningLimiter {
        WarningLimiter {
            per_interval,
            interval,
            causes: Mutex::default(),
        }
    }

    /// Whether a warning of `cause` may be logged now: `Some(n)`, with `n`
    /// the warnings of the cause left out since the last one logged, or
    /// `None` (the warning is counted as left out).
    pub fn allow(&self, cause: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut causes = self.causes.lock().unwrap_or_else(PoisonError::into_inner);
        let window = causes.entry(cause).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= self.interval {
            window.started = now;
            window.logged = 0;
        }
        if window.logged < self.per_interval {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_one_cause_is_cut_short_and_the_next_warning_says_by_how_much() {
        let limiter = WarningLimiter::new(2, Duration::from_secs(1));
        assert_eq!(limiter.allow("pod_limit"), Some(0));
        assert_eq!(limiter.allow("pod_limit"), Some(0));
        for _ in 0..1000 {
            assert_eq!(limiter.allow("pod_limit"), None);
        }
        // Another cause has its own allowance.
        assert_eq!(limiter.allow("spoofed_address"), Some(0));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limiter.allow("pod_limit"), Some(1000));
        assert_eq!(limiter.allow("pod_limit"), Some(0));
        assert_eq!(limiter.allow("pod_limit"), None);
    }
}
