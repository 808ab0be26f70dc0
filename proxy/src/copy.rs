//! Copying a proxied connection both ways, with as little memory per
//! connection as the traffic allows.
//!
//! A copy buffer per direction and connection (tokio's `copy_bidirectional`)
//! costs its size for every open connection, idle or not; 1,000 idle
//! connections with 64 KiB buffers hold 128 MB. Here reads go into one
//! scratch buffer per thread, and whatever the other side accepts at once is
//! written straight from it: an idle connection, or one carrying requests and
//! responses the other side takes whole, holds no buffer at all. Only when the
//! writer pushes back does a direction keep the rest in a buffer of its own,
//! and it keeps reading into that buffer while the transfer stays busy, so
//! bulk data is not copied twice; the buffer is freed when the direction next
//! waits for data.
//!
//! The scratch buffer is large ([`BUFFER_SIZE`]) because on a small node the
//! cost of bulk transfer is system calls and wake-ups, not bytes copied.
//!
//! Held buffers of that size come out of a node-wide budget
//! ([`limit_held_buffers`]): a pod whose peer stops reading can make the
//! proxy hold a buffer per direction and connection. Once the budget is
//! used up, a direction reads [`SMALL_READ`] at a time, so what it can
//! hold beyond the budget is that much.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read at once, per direction: the scratch buffer and a held buffer.
pub const BUFFER_SIZE: usize = 256 * 1024;

/// Bytes read at once, per direction, once the held-buffer budget is used
/// up: also the most a direction then holds.
pub const SMALL_READ: usize = 16 * 1024;

/// The full-size held buffers of every connection, within a limit.
struct HeldBudget {
    limit: AtomicU64,
    held: AtomicU64,
}

static HELD_BUDGET: HeldBudget = HeldBudget {
    limit: AtomicU64::new(u64::MAX),
    held: AtomicU64::new(0),
};

/// Sets how many bytes the full-size held buffers of all connections may
/// take together (the proxy's `--held-buffer-budget-mib`).
pub fn limit_held_buffers(bytes: u64) {
    HELD_BUDGET.limit.store(bytes, Ordering::Relaxed);
}

impl HeldBudget {
    /// Room for one full-size buffer, if the budget has it.
    fn reserve(&'static self) -> Option<Reservation> {
        let size = BUFFER_SIZE as u64;
        let limit = self.limit.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(size).filter(|&total| total <= limit)
            })
            .ok()
            .map(|_| Reservation(self))
    }
}

/// One full-size buffer's room in the budget, given back when dropped.
struct Reservation(&'static HeldBudget);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.held.fetch_sub(BUFFER_SIZE as u64, Ordering::AcqRel);
    }
}

/// What a direction holds while its writer pushes back: a full-size
/// buffer with its room in the budget, or a small one past the budget.
struct Held {
    bytes: Box<[u8]>,
    _room: Option<Reservation>,
}

/// Held buffers a thread keeps for reuse. A bulk transfer takes and returns
/// one each time its writer pushes back; allocating it anew each time costs
/// an `mmap`, page faults and a `munmap` (glibc maps allocations this big).
const SPARE_BUFFERS: usize = 4;

thread_local! {
    /// Allocated on a thread's first copy; never held across an `.await`.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(new_buffer());
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn new_buffer() -> Box<[u8]> {
    vec![0; BUFFER_SIZE].into_boxed_slice()
}

/// A held buffer: a spare one if the thread has it.
fn take_buffer() -> Box<[u8]> {
    SPARE.with_borrow_mut(Vec::pop).unwrap_or_else(new_buffer)
}

/// Keeps a full-size `held` buffer for the next direction that needs one,
/// up to [`SPARE_BUFFERS`]; frees it otherwise. Its room in the budget is
/// given back either way.
fn give_back(held: Held) {
    if held.bytes.len() != BUFFER_SIZE {
        return;
    }
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_BUFFERS {
            spare.push(held.bytes);
        }
    });
}

/// A connection that can end as a failure, so that its peer learns the
/// transfer was cut short instead of reading a clean end: a TCP reset, an
/// HBONE stream reset with `CONNECT_ERROR`. RFC 9113 (8.5) asks exactly
/// this of a `CONNECT` proxy: a TCP error becomes a stream reset with
/// `CONNECT_ERROR`, a stream or connection error becomes a TCP reset.
pub trait Abort {
    /// Makes this connection end as a failure when it is dropped (or now).
    fn abort(&mut self);
}

impl Abort for tokio::net::TcpStream {
    fn abort(&mut self) {
        reset_on_close(self);
    }
}

/// Makes closing `stream` a reset: its peer learns at once that the
/// connection was refused or cut, and the close never blocks (a socket that
/// lingers for zero seconds sends a reset when it is closed).
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// [`copy_bidirectional`], and if it fails, both connections end as
/// failures ([`Abort`]): a pod whose peer reset, or whose tunnel broke,
/// sees a reset too, never a clean end of a truncated transfer.
pub async fn copy_or_abort<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Abort + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Abort + Unpin + ?Sized,
{
    let copied = copy_bidirectional(a, b).await;
    if copied.is_err() {
        a.abort();
        b.abort();
    }
    copied
}

/// Copies `a` to `b` and `b` to `a` until both directions have reached EOF,
/// half-closing each writer when its reader ends. Returns the bytes copied
/// (a to b, b to a); the first error ends both directions.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new(&HELD_BUDGET);
    let mut b_to_a = Direction::new(&HELD_BUDGET);
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, backward) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of a copy.
struct Direction {
    /// Read but not yet written, in `held[start..end]`, when the writer
    /// pushed back; kept (and read into) while the transfer is busy.
    held: Option<Held>,
    budget: &'static HeldBudget,
    start: usize,
    end: usize,
    read_done: bool,
    shut_down: bool,
    /// Written since the writer was last flushed.
    need_flush: bool,
    copied: u64,
}

impl Direction {
    fn new(budget: &'static HeldBudget) -> Direction {
        Direction {
            held: None,
            budget,
            start: 0,
            end: 0,
            read_done: false,
            shut_down: false,
            need_flush: false,
            copied: 0,
        }
    }

    /// Ready with the bytes copied once the reader has ended and the writer
    /// is shut down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.shut_down {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            ready!(self.poll_write_held(cx, writer.as_mut()))?;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.shut_down = true;
                return Poll::Ready(Ok(self.copied));
            }
            let read = match self.held.as_mut() {
                // Busy: read straight into our own buffer.
                Some(held) => {
                    let mut buf = ReadBuf::new(&mut held.bytes);
                    match reader.as_mut().poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) => {
                            let n = buf.filled().len();
                            (self.start, self.end) = (0, n);
                            Poll::Ready(Ok(n))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => {
                            // Caught up: nothing held, so give the buffer back.
                            if let Some(held) = self.held.take() {
                                give_back(held);
                            }
                            Poll::Pending
                        }
                    }
                }
                None => self.poll_read_through_scratch(cx, reader.as_mut(), writer.as_mut()),
            };
            match read {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Writes out what is held; Ready once nothing is.
    fn poll_write_held<W>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        let Some(held) = self.held.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        while self.start < self.end {
            let n = ready!(
                writer
                    .as_mut()
                    .poll_write(cx, &held.bytes[self.start..self.end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            self.start += n;
            self.copied += n as u64;
            self.need_flush = true;
        }
        (self.start, self.end) = (0, 0);
        Poll::Ready(Ok(()))
    }

    /// Reads into the thread's scratch buffer and writes what the writer
    /// takes now; the rest moves into a held buffer. Reads the whole
    /// scratch buffer only when the budget has room to hold it, else
    /// [`SMALL_READ`]. Ready with the bytes read (0 at EOF).
    fn poll_read_through_scratch<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let room = self.budget.reserve();
        let size = if room.is_some() {
            BUFFER_SIZE
        } else {
            SMALL_READ
        };
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(&mut scratch[..size]);
            ready!(reader.poll_read(cx, &mut buf))?;
            let data = buf.filled();
            let mut written = 0;
            while written < data.len() {
                match writer.as_mut().poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            self.copied += written as u64;
            if written < data.len() {
                let rest = &data[written..];
                // Past the budget, a SMALL_READ-sized buffer: while the
                // writer pushes back, the direction reads into it.
                let mut bytes = match room {
                    Some(_) => take_buffer(),
                    None => vec![0; SMALL_READ].into_boxed_slice(),
                };
                bytes[..rest.len()].copy_from_slice(rest);
                (self.start, self.end) = (0, rest.len());
                self.held = Some(Held { bytes, _room: room });
            }
            Poll::Ready(Ok(data.len()))
        })
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            give_back(held);
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the other side accepted no bytes")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Two proxied pairs: (client, proxy side a) and (proxy side b, server).
    fn pipes(capacity: usize) -> [tokio::io::DuplexStream; 4] {
        let (client, a) = duplex(capacity);
        let (b, server) = duplex(capacity);
        [client, a, b, server]
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_half_closes_propagate() {
        let [mut client, mut a, mut b, mut server] = pipes(64);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        // The server still answers after the client's half-close.
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response");
        assert_eq!(copy.await.unwrap().unwrap(), (7, 8));
    }

    #[tokio::test]
    async fn a_slow_reader_gets_everything_in_order() {
        // A 1 KiB pipe pushes back on nearly every write, so data goes
        // through held buffers as well as the scratch buffer.
        let [mut client, mut a, mut b, mut server] = pipes(1024);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let data: Vec<u8> = (0..3 * BUFFER_SIZE + 17).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut received = Vec::new();
        let mut chunk = [0u8; 700];
        loop {
            let n = server.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            tokio::task::yield_now().await;
        }
        assert_eq!(received.len(), data.len());
        assert!(
            received == data,
            "the bytes arrived changed or out of order"
        );
        server.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        assert_eq!(copy.await.unwrap().unwrap(), (data.len() as u64, 0));
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let [_client, mut a, mut b, _server] = pipes(64);
        let mut forward = Direction::new(&HELD_BUDGET);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let poll = forward.poll_copy(&mut cx, Pin::new(&mut a), Pin::new(&mut b));
        assert!(poll.is_pending());
        assert!(forward.held.is_none());
    }

    #[tokio::test]
    async fn past_the_budget_a_pushed_back_direction_holds_a_small_buffer() {
        let budget: &'static HeldBudget = Box::leak(Box::new(HeldBudget {
            limit: AtomicU64::new(BUFFER_SIZE as u64),
            held: AtomicU64::new(0),
        }));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Two directions whose writers take 1 KiB and then push back.
        let mut pushed_back = Vec::new();
        for _ in 0..2 {
            let (mut client, mut a) = duplex(4 * BUFFER_SIZE);
            let (mut b, server) = duplex(1024);
            client.write_all(&vec![7; 2 * BUFFER_SIZE]).await.unwrap();
            let mut direction = Direction::new(budget);
            let poll = direction.poll_copy(&mut cx, Pin::new(&mut a), Pin::new(&mut b));
            assert!(poll.is_pending());
            pushed_back.push((direction, client, a, b, server));
        }
        let held = |d: &Direction| d.held.as_ref().map(|h| h.bytes.len());
        assert_eq!(held(&pushed_back[0].0), Some(BUFFER_SIZE));
        assert_eq!(held(&pushed_back[1].0), Some(SMALL_READ));
        assert_eq!(pushed_back[1].0.end, SMALL_READ - 1024, "the rest is held");
        assert_eq!(budget.held.load(Ordering::Relaxed), BUFFER_SIZE as u64);
        drop(pushed_back);
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy_with_the_error() {
        let [client, mut a, mut b, server] = pipes(64);
        drop(server);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let mut client = client;
        // Writing to a dropped peer fails: the copy reports it.
        let _ = client.write_all(b"into the void").await;
        assert!(copy.await.unwrap().is_err());
    }
}
