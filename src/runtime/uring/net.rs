//! Sockets whose reads, writes and accepts are io_uring operations on this core's ring.
//!
//! Each operation holds a reference to its socket's descriptor until it completes, so
//! the descriptor is closed only once nothing in flight names it: a number the kernel
//! reuses for a new connection never receives an operation meant for the old one.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, types::Fd};
use socket2::{SockAddr, SockRef};

use super::{Op, result};
use crate::runtime::buf::{IOV_MAX, consume_written};

/// A listening socket accepting through io_uring.
pub(crate) struct TcpListener {
    fd: Rc<OwnedFd>,
}

impl TcpListener {
    pub(crate) fn from_std(listener: std::net::TcpListener) -> Self {
        Self {
            fd: Rc::new(listener.into()),
        }
    }

    /// Accepts one connection (close-on-exec, as std's sockets are).
    pub(crate) async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        struct Accept {
            _listener: Rc<OwnedFd>,
            addr: Box<(MaybeUninit<libc::sockaddr_storage>, libc::socklen_t)>,
        }
        let data = Accept {
            _listener: self.fd.clone(),
            addr: Box::new((
                MaybeUninit::uninit(),
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
            )),
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: the entry points to the address storage and its length, both in
        // `data.addr`'s box, which the operation keeps until it completes.
        let op = unsafe {
            Op::submit(data, |data| {
                let (storage, len) = &mut *data.addr;
                opcode::Accept::new(Fd(fd), storage.as_mut_ptr().cast(), len)
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            })
        }?;
        let (res, data) = op.await;
        let accepted = result(res)?;
        let accepted = RawFd::try_from(accepted).map_err(io::Error::other)?;
        // SAFETY: a successful accept returns a new descriptor that nothing else owns.
        let stream = TcpStream::from_fd(unsafe { OwnedFd::from_raw_fd(accepted) });
        let (storage, len) = *data.addr;
        // SAFETY: the kernel wrote the peer's address into `storage` and its length
        // into `len` (at most the storage's size) when the accept succeeded.
        let peer = unsafe { SockAddr::new(storage.assume_init(), len) };
        let peer = peer
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
        Ok((stream, peer))
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A connected stream socket (TCP, or a Unix socket in tests) read and written through
/// io_uring; non-blocking writes beside them go through [`AsRawFd`].
pub(crate) struct TcpStream {
    fd: Rc<OwnedFd>,
}

impl TcpStream {
    pub(crate) fn from_fd(fd: OwnedFd) -> Self {
        Self { fd: Rc::new(fd) }
    }

    /// Reads into the spare capacity of `buf` (after its length), as much as the
    /// socket has, waiting until it has something. Returns the bytes read (0: the peer
    /// closed) and the buffer, grown by them.
    pub(crate) async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: the entry points to `buf`'s spare capacity, in its heap allocation,
        // which moving the buffer into the operation does not move.
        let op = unsafe {
            Op::submit((self.fd.clone(), buf), |(_, buf)| {
                let spare = buf.spare_capacity_mut();
                let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
                opcode::Recv::new(Fd(fd), spare.as_mut_ptr().cast(), len).build()
            })
        };
        let op = match op {
            Ok(op) => op,
            Err(e) => return (Err(e), BytesMut::new()),
        };
        let (res, (_, mut buf)) = op.await;
        let read = result(res);
        if let Ok(n) = read {
            // SAFETY: recv wrote `n` bytes at the start of the spare capacity it was
            // given, and `n` is at most that capacity.
            unsafe { buf.set_len(buf.len() + n) };
        }
        (read, buf)
    }

    /// Writes all of `chunks`, in order, continuing after partial writes, at most
    /// `IOV_MAX` chunks per operation. Gives back the emptied vector for reuse.
    pub(crate) async fn writev(&self, mut chunks: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        while !chunks.is_empty() {
            let tail = if chunks.len() > IOV_MAX {
                chunks.split_off(IOV_MAX)
            } else {
                Vec::new()
            };
            let (res, mut head) = self.send_vectored(chunks).await;
            let written = match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), head),
                Ok(n) => n,
                Err(e) => return (Err(e), head),
            };
            consume_written(&mut head, written);
            head.extend(tail);
            chunks = head;
        }
        (Ok(()), chunks)
    }

    /// One `sendmsg` of `chunks` (without `SIGPIPE`), waiting for room.
    async fn send_vectored(&self, chunks: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
        struct Send {
            _fd: Rc<OwnedFd>,
            chunks: Vec<Bytes>,
            iov: Vec<libc::iovec>,
            msg: Box<libc::msghdr>,
        }
        let iov = chunks
            .iter()
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_ptr().cast_mut().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        // SAFETY: all-zero is a valid msghdr (no address, no control data).
        let msg = Box::new(unsafe { std::mem::zeroed::<libc::msghdr>() });
        let data = Send {
            _fd: self.fd.clone(),
            chunks,
            iov,
            msg,
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: the entry points to `data.msg` (boxed), which points to `data.iov`'s
        // heap array, whose entries point into `data.chunks`' heap buffers; moving
        // `data` into the operation moves none of them, and nothing changes them until
        // it completes.
        let op = unsafe {
            Op::submit(data, |data| {
                data.msg.msg_iov = data.iov.as_mut_ptr();
                data.msg.msg_iovlen = data.iov.len();
                opcode::SendMsg::new(Fd(fd), &raw const *data.msg)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
            })
        };
        match op {
            Ok(op) => {
                let (res, data) = op.await;
                (result(res), data.chunks)
            }
            Err(e) => (Err(e), Vec::new()),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        SockRef::from(&*self.fd).shutdown(how)
    }
}

impl AsRawFd for TcpStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
