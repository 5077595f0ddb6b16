//! A core's registry of WebSocket sessions: how the core reaches each of its
//! connections without a task or timer per connection.
//!
//! - Timers: the core's timer wheel, with one slot per session. What is due and when is
//!   decided by each connection's `core::timers::ConnTimers`; its driver records
//!   `poll_timeout` as the session's deadline, and one housekeeping tick per core wakes
//!   the sessions whose deadline has passed (the driver then calls `handle_timeout`).
//!   Heartbeat and close timeouts are seconds, so a tick of a fraction of the shortest
//!   one is precise enough, and an idle connection carries no timer of its own.
//! - Shutdown: the core walks the registry and wakes every session.
//!
//! A slot holds a `Weak` reference, so the registry never keeps a session alive; the
//! session's driver removes its slot when it ends (ARCHITECTURE.md rule 6).

use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::core::timers::TimerPolicy;
use super::session::{SessionInner, wake};

/// The sessions of one core.
#[derive(Default)]
pub(crate) struct Registry {
    slots: Vec<Option<Weak<SessionInner>>>,
    free: Vec<usize>,
    len: usize,
}

impl Registry {
    /// Registers a session; returns its slot.
    pub(crate) fn insert(&mut self, session: &Rc<SessionInner>) -> usize {
        self.len += 1;
        let weak = Some(Rc::downgrade(session));
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = weak;
                slot
            }
            None => {
                self.slots.push(weak);
                self.slots.len() - 1
            }
        }
    }

    /// Removes the session in `slot`.
    pub(crate) fn remove(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot) {
            if entry.take().is_some() {
                self.len -= 1;
                self.free.push(slot);
            }
        }
    }

    /// Sessions registered.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Wakes every session whose deadline is at or before `now`.
    pub(crate) fn wake_due(&self, now: Instant) {
        for session in self.slots.iter().flatten().filter_map(Weak::upgrade) {
            let mut state = session.state.borrow_mut();
            if !state.timer_due && state.deadline.is_due(now.into_std()) {
                state.timer_due = true;
                wake(&mut state.driver_waker);
            }
        }
    }

    /// Tells every session that the server is shutting down, and wakes it.
    pub(crate) fn shut_down_all(&self) {
        for session in self.slots.iter().flatten().filter_map(Weak::upgrade) {
            let mut state = session.state.borrow_mut();
            state.shutdown = true;
            wake(&mut state.driver_waker);
        }
    }
}

/// A session's next timer deadline as nanoseconds since the process's timer epoch,
/// or none: 8 bytes where an `Option<Instant>` takes 16 (an idle session stays in its
/// size class), with the same comparison (`deadline <= now`) to the nanosecond for
/// about 584 years after the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Deadline(u64);

impl Deadline {
    /// No deadline.
    pub(crate) const NONE: Self = Self(0);

    /// The deadline at `at`. (0 means none, so a deadline at the epoch itself is kept
    /// one nanosecond later.)
    pub(crate) fn at(at: std::time::Instant) -> Self {
        Self(nanos_since_epoch(at).max(1))
    }

    /// Whether the deadline is set and `now` has reached it.
    pub(crate) fn is_due(self, now: std::time::Instant) -> bool {
        self.0 != 0 && self.0 <= nanos_since_epoch(now)
    }
}

fn nanos_since_epoch(at: std::time::Instant) -> u64 {
    let since = at.saturating_duration_since(epoch());
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// The moment deadlines count from: the first time one is taken.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The housekeeping tick for `policy`: a quarter of the shortest session timeout,
/// between 5 ms and 1 s.
pub(crate) fn tick(policy: &TimerPolicy) -> Duration {
    let mut shortest = policy
        .ping_interval
        .min(policy.pong_timeout)
        .min(policy.shutdown_timeout);
    if let Some(idle) = policy.idle_timeout {
        shortest = shortest.min(idle);
    }
    (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A deadline is due from its moment on and never before, as `deadline <= now`
    /// on `Instant`s was; none is never due.
    #[test]
    fn a_deadline_is_due_from_its_moment_on_and_never_early() {
        let _ = epoch();
        let base = Instant::now() + Duration::from_micros(1);
        for offset_ns in [0u64, 1, 999, 1_000_000, 1_000_001, 25_000_000_000] {
            let at = base + Duration::from_nanos(offset_ns);
            let deadline = Deadline::at(at);
            assert!(deadline.is_due(at), "{offset_ns} ns: due at its moment");
            assert!(
                !deadline.is_due(at - Duration::from_nanos(1)),
                "{offset_ns} ns: early"
            );
        }
        assert!(!Deadline::NONE.is_due(base + Duration::from_secs(3600)));
    }
}
