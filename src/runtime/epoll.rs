//! The epoll backend's sockets: tokio's (mio, epoll), with the same operations as the
//! io_uring backend's (`uring::net`), for hosts where io_uring is not allowed (Docker's
//! and containerd's default seccomp profiles, `kernel.io_uring_disabled`, gVisor).
//!
//! Reads and waiting writes wait for readiness and then make the system call; the
//! non-blocking writes of the outbox go through the descriptor, as on io_uring.

use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Bytes, BytesMut};
use socket2::SockRef;

use super::buf::{IOV_MAX, consume_written};

/// The largest read buffer [`TcpStream::read`] lets go of while it waits (the
/// small and medium tiers of `buf`); larger ones come from the core's pool and are
/// only used when bytes are known to be waiting.
pub(crate) const LAZY_READ_MAX: usize = super::buf::MEDIUM_MAX;

/// A listening socket on the worker's tokio reactor.
pub(crate) struct TcpListener {
    io: tokio::net::TcpListener,
}

impl TcpListener {
    /// Must run inside the worker's runtime (the socket is registered with its reactor).
    pub(crate) fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            io: tokio::net::TcpListener::from_std(listener)?,
        })
    }

    pub(crate) async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (io, peer) = self.io.accept().await?;
        Ok((TcpStream { io }, peer))
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

/// A connected TCP socket, non-blocking, on the worker's tokio reactor.
pub(crate) struct TcpStream {
    io: tokio::net::TcpStream,
}

impl TcpStream {
    /// Reads into the spare capacity of `buf` (after its length), waiting until the
    /// socket has something. Returns the bytes read (0: the peer closed) and the buffer.
    /// An empty buffer of at most [`LAZY_READ_MAX`] bytes is not held while it waits:
    /// readiness needs no buffer (unlike an io_uring read), so an idle connection holds
    /// none, and one of the same capacity is allocated once the socket is readable.
    pub(crate) async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let lazy = buf.is_empty() && buf.capacity() <= LAZY_READ_MAX;
        let capacity = buf.capacity();
        let mut held = (!lazy).then_some(buf);
        loop {
            if let Err(e) = self.io.readable().await {
                return (Err(e), held.unwrap_or_default());
            }
            let mut buf = held
                .take()
                .unwrap_or_else(|| BytesMut::with_capacity(capacity));
            match self.io.try_read_buf(&mut buf) {
                Ok(n) => return (Ok(n), buf),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    held = (!lazy).then_some(buf);
                }
                Err(e) => return (Err(e), buf),
            }
        }
    }

    /// Writes all of `chunks`, in order, waiting for room. Gives back the emptied
    /// vector for reuse.
    pub(crate) async fn writev(&self, mut chunks: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        while !chunks.is_empty() {
            if let Err(e) = self.io.writable().await {
                return (Err(e), chunks);
            }
            let written = {
                let slices: Vec<IoSlice<'_>> = chunks
                    .iter()
                    .take(IOV_MAX)
                    .map(|chunk| IoSlice::new(chunk))
                    .collect();
                self.io.try_write_vectored(&slices)
            };
            let written = match written {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), chunks),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), chunks),
            };
            consume_written(&mut chunks, written);
        }
        (Ok(()), chunks)
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        SockRef::from(&self.io).shutdown(how)
    }
}

impl AsRawFd for TcpStream {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}
