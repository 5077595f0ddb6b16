//! Handing queued io_uring operations to the kernel while the core is busy.
//!
//! tokio-uring 0.5 submits the operations its tasks queue only when the thread parks
//! (its `on_thread_park` hook) or when the submission queue is full. A core that never
//! runs out of work does not park: while the flusher writes a broadcast to 10,000
//! subscribers, a read queued by the publisher's connection stays in user memory until
//! the pass ends, and the publisher's next messages wait a whole pass before they are
//! even read. tokio-uring does not expose its ring, so each worker finds the ring's
//! descriptor when it starts (the one `/proc/self/fd` gained while the worker built its
//! runtime, under a process-wide lock) and [`submit_pending`] calls `io_uring_enter` on
//! it. Submission is the same system call tokio-uring makes, from the same thread; the
//! completions still go through tokio-uring.

use std::cell::Cell;
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

/// Held while a thread creates an io_uring instance, so that the descriptor a worker
/// gains is its own.
static CREATING: Mutex<()> = Mutex::new(());

/// `IORING_MAX_ENTRIES`: the kernel submits at most what is queued, up to this.
const MAX_SUBMIT: libc::c_uint = 32_768;

thread_local! {
    static RING: Cell<Option<RawFd>> = const { Cell::new(None) };
}

/// Serializes io_uring creation in this process (see the module docs).
pub(crate) fn creation_lock() -> MutexGuard<'static, ()> {
    CREATING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The io_uring descriptors this process has open.
pub(crate) fn io_uring_fds() -> HashSet<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[io_uring]")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// Records this thread's ring: the one descriptor in `after` not in `before`. With
/// none or several, explicit submission stays off and tokio-uring submits as before.
pub(crate) fn adopt(before: &HashSet<RawFd>, after: &HashSet<RawFd>) {
    let mut new = after.difference(before);
    let ring = match (new.next(), new.next()) {
        (Some(&fd), None) => Some(fd),
        _ => {
            tracing::warn!(
                "could not tell this worker's io_uring descriptor apart: reads queued while \
                 a broadcast is being written wait for the core to go idle"
            );
            None
        }
    };
    RING.with(|cell| cell.set(ring));
}

/// Hands every operation queued on this thread's ring to the kernel now.
pub(crate) fn submit_pending() {
    let Some(fd) = RING.with(Cell::get) else {
        return;
    };
    // SAFETY: `fd` is this thread's io_uring instance, owned by the runtime that runs
    // this code; io_uring_enter with no flags and no argument only submits what the
    // submission queue holds (what tokio-uring queued, already visible to the kernel),
    // as tokio-uring's own submit does. An error (e.g. EBUSY while completions back up)
    // leaves the queue to tokio-uring's next submit.
    unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            fd,
            MAX_SUBMIT,
            0 as libc::c_uint,
            0 as libc::c_uint,
            std::ptr::null::<libc::c_void>(),
            0 as libc::size_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker tells its ring apart: creating one under the lock adds exactly one
    /// io_uring descriptor, and `submit_pending` hands the kernel what was queued on
    /// it (a no-op completes only once it is submitted).
    #[test]
    fn a_new_ring_is_the_one_descriptor_gained_and_submitted() {
        let creating = creation_lock();
        let before = io_uring_fds();
        let mut ring = io_uring::IoUring::new(8).expect("io_uring is needed by the server tests");
        let after = io_uring_fds();
        drop(creating);
        let gained: Vec<_> = after.difference(&before).copied().collect();
        assert_eq!(gained, vec![std::os::fd::AsRawFd::as_raw_fd(&ring)]);
        adopt(&before, &after);
        let nop = io_uring::opcode::Nop::new().build().user_data(7);
        // SAFETY: a no-op refers to no buffer or descriptor.
        unsafe { ring.submission().push(&nop) }.expect("room for one entry");
        assert_eq!(ring.completion().len(), 0, "nothing submitted yet");
        submit_pending();
        let done: Vec<u64> = ring.completion().map(|cqe| cqe.user_data()).collect();
        assert_eq!(done, vec![7]);
        RING.with(|cell| cell.set(None));
    }
}
