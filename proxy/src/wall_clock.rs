//! Certificates live on the wall clock (`notAfter` is a date), tokio timers
//! on a monotonic one. These helpers bridge the two and print dates the way
//! the admin endpoint and the logs show them.

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Sleeps towards a wall-clock time are cut into pieces this long, so a
/// clock that jumps (suspend, NTP step) delays a wake-up by at most this.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Sleeps until the wall clock shows `at` (returns at once if it has).
pub async fn sleep_until(at: SystemTime) {
    while let Ok(left) = at.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(CHECK_EVERY)).await;
    }
}

/// `at` as RFC 3339 in UTC to the second, e.g. `2025-01-31T12:00:00Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let utc = OffsetDateTime::from(at);
    utc.replace_nanosecond(0)
        .unwrap_or(utc)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{at:?}"))
}

/// Whole seconds from `now` until `at`; negative once `at` has passed.
pub fn seconds_until(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(behind) => i64::try_from(behind.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_as_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn seconds_until_is_signed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(seconds_until(now + Duration::from_secs(90), now), 90);
        assert_eq!(seconds_until(now - Duration::from_secs(90), now), -90);
    }
}
