//! Conflation: a conflated topic's windows, keys and held values on one core.
//!
//! Within a window only the latest message per key reaches each subscriber: the first
//! message after a quiet window goes out at once, later ones wait in `pending` for the
//! window's end (a local timer), when the latest value of each key is delivered. A full
//! window ([`MAX_CONFLATION_KEYS`] keys or half of `max_outbound_bytes`) goes out at
//! once. A subscriber whose queue is above that soft limit is not sent more: the latest
//! value per key is held for it (at most [`MAX_HELD_KEYS`] keys) and delivered at a
//! window's end once its queue has drained.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use tokio::time::Instant;

use super::core::Tally;
use super::fanout::Frames;
use super::registry::SessionId;
use super::{Delivery, PubsubMetrics};
use crate::runtime::Session;

/// Distinct keys a conflated topic collects within one window (each core). A new key
/// beyond it does not wait for the window's end: the window is delivered at once
/// (counted in `ringsocket_pubsub_conflation_early_flushes_total` and logged), so keys
/// chosen by clients cannot grow it without bound. The same happens once the pending
/// values pass half of `max_outbound_bytes`. Default 4,096.
pub const MAX_CONFLATION_KEYS: usize = 4096;

/// Keys whose latest value a conflated topic holds for one lagging subscriber (one
/// whose queue is above half of `max_outbound_bytes`). Beyond it, or once the held
/// keys and values pass half of `max_outbound_bytes`, the keys held longest are
/// dropped, down to three quarters of both limits (counted in
/// `ringsocket_pubsub_conflation_dropped_total` and logged). Default 4,096.
pub const MAX_HELD_KEYS: usize = 4096;

/// What a conflated topic uses of its core besides the topic itself.
pub(super) struct Ctx<'a> {
    pub(super) tally: &'a mut Tally,
    /// The id of the core's next conflation timer.
    pub(super) next_timer: &'a mut u64,
    pub(super) metrics: &'a PubsubMetrics,
}

/// A conflated topic's window state.
pub(super) struct Conflation {
    window: Duration,
    last_flush: Option<Instant>,
    /// The flush scheduled for the window's end, if any: a timer that finds another
    /// id here (the window was flushed early) does nothing.
    timer: Option<u64>,
    /// Key → (latest frame, session to skip), waiting for the window's end. At most
    /// [`MAX_CONFLATION_KEYS`] keys.
    pending: IndexMap<Bytes, (Bytes, Option<SessionId>)>,
    /// Bytes of the keys and frames in `pending`.
    pending_bytes: usize,
    /// Subscribers whose queue was too full: the latest frame per key, kept for them.
    lagging: HashMap<SessionId, Held>,
}

/// The values a conflated topic holds for one lagging subscriber, in the order their
/// keys were first held (a newer value of a key keeps its place).
#[derive(Default)]
struct Held {
    values: IndexMap<Bytes, Bytes>,
    bytes: usize,
}

impl Conflation {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            window,
            last_flush: None,
            timer: None,
            pending: IndexMap::new(),
            pending_bytes: 0,
            lagging: HashMap::new(),
        }
    }

    /// Drops what is held for session `id`, which left the topic.
    pub(super) fn forget(&mut self, id: SessionId) {
        self.lagging.remove(&id);
    }

    /// Delivers `delivery` to `subscribers` (the topic's, on this core) but `exclude`:
    /// at once after a quiet window, else at the window's end (or now, if the window is
    /// full). Subscribers that can no longer be sent to are added to `closing`.
    pub(super) fn publish(
        &mut self,
        delivery: &Delivery,
        exclude: Option<SessionId>,
        subscribers: &IndexMap<SessionId, Session>,
        cx: &mut Ctx<'_>,
        closing: &mut Vec<SessionId>,
    ) {
        let now = Instant::now();
        let window_open = self.last_flush.is_none_or(|at| now >= at + self.window);
        if window_open && self.timer.is_none() && self.lagging.is_empty() {
            // The first message after a quiet window goes out at once.
            self.last_flush = Some(now);
            let mut frames = Frames::new(&delivery.frame);
            for (id, session) in subscribers {
                if Some(*id) != exclude
                    && !deliver_conflated(
                        session,
                        *id,
                        &delivery.key,
                        &mut frames,
                        &mut self.lagging,
                        cx.tally,
                    )
                {
                    closing.push(*id);
                }
            }
            return;
        }
        // Keys count too: they may be as long as a message.
        self.pending_bytes += delivery.frame.len();
        match self
            .pending
            .insert_full(delivery.key.clone(), (delivery.frame.clone(), exclude))
        {
            (at, Some((old, _))) => {
                self.pending_bytes -= old.len();
                cx.tally.conflated += 1;
                // The window goes out in the order of each key's latest value (offset
                // order, for ringsocket.v1 subscribers, who drop what is older).
                self.pending.move_index(at, self.pending.len() - 1);
            }
            (_, None) => self.pending_bytes += delivery.key.len(),
        }
        if self.pending.len() >= MAX_CONFLATION_KEYS || self.pending_bytes > cx.tally.soft_limit {
            let (keys, bytes) = (self.pending.len(), self.pending_bytes);
            let before = cx
                .metrics
                .conflation_early_flushes
                .fetch_add(1, Ordering::Relaxed);
            let early = before + 1;
            if crossed_power_of_two(before, early) {
                tracing::warn!(
                    topic = %delivery.topic,
                    keys,
                    bytes,
                    early_flushes = early,
                    "conflation window full ({MAX_CONFLATION_KEYS} keys or {} bytes): delivered before the window's end",
                    cx.tally.soft_limit
                );
            }
            self.flush(&delivery.topic, subscribers, cx, closing);
            return;
        }
        if self.timer.is_none() {
            let at = self.last_flush.map_or(now, |at| at + self.window);
            self.arm(cx.next_timer, delivery.topic.clone(), at);
        }
    }

    /// Timer `id` of this topic (`name`) fired: flushes the window unless it was flushed
    /// early since.
    pub(super) fn on_timer(
        &mut self,
        name: &str,
        id: u64,
        subscribers: &IndexMap<SessionId, Session>,
        cx: &mut Ctx<'_>,
        closing: &mut Vec<SessionId>,
    ) {
        if self.timer == Some(id) {
            self.flush(name, subscribers, cx, closing);
        }
    }

    /// The end of a window (or a full window): the latest value of each key goes out.
    fn flush(
        &mut self,
        name: &str,
        subscribers: &IndexMap<SessionId, Session>,
        cx: &mut Ctx<'_>,
        closing: &mut Vec<SessionId>,
    ) {
        self.timer = None;
        self.last_flush = Some(Instant::now());
        self.pending_bytes = 0;
        let pending = std::mem::take(&mut self.pending);
        // Each value compressed at most once, for every subscriber that takes it so.
        let mut frames: Vec<Frames<'_>> = pending.values().map(|(f, _)| Frames::new(f)).collect();
        for (id, session) in subscribers {
            // Values held back for this subscriber go first, if it has drained.
            if let Some(mut held) = self.lagging.remove(id) {
                for (key, (frame, skip)) in &pending {
                    if *skip != Some(*id) {
                        held.hold(key, frame, cx.tally);
                    }
                }
                if session.queued_bytes() > cx.tally.soft_limit {
                    self.lagging.insert(*id, held);
                    continue;
                }
                for (_, frame) in held.values {
                    if session.send_frame(frame).is_err() {
                        closing.push(*id);
                        break;
                    }
                    cx.tally.delivered += 1;
                }
                continue;
            }
            for ((key, (_, skip)), frames) in pending.iter().zip(frames.iter_mut()) {
                if *skip != Some(*id)
                    && !deliver_conflated(session, *id, key, frames, &mut self.lagging, cx.tally)
                {
                    closing.push(*id);
                    break;
                }
            }
        }
        if !self.lagging.is_empty() {
            // Keep the window ticking until every held value is out.
            let at = Instant::now() + self.window;
            self.arm(cx.next_timer, name.into(), at);
        }
    }

    /// Schedules the flush of this window at `at`, under a new timer id (a timer that
    /// finds another id when it fires does nothing).
    fn arm(&mut self, next_timer: &mut u64, topic: Arc<str>, at: Instant) {
        let id = *next_timer;
        *next_timer += 1;
        self.timer = Some(id);
        schedule_flush(topic, id, at);
    }
}

/// Queues a conflated message to one subscriber (its frame from `frames`: plain or
/// compressed), or holds it back (latest per key) while the subscriber's queue is
/// above the soft limit. False when the subscriber's connection is closing (nothing can
/// be sent to it any more).
fn deliver_conflated(
    session: &Session,
    id: SessionId,
    key: &Bytes,
    frames: &mut Frames<'_>,
    lagging: &mut HashMap<SessionId, Held>,
    tally: &mut Tally,
) -> bool {
    let frame = frames.for_session(session);
    if session.queued_bytes() > tally.soft_limit {
        lagging.entry(id).or_default().hold(key, frame, tally);
        return true;
    }
    let sent = session.send_frame(frame.clone()).is_ok();
    tally.delivered += u64::from(sent);
    sent
}

impl Held {
    /// Keeps `frame` as the latest value of `key`. Past [`MAX_HELD_KEYS`] keys or the
    /// soft limit in bytes, drops the keys held longest (never the one just held) down to
    /// three quarters of both: each drop then costs O(1) amortized, although removing
    /// from the front of an `IndexMap` shifts the rest.
    fn hold(&mut self, key: &Bytes, frame: &Bytes, tally: &mut Tally) {
        // Keys count too: they may be as long as a message.
        self.bytes += frame.len();
        match self.values.insert_full(key.clone(), frame.clone()) {
            (at, Some(old)) => {
                self.bytes -= old.len();
                tally.conflated += 1;
                // Latest last, as in a window (and "never the one just held" below).
                self.values.move_index(at, self.values.len() - 1);
            }
            (_, None) => self.bytes += key.len(),
        }
        if self.values.len() <= MAX_HELD_KEYS && self.bytes <= tally.soft_limit {
            return;
        }
        let (keys, bytes) = (MAX_HELD_KEYS / 4 * 3, tally.soft_limit / 4 * 3);
        let newest = self.values.len() - 1;
        let mut drop = 0;
        while drop < newest && (self.values.len() - drop > keys || self.bytes > bytes) {
            if let Some((key, frame)) = self.values.get_index(drop) {
                self.bytes -= key.len() + frame.len();
            }
            drop += 1;
        }
        self.values.drain(..drop);
        tally.held_dropped += drop as u64;
    }
}

/// The default conflation key of a connection's publishes: the connection.
pub(super) fn session_key(core: usize, id: SessionId) -> Bytes {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&(core as u64).to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    Bytes::from(key)
}

/// Whether a counter going from `before` to `after` reached a new power of two: log
/// lines at 1, 2, 4, 8, ... events, never a flood.
pub(super) fn crossed_power_of_two(before: u64, after: u64) -> bool {
    after > 0 && (before == 0 || after.ilog2() > before.ilog2())
}

fn schedule_flush(topic: Arc<str>, id: u64, at: Instant) {
    tokio::task::spawn_local(async move {
        tokio::time::sleep_until(at).await;
        super::core::timer_fired(&topic, id);
    });
}
