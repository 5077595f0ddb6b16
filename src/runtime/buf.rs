//! Read buffers. An in-flight io_uring read owns its buffer, so an idle connection
//! would hold a full buffer. Instead each connection keeps one small buffer for its
//! waiting read. Only when a read fills its buffer is the socket asked how much more is
//! waiting (`FIONREAD`); then the next read, which completes at once, borrows a large
//! buffer from the core's pool, returned right after parsing. A connection that goes
//! idle is therefore always left waiting on its small buffer.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;

use bytes::BytesMut;

/// The buffer an idle connection's pending read holds, in bytes.
pub const SMALL_READ: usize = 128;
/// The buffer used after a read filled the small one, in bytes.
pub const LARGE_READ: usize = 64 * 1024;
/// Large buffers kept per core for reuse; more are freed when returned.
const POOL_MAX: usize = 64;

/// A core's pool of large read buffers.
#[derive(Debug, Default, Clone)]
pub struct BufPool {
    free: Rc<RefCell<Vec<BytesMut>>>,
}

impl BufPool {
    /// An empty buffer of [`LARGE_READ`] capacity.
    pub fn take(&self) -> BytesMut {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(LARGE_READ))
    }

    /// Returns a large buffer for reuse. Buffers still shared, or over the pool's size,
    /// are dropped.
    pub fn put(&self, mut buf: BytesMut) {
        buf.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_MAX && buf.capacity() >= LARGE_READ {
            free.push(buf);
        }
    }
}

/// Chooses each read's buffer: small while reads are small, large after a full one.
#[derive(Debug)]
pub struct ReadBufs {
    pool: BufPool,
    small: Option<BytesMut>,
    large_next: bool,
}

impl ReadBufs {
    /// Read buffers drawing on `pool`.
    pub fn new(pool: BufPool) -> Self {
        Self {
            pool,
            small: None,
            large_next: false,
        }
    }

    /// The buffer for the next read (empty, with capacity).
    pub fn next(&mut self) -> BytesMut {
        if self.large_next {
            return self.pool.take();
        }
        self.small
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(SMALL_READ))
    }

    /// Takes back a buffer after its bytes were consumed. When the read filled it, the
    /// next read is large if the socket `fd` has more bytes waiting.
    pub fn recycle(&mut self, mut buf: BytesMut, fd: RawFd) {
        self.large_next = buf.len() == buf.capacity() && bytes_waiting(fd) > 0;
        buf.clear();
        if buf.capacity() >= LARGE_READ {
            self.pool.put(buf);
        } else if buf.capacity() >= SMALL_READ {
            self.small = Some(buf);
        }
    }
}

/// Bytes the kernel holds for reading on `fd` (0 on error).
fn bytes_waiting(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one `c_int` through the pointer, which points to `n`, a
    // live local of that type; an invalid descriptor only makes the call fail.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}
