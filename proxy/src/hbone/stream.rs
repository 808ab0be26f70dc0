//! One HBONE tunnel as a byte stream: an HTTP/2 `CONNECT` stream read and
//! written through `AsyncRead`/`AsyncWrite`, the same type on both sides.
//!
//! Flow control both ways: a write is accepted only up to the send capacity
//! the peer has granted (nothing is buffered beyond it), and received data
//! is released back to the peer only as the reader consumes it, so a slow
//! reader slows the sender instead of filling memory.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::HboneError;
use super::slots::SlotLease;

/// A single write sends at most this much, and asks the peer for at most
/// this much send capacity. It is also the largest buffer a write allocates:
/// glibc's malloc maps and unmaps each allocation of 128 KiB or more, and
/// the page faults that follow cost a bulk transfer a third of its CPU.
const MAX_WRITE: usize = 64 * 1024;

/// Bytes carried by one tunnel, from this side's point of view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Bytes written into the tunnel (to the peer).
    pub sent: u64,
    /// Bytes read out of the tunnel (from the peer).
    pub received: u64,
}

/// One HBONE tunnel: the bytes of one proxied TCP connection.
///
/// `poll_shutdown` half-closes (an empty DATA frame with END_STREAM); the
/// peer's END_STREAM, or its reset with `NO_ERROR` or `CANCEL`, reads as
/// EOF; any other reset (`CONNECT_ERROR` from a peer whose pod reset) is an
/// error. [`Abort`](crate::copy::Abort) resets it with `CONNECT_ERROR`;
/// dropping a tunnel that has not ended both ways resets it with `CANCEL`.
#[derive(Debug)]
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read by the application.
    unread: Bytes,
    /// Memory for the next writes. Once h2 has written the last ones out,
    /// its allocation is reused instead of freed and allocated again (each
    /// fresh allocation of this size costs page faults); dropped on flush,
    /// which the copy calls when it has nothing more to write for now, so an
    /// idle tunnel holds none.
    write_buf: BytesMut,
    read_done: bool,
    write_done: bool,
    /// A failure met after some data was already handed to the reader,
    /// reported on the next read.
    deferred_error: Option<io::Error>,
    stats: TunnelStats,
    /// The client's claim on its pooled connection; `None` on the server.
    _lease: Option<SlotLease>,
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        lease: Option<SlotLease>,
    ) -> HboneStream {
        HboneStream {
            send,
            recv,
            unread: Bytes::new(),
            write_buf: BytesMut::new(),
            read_done: false,
            write_done: false,
            deferred_error: None,
            stats: TunnelStats::default(),
            _lease: lease,
        }
    }

    /// The bytes carried so far.
    pub fn stats(&self) -> TunnelStats {
        self.stats
    }

    /// Moves unread data into `buf`, releasing its flow-control capacity.
    fn take_unread(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.unread.len());
        if n == 0 {
            return;
        }
        buf.put_slice(&self.unread[..n]);
        bytes::Buf::advance(&mut self.unread, n);
        self.stats.received += n as u64;
        // Fails only when the stream is already gone; the data is ours.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// Takes the next chunk from HTTP/2. Ready(true) when there is more to
    /// read, Ready(false) at the end.
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    self.unread = data;
                    return Poll::Ready(Ok(true));
                }
                None => {
                    self.read_done = true;
                    return Poll::Ready(Ok(false));
                }
                Some(Err(e)) if is_graceful_end(&e) => {
                    self.read_done = true;
                    return Poll::Ready(Ok(false));
                }
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
            }
        }
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.deferred_error.take() {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        // Fill `buf` with whatever has already arrived, frame after frame,
        // so a burst of small frames becomes one read (and one write on
        // the other side of the copy), not one wake-up per frame.
        loop {
            this.take_unread(buf);
            if buf.remaining() == 0 || this.read_done {
                return Poll::Ready(Ok(()));
            }
            let got_some = buf.filled().len() > before;
            match this.poll_next_chunk(cx) {
                Poll::Ready(Ok(_more)) => continue,
                Poll::Ready(Err(error)) if got_some => {
                    this.deferred_error = Some(error);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending if got_some => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write to an HBONE tunnel after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len()).min(MAX_WRITE);
                this.write_buf.reserve(n);
                this.write_buf.extend_from_slice(&buf[..n]);
                let data = this.write_buf.split().freeze();
                this.send.send_data(data, false).map_err(stream_error)?;
                this.stats.sent += n as u64;
                return Poll::Ready(Ok(n));
            }
            // Ask for room for this write; the connection assigns capacity
            // as the peer's windows allow, up to the send buffer limit.
            this.send.reserve_capacity(buf.len().min(MAX_WRITE));
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                // The sending half is gone: the peer reset the stream.
                None => {
                    return Poll::Ready(Err(match this.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            HboneError::StreamReset { reason },
                        ),
                        Poll::Ready(Err(e)) => stream_error(e),
                        Poll::Pending => io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the HBONE tunnel was closed by the peer",
                        ),
                    }));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written out by the connection's task.
        self.get_mut().write_buf = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_done {
            this.write_done = true;
            // Give back capacity reserved for writes that will not come.
            this.send.reserve_capacity(0);
            if let Err(e) = this.send.send_data(Bytes::new(), true)
                && !is_graceful_end(&e)
            {
                return Poll::Ready(Err(stream_error(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl crate::copy::Abort for HboneStream {
    /// Resets the stream with `CONNECT_ERROR`: the peer reads an error (and
    /// resets its pod's connection), not the end of the stream.
    fn abort(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
        self.read_done = true;
        self.write_done = true;
    }
}

impl Drop for HboneStream {
    fn drop(&mut self) {
        if !(self.read_done && self.write_done) {
            // A no-op on a stream that is already closed or reset.
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

/// Copies between a tunnel and a local connection until both directions
/// have ended, half-closing each side when the other reaches EOF; a
/// failure aborts both ([`crate::copy::copy_or_abort`]). Returns what was
/// carried even when the copy failed part-way.
pub async fn copy_tunnel<T>(
    tunnel: &mut HboneStream,
    local: &mut T,
) -> (TunnelStats, io::Result<()>)
where
    T: AsyncRead + AsyncWrite + crate::copy::Abort + Unpin + ?Sized,
{
    let result = crate::copy::copy_or_abort(tunnel, local).await;
    (tunnel.stats(), result.map(|_| ()))
}

/// A reset with `NO_ERROR` or `CANCEL` ends a stream rather than breaks it.
fn is_graceful_end(error: &h2::Error) -> bool {
    error.is_reset() && matches!(error.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}

/// An HTTP/2 stream failure as the `io::Error` an `AsyncRead` reports.
fn stream_error(error: h2::Error) -> io::Error {
    if let Some(reason) = error.reason().filter(|_| error.is_reset()) {
        return io::Error::new(
            io::ErrorKind::ConnectionReset,
            HboneError::StreamReset { reason },
        );
    }
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::other(HboneError::Stream { source: error })
}
