//! Exponential backoff with jitter, for everything the proxy retries against
//! the control plane: a thousand node proxies that lose the control plane
//! together must not come back in lockstep.

use std::time::Duration;

/// Delays that double from `initial` up to `max`; each delay is drawn at
/// random from the upper half of the current step ("equal jitter"), so the
/// wait is never less than half the step and never more than `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            step: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Starts again from the initial step, after a success.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_stop_at_max() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        let mut step = Duration::from_millis(100);
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay >= step / 2 && delay <= step, "{delay:?} for {step:?}");
            step = (step * 2).min(Duration::from_secs(15));
        }
        assert!(backoff.next_delay() <= Duration::from_secs(15));
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
