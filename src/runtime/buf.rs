//! Read buffers. An in-flight io_uring read owns its buffer, so whatever buffer a
//! connection's waiting read holds is what an idle connection costs. Each connection
//! therefore keeps one buffer for its waiting read, sized to what its recent reads
//! brought, in three tiers:
//!
//! - **small** ([`SMALL_READ`]): a connection that has not been busy, or whose reads
//!   became small again, waits on 128 B.
//! - **medium** (up to [`MEDIUM_MAX`]): when a read fills its buffer, the socket is asked
//!   how much more is waiting (`FIONREAD`); the connection's buffer is then resized to
//!   hold such a batch whole next time (the next power of two above 1.5× the batch), so
//!   a busy connection does one read per batch. It shrinks again when a read brings at
//!   most a quarter of it, to the size that read asks for (small at ≤ 64 B).
//! - **large** ([`LARGE_READ`], from the core's [`BufPool`]): the read right after a
//!   `FIONREAD` that found bytes waiting, which completes at once, so it never waits
//!   holding a large buffer; the buffer goes back to the pool right after parsing.
//!
//! A connection that goes idle right after a busy spell keeps its medium buffer in its
//! waiting read until that read completes: at most [`MEDIUM_MAX`], and about twice its
//! recent batch size (2 KiB for batches of 16 small messages). An in-flight read cannot
//! be taken back safely (a read cancelled after it completed would lose its bytes), so
//! there is no shrinking on a timer.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};

/// The buffer a connection that was never busy waits on, in bytes.
pub const SMALL_READ: usize = 128;
/// The first read of a connection in its HTTP phase, in bytes: most request heads
/// (browsers' are 400 to 800 bytes) arrive whole in one read, instead of a small read,
/// `FIONREAD` and a large read. A WebSocket starts small again (see
/// [`ReadBufs::reset`]).
pub const HEAD_READ: usize = 1024;
/// The largest buffer a busy connection keeps for its waiting reads, in bytes (16 KiB).
/// Batches larger than this take two reads (the second one large).
pub const MEDIUM_MAX: usize = 16 * 1024;
/// The buffer used after a read filled the connection's buffer and more bytes were
/// waiting, in bytes.
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

/// Slices one vectored write takes at most: Linux's `IOV_MAX`.
pub(crate) const IOV_MAX: usize = 1024;

/// Drops the first `written` bytes of `chunks` after a vectored write of them: the
/// chunks written whole go, the one written in part keeps its rest at the front.
pub(crate) fn consume_written(chunks: &mut Vec<Bytes>, mut written: usize) {
    let mut done = 0;
    while done < chunks.len() && written >= chunks[done].len() {
        written -= chunks[done].len();
        done += 1;
    }
    if done < chunks.len() {
        chunks[done].advance(written);
    }
    chunks.drain(..done);
}

/// Chooses each read's buffer (see the module docs): the connection's own small or
/// medium buffer, or a large one from the pool when bytes are known to be waiting.
#[derive(Debug)]
pub struct ReadBufs {
    pool: BufPool,
    /// The connection's own buffer, when no read holds it.
    held: Option<BytesMut>,
    large_next: bool,
}

impl ReadBufs {
    /// Read buffers drawing on `pool`, starting small.
    #[cfg(test)]
    pub fn new(pool: BufPool) -> Self {
        Self {
            pool,
            held: None,
            large_next: false,
        }
    }

    /// Read buffers whose first read holds `capacity` bytes.
    pub fn with_first(pool: BufPool, capacity: usize) -> Self {
        Self {
            pool,
            held: Some(BytesMut::with_capacity(capacity)),
            large_next: false,
        }
    }

    /// The buffer for the next read (empty, with capacity).
    pub fn next(&mut self) -> BytesMut {
        if self.large_next {
            return self.pool.take();
        }
        self.held
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(SMALL_READ))
    }

    /// Forgets the sizes of earlier reads: the next waiting read is small again. For a
    /// change of phase, such as a WebSocket upgrade after a request head that grew the
    /// buffer, where earlier reads say nothing about later ones.
    pub fn reset(&mut self) {
        if self
            .held
            .as_ref()
            .is_some_and(|b| b.capacity() > SMALL_READ)
        {
            self.held = None;
        }
    }

    /// Takes back a buffer that no read used (a read that found nothing): the next read
    /// gets it as it was.
    pub fn unused(&mut self, mut buf: BytesMut) {
        buf.clear();
        if buf.capacity() >= LARGE_READ {
            self.pool.put(buf);
        } else {
            self.held = Some(buf);
        }
    }

    /// Takes back a buffer after its bytes were consumed. When the read filled it, the
    /// next read is large if the socket `fd` has more bytes waiting.
    pub fn recycle(&mut self, buf: BytesMut, fd: RawFd) {
        self.recycle_with(buf, || bytes_waiting(fd));
    }

    /// [`recycle`](Self::recycle), asking `waiting` how many bytes the socket holds.
    fn recycle_with(&mut self, mut buf: BytesMut, waiting: impl FnOnce() -> usize) {
        let read = buf.len();
        let capacity = buf.capacity();
        let waiting = if read == capacity { waiting() } else { 0 };
        self.large_next = waiting > 0;
        buf.clear();
        if capacity >= LARGE_READ {
            // The second read of a batch; the connection's own buffer was sized when
            // the first one filled.
            self.pool.put(buf);
            return;
        }
        let want = if waiting > 0 {
            // A batch of `read + waiting` bytes: hold it whole next time.
            tier(read.saturating_add(waiting)).max(capacity)
        } else if capacity > SMALL_READ && read <= capacity / 4 {
            tier(read)
        } else {
            capacity
        };
        self.held = if want == capacity {
            Some(buf)
        } else {
            Some(BytesMut::with_capacity(want))
        };
    }
}

/// The buffer size for batches of `bytes`: the next power of two at or above 1.5×
/// `bytes`, within [`SMALL_READ`]..=[`MEDIUM_MAX`].
fn tier(bytes: usize) -> usize {
    bytes
        .saturating_add(bytes / 2)
        .checked_next_power_of_two()
        .unwrap_or(MEDIUM_MAX)
        .clamp(SMALL_READ, MEDIUM_MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A read of `n` bytes into the next buffer, recycled with `waiting` bytes left in
    /// the socket. Returns the capacity the read used.
    fn read(bufs: &mut ReadBufs, n: usize, waiting: usize) -> usize {
        let mut buf = bufs.next();
        let capacity = buf.capacity();
        let n = n.min(capacity);
        buf.resize(n, 0);
        bufs.recycle_with(buf, || waiting);
        capacity
    }

    #[test]
    fn tiers_are_powers_of_two_within_bounds() {
        assert_eq!(tier(0), SMALL_READ);
        assert_eq!(tier(64), SMALL_READ);
        assert_eq!(tier(100), 256);
        assert_eq!(tier(1_120), 2_048);
        assert_eq!(tier(1_400), 4_096);
        assert_eq!(tier(100_000), MEDIUM_MAX);
        assert_eq!(tier(usize::MAX), MEDIUM_MAX);
    }

    #[test]
    fn a_busy_connection_grows_to_one_read_per_batch() {
        let mut bufs = ReadBufs::new(BufPool::default());
        // First batch of 1,120 B: the small read fills, the rest comes in a large read.
        assert_eq!(read(&mut bufs, 1_120, 1_120 - SMALL_READ), SMALL_READ);
        assert_eq!(read(&mut bufs, 1_120 - SMALL_READ, 0), LARGE_READ);
        // From then on each batch fits the connection's own buffer in one read.
        for _ in 0..10 {
            assert_eq!(read(&mut bufs, 1_120, 0), 2_048);
        }
    }

    #[test]
    fn a_connection_that_quiets_down_shrinks_back_to_small() {
        let mut bufs = ReadBufs::new(BufPool::default());
        // A batch of 4,128 B grows the buffer to 8 KiB.
        read(&mut bufs, 4_128, 4_000);
        read(&mut bufs, 4_000, 0);
        // Batches of more than a quarter of the buffer keep it; smaller ones shrink it.
        assert_eq!(read(&mut bufs, 4_000, 0), 8_192);
        assert_eq!(read(&mut bufs, 2_100, 0), 8_192);
        assert_eq!(read(&mut bufs, 1_000, 0), 8_192);
        assert_eq!(read(&mut bufs, 30, 0), 2_048);
        assert_eq!(read(&mut bufs, 6, 0), SMALL_READ);
        assert_eq!(read(&mut bufs, 6, 0), SMALL_READ);
    }

    #[test]
    fn large_reads_come_only_while_bytes_wait_and_go_back_to_the_pool() {
        let pool = BufPool::default();
        let mut bufs = ReadBufs::new(pool.clone());
        // A stream far larger than MEDIUM_MAX: full reads, each followed by a large one
        // while FIONREAD says more is waiting.
        assert_eq!(read(&mut bufs, SMALL_READ, 1 << 20), SMALL_READ);
        assert_eq!(read(&mut bufs, LARGE_READ, 1 << 19), LARGE_READ);
        assert_eq!(read(&mut bufs, LARGE_READ, 0), LARGE_READ);
        assert_eq!(pool.free.borrow().len(), 1);
        // The waiting read then uses the connection's own buffer, capped at MEDIUM_MAX.
        assert_eq!(read(&mut bufs, 10_000, 0), MEDIUM_MAX);
    }

    #[test]
    fn a_request_head_comes_in_one_read_then_the_websocket_waits_small() {
        let mut bufs = ReadBufs::with_first(BufPool::default(), HEAD_READ);
        // A 600 B head fits the first read: no FIONREAD, no second read.
        let mut buf = bufs.next();
        assert_eq!(buf.capacity(), HEAD_READ);
        buf.resize(600, 0);
        bufs.recycle_with(buf, || panic!("asked although the head fit"));
        bufs.reset();
        assert_eq!(read(&mut bufs, 10, 0), SMALL_READ);
    }

    #[test]
    fn reset_brings_a_grown_buffer_back_to_small() {
        let mut bufs = ReadBufs::new(BufPool::default());
        // A 300 B request head: small read, then the rest from the pool.
        read(&mut bufs, 300, 300 - SMALL_READ);
        read(&mut bufs, 300 - SMALL_READ, 0);
        bufs.reset();
        assert_eq!(read(&mut bufs, 10, 0), SMALL_READ);
    }

    #[test]
    fn fionread_is_asked_only_after_a_full_read() {
        let mut bufs = ReadBufs::new(BufPool::default());
        let mut buf = bufs.next();
        buf.resize(10, 0);
        bufs.recycle_with(buf, || {
            panic!("asked although the read did not fill its buffer")
        });
        assert_eq!(read(&mut bufs, 10, 0), SMALL_READ);
    }

    /// A read that found nothing (a non-blocking read of the request head before it
    /// arrived) gives its buffer back as it was: the io_uring read that waits next
    /// still holds the 1 KiB head buffer, not a small one.
    #[test]
    fn an_unused_buffer_is_the_next_one() {
        let mut bufs = ReadBufs::with_first(BufPool::default(), HEAD_READ);
        let buf = bufs.next();
        assert_eq!(buf.capacity(), HEAD_READ);
        bufs.unused(buf);
        assert_eq!(read(&mut bufs, 400, 0), HEAD_READ);
    }
}
