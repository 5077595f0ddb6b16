//! Read buffers. An in-flight io_uring read owns its buffer, so an idle connection
//! would hold a full buffer. Instead each connection keeps one small buffer for its
//! waiting read, and only a read that filled the small buffer is followed by one into a
//! large buffer borrowed from the core's pool and returned right after parsing.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::BytesMut;

/// The buffer an idle connection's pending read holds, in bytes.
pub const SMALL_READ: usize = 512;
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

    /// Takes back a buffer after its bytes were consumed. A read that filled its buffer
    /// suggests more is waiting: the next read is large.
    pub fn recycle(&mut self, mut buf: BytesMut) {
        self.large_next = buf.len() == buf.capacity();
        buf.clear();
        if buf.capacity() >= LARGE_READ {
            self.pool.put(buf);
        } else if buf.capacity() >= SMALL_READ {
            self.small = Some(buf);
        }
    }
}
