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

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read at once, per direction: the scratch buffer and a held buffer.
pub const BUFFER_SIZE: usize = 256 * 1024;

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

/// Keeps `buffer` for the next direction that needs one, up to
/// [`SPARE_BUFFERS`]; frees it otherwise.
fn give_back(buffer: Box<[u8]>) {
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_BUFFERS {
            spare.push(buffer);
        }
    });
}

/// Copies `a` to `b` and `b` to `a` until both directions have reached EOF,
/// half-closing each writer when its reader ends. Returns the bytes copied
/// (a to b, b to a); the first error ends both directions.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
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
#[derive(Default)]
struct Direction {
    /// Read but not yet written, in `held[start..end]`, when the writer
    /// pushed back; kept (and read into) while the transfer is busy.
    held: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    read_done: bool,
    shut_down: bool,
    /// Written since the writer was last flushed.
    need_flush: bool,
    copied: u64,
}

impl Direction {
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
                    let mut buf = ReadBuf::new(held);
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
            let n = ready!(writer.as_mut().poll_write(cx, &held[self.start..self.end]))?;
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
    /// takes now; the rest moves into a held buffer. Ready with the bytes
    /// read (0 at EOF).
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
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
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
                let mut held = take_buffer();
                held[..rest.len()].copy_from_slice(rest);
                (self.start, self.end) = (0, rest.len());
                self.held = Some(held);
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
        let mut forward = Direction::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let poll = forward.poll_copy(&mut cx, Pin::new(&mut a), Pin::new(&mut b));
        assert!(poll.is_pending());
        assert!(forward.held.is_none());
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
