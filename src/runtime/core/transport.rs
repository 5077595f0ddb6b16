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
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;

use socket2::SockRef;

/// A socket the outbox can write to without waiting.
pub(crate) trait Transport {
    /// Writes as much of `slices`, in order, as the socket takes now, without waiting
    /// (`EWOULDBLOCK` when it takes nothing) and without raising `SIGPIPE`. Returns the
    /// bytes written.
    fn try_write(&self, slices: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// The io_uring backend's socket, shared by the connection's driver (its reads and
/// waiting writes) and its outbox (non-blocking writes).
pub(crate) type Socket = Rc<tokio_uring::net::TcpStream>;

impl Transport for Socket {
    fn try_write(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: the descriptor belongs to the stream `self` points to, which this
        // `Rc` keeps alive for the whole call (tokio-uring closes it only when the
        // stream is dropped), and the borrow does not outlive this function.
        let fd = unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) };
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
        fn try_write(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
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
