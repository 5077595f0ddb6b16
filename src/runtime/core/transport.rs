//! The transport seam, write half: what the connection core needs from a socket to
//! write without waiting. The outbox (`core::outbox`) writes only through it.
//!
//! ```text
//!   proto::Connection ── frames ──▶ Outbox ── IoSlices ──▶ Transport::try_write ──▶ socket
//!   (queue, codec)                 (order,        (one non-blocking write:
//!                                   phase)         io_uring backend: send/sendmsg)
//! ```
//!
//! Writing what the socket does not take at once (waiting for room) is the backend's
//! part: the io_uring backend hands the rest to an io_uring write (`ws.rs`), while the
//! outbox is in [`WritePhase::Waiting`](super::outbox::WritePhase::Waiting).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;

use socket2::SockRef;

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
}

/// The io_uring backend's socket, shared by the connection's driver (its reads and
/// waiting writes) and its outbox (non-blocking writes).
pub(crate) type Socket = Rc<crate::runtime::uring::net::TcpStream>;

impl Transport for Socket {
    fn key(&self) -> RawFd {
        self.as_raw_fd()
    }

    unsafe fn try_write(&self, key: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        debug_assert_eq!(key, self.as_raw_fd());
        // SAFETY: `key` is the descriptor of the stream `self` points to (the caller's
        // contract), which this `Rc` keeps alive for the whole call (it is closed
        // only once the stream and its io_uring operations are gone); the borrow does not outlive this call.
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
