//! The client's transport split in two halves, the read side that holds no buffer while the
//! connection is idle, the bytes already read given back in front (HTTP/2 detection), and the
//! upgraded connection handed to a tunnel.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of a connection's read buffer while a request is read.
pub const READ_CHUNK: usize = 8 * 1024;
/// Below this much room, the read buffer grows by another [`READ_CHUNK`] before a read.
const READ_MIN: usize = 1024;

/// A transport's read half.
pub trait ReadHalf: AsyncRead + Send + Unpin + 'static {
    /// Ready once bytes (or the end) can be read, without a buffer to read them into. A
    /// transport that buffers by itself (TLS) is always ready.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadHalf for tokio::net::tcp::OwnedReadHalf {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl<T: AsyncRead + Send + 'static> ReadHalf for tokio::io::ReadHalf<T> {}

impl<T: AsyncRead + Send + Unpin + 'static> ReadHalf for Prefixed<T> {}

/// A transport's read half as a connection holds it (it moves between the connection and the
/// request body, so its type is one for every transport): a TCP socket's as it is (the common
/// case costs no box of its own), any other boxed.
pub enum ReadIo {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Other(Box<dyn ReadHalf>),
}

impl AsyncRead for ReadIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Self::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl ReadHalf for ReadIo {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(r) => r.poll_ready(cx),
            Self::Other(r) => r.poll_ready(cx),
        }
    }
}

/// A transport's write half.
pub trait WriteHalf: AsyncWrite + Send + Unpin + 'static {
    /// Whether the connection can park when idle (`park.rs`): a plain TCP stream, whose halves
    /// join again ([`WriteHalf::rejoin`]).
    const PARKS: bool = false;

    /// The TCP stream of this half and `read` (`None`: not a plain TCP stream, or not its
    /// halves).
    fn rejoin(self, _read: ReadIo) -> Option<TcpStream>
    where
        Self: Sized,
    {
        None
    }
}

impl WriteHalf for tokio::net::tcp::OwnedWriteHalf {
    const PARKS: bool = true;

    fn rejoin(self, read: ReadIo) -> Option<TcpStream> {
        match read {
            ReadIo::Tcp(read) => read.reunite(self).ok(),
            ReadIo::Other(_) => None,
        }
    }
}

impl<T: AsyncWrite + Send + 'static> WriteHalf for tokio::io::WriteHalf<T> {}

/// A client transport that splits into a read half and a write half.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    type Write: WriteHalf;
    fn split(self) -> (ReadIo, Self::Write);
    /// As [`ReadHalf::poll_ready`], before the split.
    fn poll_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for TcpStream {
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
    fn split(self) -> (ReadIo, Self::Write) {
        let (r, w) = self.into_split();
        (ReadIo::Tcp(r), w)
    }
}

impl Transport for Box<tokio_rustls::server::TlsStream<TcpStream>> {
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (ReadIo, Self::Write) {
        let (r, w) = tokio::io::split(self);
        (ReadIo::Other(Box::new(r)), w)
    }
}

/// The connection's read side: the transport's read half and the bytes read but not yet used
/// (the rest of a head, a body, a pipelined request). Idle with nothing buffered, the buffer
/// goes back to a per-thread pool.
pub struct ReadSide {
    pub io: ReadIo,
    pub buf: BytesMut,
}

impl std::fmt::Debug for ReadSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSide").field("buffered", &self.buf.len()).finish()
    }
}

thread_local! {
    /// Read buffers of connections gone idle, for the next connection that reads on this
    /// thread: a request costs no allocation of its buffer.
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    /// Write buffers, the same way.
    static OUT_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Capacity of a new write buffer (a response head and a small body).
const OUT_CHUNK: usize = 4 * 1024;
/// A write buffer that grew past this goes back to the allocator instead of the pool.
const OUT_KEEP: usize = 16 * 1024;

/// A write buffer (empty): one the thread's pool kept, else a new one.
pub fn take_out() -> Vec<u8> {
    OUT_POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(OUT_CHUNK))
}

/// Gives a write buffer back to the thread's pool (or to the allocator, when large).
pub fn give_out(mut out: Vec<u8>) {
    if out.capacity() == 0 || out.capacity() > OUT_KEEP {
        return;
    }
    out.clear();
    OUT_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(out);
        }
    });
}

/// Buffers a thread keeps (8 KiB each).
const POOL_MAX: usize = 256;

impl ReadSide {
    pub fn new(io: ReadIo, buf: BytesMut) -> Self {
        Self { io, buf }
    }

    /// Reads more into the buffer (growing it when short of room). `Ok(0)`: the client closed.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            self.buf = take_buffer();
        }
        if self.buf.capacity() - self.buf.len() < READ_MIN {
            self.buf.reserve(READ_CHUNK);
        }
        let read = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf);
        std::pin::pin!(read).poll(cx)
    }

    /// Waits until the client sends something, holding no buffer meanwhile if none holds bytes.
    pub fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.release();
        self.io.poll_ready(cx)
    }

    /// Gives an empty buffer back to the pool.
    pub fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            let buf = std::mem::take(&mut self.buf);
            give_buffer(buf);
        }
    }
}

/// A read buffer: one the thread's pool kept, else a new one of [`READ_CHUNK`].
pub fn take_buffer() -> BytesMut {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK))
}

fn give_buffer(mut buf: BytesMut) {
    buf.clear();
    // Only a whole buffer of its own is worth keeping: `try_reclaim` moves the view back to the
    // start of the allocation when nothing else (a request's header values) still shares it.
    if buf.try_reclaim(READ_CHUNK) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(buf);
            }
        });
    }
}

/// A transport with bytes already read from it given back first (the HTTP/2 detection's).
pub struct Prefixed<T> {
    pub prefix: Bytes,
    pub io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(self.prefix.get(..n).unwrap_or_default());
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A client connection after a 101: the bytes it sent after its request head first, then the
/// transport, both ways.
pub struct Upgraded {
    read: Prefixed<ReadIo>,
    write: Pin<Box<dyn AsyncWrite + Send>>,
}

impl Upgraded {
    pub fn new(side: ReadSide, write: Pin<Box<dyn AsyncWrite + Send>>) -> Self {
        Self {
            read: Prefixed {
                prefix: side.buf.freeze(),
                io: side.io,
            },
            write,
        }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_whose_head_was_split_off_goes_back_whole_once_the_head_is_dropped() {
        POOL.with(|p| p.borrow_mut().clear());
        let mut buf = take_buffer();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split_to(18).freeze();
        assert!(buf.capacity() < READ_CHUNK);
        drop(head);
        give_buffer(buf);
        assert_eq!(POOL.with(|p| p.borrow().len()), 1, "kept whole");
        let again = take_buffer();
        assert!(again.capacity() >= READ_CHUNK);
        assert_eq!(POOL.with(|p| p.borrow().len()), 0, "taken from the pool");
        // Still shared: not kept.
        let mut buf = again;
        buf.extend_from_slice(b"abc");
        let held = buf.split_to(3).freeze();
        give_buffer(buf);
        assert_eq!(POOL.with(|p| p.borrow().len()), 0);
        drop(held);
    }
}
