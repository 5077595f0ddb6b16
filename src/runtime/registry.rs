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
            if !state.timer_due && state.deadline.is_some_and(|d| d <= now) {
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
