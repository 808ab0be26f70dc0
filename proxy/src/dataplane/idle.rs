//! Idle timeouts: a stream wrapper that notes when bytes last moved, and a
//! timer that fires once none have for a while.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved through the streams it watches.
#[derive(Clone, Debug)]
pub struct Activity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Milliseconds after `start` of the last transfer.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            inner: Arc::new(Inner {
                start: Instant::now(),
                last: AtomicU64::new(0),
            }),
        }
    }
}

impl Activity {
    /// Wraps `stream`: every read or write that moves bytes counts.
    pub fn watch<S>(&self, stream: S) -> Watched<S> {
        Watched {
            inner: stream,
            activity: self.clone(),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.inner.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.last.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.inner.start + Duration::from_millis(self.inner.last.load(Ordering::Relaxed))
    }
}

/// Completes once `activity` has seen no transfer for `idle`; never when
/// `idle` is `None`.
pub async fn idle_timeout(activity: &Activity, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let deadline = activity.last() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream whose transfers an [`Activity`] notes.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S: crate::copy::Abort> crate::copy::Abort for Watched<S> {
    fn abort(&mut self) {
        self.inner.abort();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn fires_only_after_a_quiet_period() {
        let activity = Activity::default();
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = activity.watch(a);
        let idle = Some(Duration::from_secs(10));
        // Traffic every 6 s keeps it from firing.
        for _ in 0..3 {
            tokio::select! {
                () = idle_timeout(&activity, idle) => panic!("fired while busy"),
                () = tokio::time::sleep(Duration::from_secs(6)) => {}
            }
            a.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            b.read_exact(&mut byte).await.unwrap();
        }
        let quiet_from = Instant::now();
        idle_timeout(&activity, idle).await;
        assert!(Instant::now() - quiet_from >= Duration::from_secs(10));
        tokio::select! {
            () = idle_timeout(&activity, None) => panic!("no timeout never fires"),
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
