//! The transport seam: what the connection core needs from a socket, on either I/O
//! backend. The outbox (`core::outbox`) writes only through [`Transport::try_write`];
//! the drivers (`conn.rs`, `ws.rs`) read and wait through [`Stream`].
//!
//! ```text
//!   proto::Connection ── frames ──▶ Outbox ── IoSlices ──▶ Transport::try_write ──┐
//!   (queue, codec)                 (order, phase)     (one non-blocking send)     │
//!                                                                                 ▼
//!   driver ── Stream::read_boxed(buf) ───────────── bytes in ◀──────────────── socket
//!          ── Stream::writev(rest) (waits for room, WritePhase::Waiting) ──▶      ▲
//!          ── Stream::shutdown ───────────────────────────────────────────────────┘
//!
//!   Stream::Uring: io_uring operations on the core's ring (`uring::net`)
//!   Stream::Epoll: readiness on the core's tokio reactor, then the system call (`epoll`)
//! ```
//!
//! TLS sits here too (`Stream::Tls`, in front of a socket of either backend): what
//! `read_boxed` returns is decrypted, and what the core hands `try_write` or `writev`
//! is encrypted first (`runtime::tls`). Ciphertext the socket did not take waits in
//! the TLS session, goes out before anything else, and shows as
//! [`Transport::backlog`], so the outbox has the driver write it.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use socket2::SockRef;

use crate::runtime::{epoll, tls, uring};

/// A socket the outbox can write to without waiting.
pub(crate) trait Transport {
    /// What a write needs of this socket (its descriptor), copied out once: the outbox
    /// keeps it inline, so that a broadcast pass over 10,000 connections follows no
    /// pointer per connection to find its socket (measured: the pointer chase cost
    /// about a fifth of the loss-free broadcast rate at 10,000 subscribers).
    fn key(&self) -> RawFd;

    /// Writes as much of `slices`, in order, as the socket takes now, without waiting
    /// (`EWOULDBLOCK` when it takes nothing) and without raising `SIGPIPE`. Returns the
    /// bytes written.
    ///
    /// # Safety
    ///
    /// `key` must be what [`Transport::key`] returned for this transport.
    unsafe fn try_write(&self, key: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Bytes this transport still has to send of what it was given (TLS ciphertext the
    /// socket did not take): the driver's write that waits for room sends them.
    fn backlog(&self) -> usize {
        0
    }
}

/// A read in flight: the bytes read (0: the peer closed) and the buffer.
pub(crate) type ReadFuture = Pin<Box<dyn Future<Output = (io::Result<usize>, BytesMut)>>>;

/// A connection's socket, on the backend its worker runs.
pub(crate) enum Stream {
    /// Operations on the core's io_uring.
    Uring(uring::net::TcpStream),
    /// Readiness from the core's epoll (tokio's reactor). Boxed: the io_uring
    /// backend's connections do not pay for its size.
    Epoll(Box<epoll::TcpStream>),
    /// TLS over a socket of either backend (never over another `Tls`).
    Tls(Box<tls::TlsStream>),
}

impl Stream {
    /// Reads into the spare capacity of `buf` (after its length), waiting until the
    /// socket has something; the future gives the bytes read (0: the peer closed) and
    /// the buffer. Boxed, as the future of this stream's backend alone: a connection's
    /// waiting read (what an idle connection holds) costs its own backend's future,
    /// not the larger of the two (measured: 64 B per idle connection on io_uring). The
    /// epoll backend holds no buffer while it waits (`epoll::TcpStream::read`).
    pub(crate) fn read_boxed(self: &Rc<Self>, buf: BytesMut) -> ReadFuture {
        let stream = self.clone();
        match &**self {
            Self::Uring(_) => Box::pin(async move {
                match &*stream {
                    Self::Uring(stream) => stream.read(buf).await,
                    // A stream's backend is fixed when it is created.
                    _ => (Err(io::Error::other("backend mismatch")), buf),
                }
            }),
            Self::Epoll(_) => Box::pin(async move {
                match &*stream {
                    Self::Epoll(stream) => stream.read(buf).await,
                    _ => (Err(io::Error::other("backend mismatch")), buf),
                }
            }),
            // One future per backend below TLS too, for the same reason.
            Self::Tls(tls) => match tls.inner() {
                Self::Uring(_) => Box::pin(async move {
                    match &*stream {
                        Self::Tls(tls) => match tls.inner() {
                            Self::Uring(inner) => {
                                tls.read(buf, async |b| inner.read(b).await).await
                            }
                            _ => (Err(io::Error::other("backend mismatch")), buf),
                        },
                        _ => (Err(io::Error::other("backend mismatch")), buf),
                    }
                }),
                _ => Box::pin(async move {
                    match &*stream {
                        Self::Tls(tls) => {
                            tls.read(buf, async |b| tls.inner().read_plain(b).await)
                                .await
                        }
                        _ => (Err(io::Error::other("backend mismatch")), buf),
                    }
                }),
            },
        }
    }

    /// A read of the socket itself, below TLS (for `TlsStream`).
    pub(crate) async fn read_plain(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        match self {
            Self::Uring(stream) => stream.read(buf).await,
            Self::Epoll(stream) => stream.read(buf).await,
            Self::Tls(_) => (Err(io::Error::other("TLS over TLS")), buf),
        }
    }

    /// A write to the socket itself, below TLS (for `TlsStream`).
    pub(crate) async fn write_plain(&self, chunks: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        match self {
            Self::Uring(stream) => stream.writev(chunks).await,
            Self::Epoll(stream) => stream.writev(chunks).await,
            Self::Tls(_) => (Err(io::Error::other("TLS over TLS")), chunks),
        }
    }

    /// A read that does not wait (`MSG_DONTWAIT`), of the socket itself (below TLS),
    /// into the spare capacity of `buf` after its length: `None` when the socket holds
    /// nothing yet, else the bytes read (0: the peer closed) or the error.
    pub(crate) fn recv_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        // SAFETY: the descriptor is this stream's, which is borrowed for the whole call
        // and closed only once dropped; the borrowed descriptor does not outlive it.
        let fd = unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) };
        match SockRef::from(&fd).recv_with_flags(buf.spare_capacity_mut(), libc::MSG_DONTWAIT) {
            Ok(n) => {
                // SAFETY: recv(2) initialized the first `n` bytes of the spare capacity
                // it was given, and `n` is at most that capacity.
                unsafe { buf.set_len(buf.len() + n) };
                Some(Ok(n))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Like [`recv_now`](Self::recv_now), but leaves the bytes in the socket
    /// (`MSG_PEEK`): what the socket holds now, up to the spare capacity of `buf`.
    pub(crate) fn peek_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        // SAFETY: as in `recv_now`: the descriptor is this stream's, borrowed for the
        // call only.
        let fd = unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) };
        match SockRef::from(&fd).recv_with_flags(
            buf.spare_capacity_mut(),
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        ) {
            Ok(n) => {
                // SAFETY: recv(2) initialized the first `n` bytes of the spare capacity
                // it was given, and `n` is at most that capacity.
                unsafe { buf.set_len(buf.len() + n) };
                Some(Ok(n))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// The TLS layer, on a TLS connection.
    pub(crate) fn tls(&self) -> Option<&tls::TlsStream> {
        match self {
            Self::Tls(stream) => Some(stream),
            _ => None,
        }
    }

    /// Writes all of `chunks`, in order, waiting for room. Gives back the emptied
    /// vector for reuse.
    pub(crate) async fn writev(&self, chunks: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        match self {
            Self::Uring(stream) => stream.writev(chunks).await,
            Self::Epoll(stream) => stream.writev(chunks).await,
            Self::Tls(stream) => stream.writev(chunks).await,
        }
    }

    /// Writes all of `bytes`, waiting for room.
    pub(crate) async fn write_all(&self, bytes: Bytes) -> io::Result<()> {
        self.writev(vec![bytes]).await.0
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Uring(stream) => stream.shutdown(how),
            Self::Epoll(stream) => stream.shutdown(how),
            Self::Tls(stream) => stream.shutdown(how),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Uring(stream) => stream.as_raw_fd(),
            Self::Epoll(stream) => stream.as_raw_fd(),
            Self::Tls(stream) => stream.as_raw_fd(),
        }
    }
}

/// A worker's listening socket, on the backend the worker runs.
pub(crate) enum Listener {
    Uring(uring::net::TcpListener),
    Epoll(epoll::TcpListener),
}

impl Listener {
    /// Accepts one connection.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Self::Uring(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Stream::Uring(stream), peer))
            }
            Self::Epoll(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Stream::Epoll(Box::new(stream)), peer))
            }
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Uring(listener) => listener.as_raw_fd(),
            Self::Epoll(listener) => listener.as_raw_fd(),
        }
    }
}

/// A connection's socket as the driver and the outbox share it.
pub(crate) type Socket = Rc<Stream>;

impl Transport for Socket {
    fn key(&self) -> RawFd {
        self.as_raw_fd()
    }

    unsafe fn try_write(&self, key: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        debug_assert_eq!(key, self.as_raw_fd());
        if let Stream::Tls(tls) = &**self {
            return tls.try_write(slices);
        }
        // SAFETY: `key` is the descriptor of the stream `self` points to (the caller's
        // contract), which this `Rc` keeps alive for the whole call (it is closed
        // only once the stream and its io_uring operations are gone); the borrow does
        // not outlive this call.
        let fd = unsafe { BorrowedFd::borrow_raw(key) };
        let socket = SockRef::from(&fd);
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        match slices {
            // One slice (the usual broadcast write): `send`, which spares the kernel
            // copying and checking a message header and an iovec array.
            [one] => socket.send_with_flags(one, flags),
            many => socket.send_vectored_with_flags(many, flags),
        }
    }

    fn backlog(&self) -> usize {
        match &**self {
            Stream::Tls(tls) => tls.backlog(),
            _ => 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A transport for unit tests: takes up to `room` bytes, then would block.

    use std::cell::{Cell, RefCell};
    use std::io::{self, IoSlice};
    use std::rc::Rc;

    use super::Transport;

    /// What a test transport was given, and how much more it takes.
    #[derive(Default)]
    pub(crate) struct Wire {
        pub(crate) written: RefCell<Vec<u8>>,
        pub(crate) room: Cell<usize>,
        pub(crate) writes: Cell<usize>,
    }

    impl Transport for Rc<Wire> {
        fn key(&self) -> std::os::fd::RawFd {
            -1
        }

        unsafe fn try_write(
            &self,
            _key: std::os::fd::RawFd,
            slices: &[IoSlice<'_>],
        ) -> io::Result<usize> {
            let room = self.room.get();
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.writes.set(self.writes.get() + 1);
            let mut taken = 0;
            for slice in slices {
                let n = slice.len().min(room - taken);
                self.written.borrow_mut().extend_from_slice(&slice[..n]);
                taken += n;
            }
            self.room.set(room - taken);
            Ok(taken)
        }
    }
}
