//! Per-topic offsets, epochs and the last publications, for `ringsocket.v1` clients
//! (docs/protocol.md): what a reconnecting client recovers from.
//!
//! Every publish to a topic, from anywhere (a connection, `POST /publish`, another
//! process), is recorded here once, in the process, before it is fanned out: it gets the
//! topic's next offset, and its `ringsocket.v1` frame (the JSON envelope with `topic`,
//! `offset`, `epoch`, `data`) is encoded once and kept for `history_size` publications
//! and `history_ttl_secs`. The fan-out to the cores' inboxes happens while the topic's
//! lock is held, so every core receives a topic's publications in offset order.
//!
//! No gap, no duplicate on recovery: each core notes the last offset it delivered of
//! each topic (`delivered`, one atomic per core, written only by that core). A
//! subscription made on core C is served, from the history, the publications after
//! `since` up to that offset, and is registered before the core runs anything else:
//! every later publication reaches it through the core's inbox, in order.
//!
//! Bounds: `history_size` per topic, `history_ttl_secs` per publication, and
//! `history_memory_limit` over every topic (beyond it the topics published longest ago
//! lose their kept publications; their offsets and epochs stay, so a client behind
//! them is told `recovered: false`). A topic whose publications have all expired and
//! that saw no activity for `history_ttl_secs` is forgotten: its next publication starts
//! a new epoch at offset 1.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;

use super::lock;
use crate::broker::Accepted;
use crate::proto::conn::encode_server_frame;
use crate::proto::frame::split_unmasked_frame;
use crate::proto::{Message, OpCode};

/// Publications kept per topic when no server said otherwise (`history_size`).
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// How long a publication is kept when no server said otherwise (`history_ttl_secs`).
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
/// Bytes kept over every topic when no server said otherwise (`history_memory_limit`).
pub const DEFAULT_HISTORY_MEMORY_LIMIT: usize = 64 << 20;

/// Bookkeeping bytes counted per kept publication besides its frame.
const ENTRY_OVERHEAD: usize = 48;

/// Bytes counted per topic log besides its publications (the map entry, the log, its
/// name twice, its epoch, the per-core counters): a client that subscribes to many
/// topic names fills `history_memory_limit`, not the heap.
const LOG_OVERHEAD: usize = 320;

/// A per-core counter on a cache line of its own: every core writes its own on every
/// delivery of a busy topic.
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct CoreCounter(pub(crate) AtomicU64);

/// One counter per core.
pub(crate) type PerCore = Arc<[CoreCounter]>;

/// The history's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// Publications kept per topic (0: none; offsets and epochs still count).
    pub size: usize,
    /// How long each is kept.
    pub ttl: Duration,
    /// Bytes kept over every topic.
    pub memory_limit: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            size: DEFAULT_HISTORY_SIZE,
            ttl: DEFAULT_HISTORY_TTL,
            memory_limit: DEFAULT_HISTORY_MEMORY_LIMIT,
        }
    }
}

/// A topic's position: the last offset (0 before the first publication) and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The offset of the last publication.
    pub offset: u64,
    /// The topic's epoch: changes whenever its offsets start again.
    pub epoch: Arc<str>,
}

/// Where a `ringsocket.v1` client says it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The offset of the last publication it handled.
    pub offset: u64,
    /// The epoch of that publication.
    pub epoch: String,
}

/// What the history could give after a [`Since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Whether every publication after `since` is in `frames` (same epoch, still kept).
    pub recovered: bool,
    /// The publications after `since`, oldest first, as `ringsocket.v1` frames.
    pub frames: Vec<Bytes>,
}

/// One kept publication.
struct Entry {
    offset: u64,
    at: Instant,
    /// The `ringsocket.v1` frame (a text frame holding the envelope).
    frame: Bytes,
}

/// One topic's offsets and kept publications.
pub(crate) struct TopicLog {
    epoch: Arc<str>,
    /// The offset of the last publication (0: none yet).
    top: u64,
    entries: VecDeque<Entry>,
    /// Bytes of `entries`, as counted in the history's total.
    bytes: usize,
    /// The last publication or subscription.
    active: Instant,
    /// The last offset each core delivered (written by that core only).
    delivered: PerCore,
    /// The last offset handed to each core's inbox (written under this log's lock).
    queued: PerCore,
    /// Bytes counted for this log besides its entries ([`LOG_OVERHEAD`] and its name).
    overhead: usize,
    /// The name `ringsocket.v1` subscribers are registered under on each core.
    v1_name: Arc<str>,
    /// A numbered publication reported as a gap once (the broker fills it, then hands
    /// it over again: taken then, whatever is still missing).
    gap_at: u64,
}

/// Where a numbered publication stands against a topic's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// At or below the last offset: seen already.
    Seen,
    /// Offsets missing after this one.
    Gap(u64),
    /// The next one (or taken whatever is missing).
    Next,
}

/// The `ringsocket.v1` side of one publication, fanned out with it.
pub(crate) struct Recorded {
    /// The topic's registry name for `ringsocket.v1` subscribers.
    pub(crate) v1_name: Arc<str>,
    /// The `ringsocket.v1` frame.
    pub(crate) frame: Bytes,
    /// Its offset.
    pub(crate) offset: u64,
    /// Each core's last delivered offset: the core delivering it writes its own.
    pub(crate) delivered: PerCore,
    /// Each core's last offset handed to its inbox (the fan-out writes it).
    pub(crate) queued: PerCore,
}

impl Recorded {
    /// Whether core `core` has delivered every earlier publication of the topic that
    /// was handed to its inbox: then this one may be delivered there at once, in order.
    pub(crate) fn in_order_on(&self, core: usize) -> bool {
        match (self.delivered.get(core), self.queued.get(core)) {
            (Some(delivered), Some(queued)) => {
                queued.0.load(Ordering::Acquire) <= delivered.0.load(Ordering::Acquire)
            }
            _ => true,
        }
    }
}

impl TopicLog {
    /// The topic's position as core `core` has delivered it: what a subscription made
    /// there now starts after.
    pub(crate) fn position_on(&self, core: usize) -> Position {
        let offset = self
            .delivered
            .get(core)
            .map_or(self.top, |d| d.0.load(Ordering::Acquire));
        Position {
            offset,
            epoch: self.epoch.clone(),
        }
    }

    /// The topic's position.
    pub(crate) fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// The publications after `since` up to offset `upto`, at most `limit`.
    pub(crate) fn since(&self, since: &Since, upto: u64, limit: usize) -> Recovery {
        if *since.epoch != *self.epoch || since.offset > self.top {
            return Recovery {
                recovered: false,
                frames: Vec::new(),
            };
        }
        let wanted = upto.saturating_sub(since.offset);
        let frames: Vec<Bytes> = self
            .entries
            .iter()
            .filter(|e| e.offset > since.offset && e.offset <= upto)
            .take(limit)
            .map(|e| e.frame.clone())
            .collect();
        Recovery {
            recovered: frames.len() as u64 == wanted,
            frames,
        }
    }

    /// `GET /history`: the position, whether every publication after `since` is still
    /// kept, and up to `limit` of them.
    pub(crate) fn page(&self, since: u64, limit: usize) -> (Position, bool, Vec<Bytes>) {
        let kept = since >= self.top
            || self
                .entries
                .front()
                .is_some_and(|first| first.offset <= since + 1);
        let frames = self
            .entries
            .iter()
            .filter(|e| e.offset > since)
            .take(limit)
            .map(|e| e.frame.clone())
            .collect();
        (self.position(), kept, frames)
    }

    /// Records a publication of `data` (a JSON value; `base64` when it encodes a binary
    /// message) at `now`, returns its `ringsocket.v1` side and the bytes the history
    /// grew by (negative when old entries went).
    fn record(
        &mut self,
        topic: &str,
        data: &[u8],
        base64: bool,
        now: Instant,
        settings: &HistorySettings,
    ) -> (Recorded, isize) {
        self.top += 1;
        self.active = now;
        let frame = envelope(topic, self.top, &self.epoch, data, base64);
        let before = self.bytes;
        if settings.size > 0 {
            self.bytes += frame.len() + ENTRY_OVERHEAD;
            self.entries.push_back(Entry {
                offset: self.top,
                at: now,
                frame: frame.clone(),
            });
        }
        self.prune(now, settings);
        let grew = self.bytes as isize - before as isize;
        (
            Recorded {
                v1_name: self.v1_name.clone(),
                frame,
                offset: self.top,
                delivered: self.delivered.clone(),
                queued: self.queued.clone(),
            },
            grew,
        )
    }

    /// Where a publication the broker numbered `offset` in `epoch` stands. A new epoch
    /// starts this log over (returns the bytes freed).
    fn accept(&mut self, offset: u64, epoch: &str) -> (Verdict, usize) {
        let mut freed = 0;
        if *self.epoch != *epoch {
            freed = self.clear();
            self.epoch = epoch.into();
            self.top = offset - 1;
            self.gap_at = 0;
        }
        // A gap is reported once, for the highest offset that showed it: what the
        // broker then hands over to fill it (some of it may be gone from its history)
        // and that offset again are taken as they come.
        let verdict = if offset <= self.top {
            Verdict::Seen
        } else if offset > self.top + 1 && offset > self.gap_at {
            self.gap_at = offset;
            Verdict::Gap(self.top)
        } else {
            Verdict::Next
        };
        (verdict, freed)
    }

    /// Records a publication the broker numbered, at its offset (after [`Self::accept`]
    /// said `Next`).
    fn record_at(
        &mut self,
        topic: &str,
        offset: u64,
        data: &[u8],
        base64: bool,
        now: Instant,
        settings: &HistorySettings,
    ) -> (Recorded, isize) {
        let before = self.bytes;
        self.top = offset;
        self.active = now;
        let frame = envelope(topic, offset, &self.epoch, data, base64);
        self.keep(offset, frame.clone(), now, settings);
        self.prune(now, settings);
        let grew = self.bytes as isize - before as isize;
        (
            Recorded {
                v1_name: self.v1_name.clone(),
                frame,
                offset,
                delivered: self.delivered.clone(),
                queued: self.queued.clone(),
            },
            grew,
        )
    }

    /// Keeps `frame` at `offset`, in offset order, unless it is kept already.
    fn keep(&mut self, offset: u64, frame: Bytes, at: Instant, settings: &HistorySettings) {
        if settings.size == 0 {
            return;
        }
        let position = self.entries.partition_point(|e| e.offset < offset);
        if self
            .entries
            .get(position)
            .is_some_and(|e| e.offset == offset)
        {
            return;
        }
        self.bytes += frame.len() + ENTRY_OVERHEAD;
        self.entries.insert(position, Entry { offset, at, frame });
    }

    /// Takes in what the broker's history holds (`epoch`, its last offset `top`, the
    /// publications after some offset): another epoch starts this log over; kept
    /// publications missing here are added. `idle`: nobody in the process listens to
    /// the topic, so this log's last offset follows the broker's (nothing in flight
    /// here needs it). Returns the bytes the log grew by, and whether the epoch
    /// changed (what the cores delivered is then of the old one).
    pub(crate) fn merge(
        &mut self,
        topic: &str,
        epoch: &str,
        top: u64,
        entries: &[(u64, Vec<u8>, bool)],
        idle: bool,
        settings: &HistorySettings,
    ) -> (isize, bool) {
        let before = self.bytes as isize;
        let new_epoch = *self.epoch != *epoch && !epoch.is_empty();
        if new_epoch {
            self.clear();
            self.epoch = epoch.into();
            self.top = top;
            self.gap_at = 0;
        } else if idle && top > self.top {
            self.top = top;
        }
        let now = Instant::now();
        for (offset, data, base64) in entries {
            let frame = envelope(topic, *offset, &self.epoch, data, *base64);
            self.keep(*offset, frame, now, settings);
        }
        self.prune(now, settings);
        (self.bytes as isize - before, new_epoch)
    }

    /// Drops what is beyond `size` or older than `ttl`; returns the bytes freed.
    fn prune(&mut self, now: Instant, settings: &HistorySettings) -> usize {
        let before = self.bytes;
        while let Some(first) = self.entries.front() {
            let old = now.saturating_duration_since(first.at) > settings.ttl;
            if self.entries.len() <= settings.size && !old {
                break;
            }
            self.bytes -= first.frame.len() + ENTRY_OVERHEAD;
            self.entries.pop_front();
        }
        before - self.bytes
    }

    /// Drops every kept publication; returns the bytes freed.
    fn clear(&mut self) -> usize {
        self.entries.clear();
        std::mem::take(&mut self.bytes)
    }
}

/// Every topic's log, in one process.
pub(crate) struct History {
    topics: Mutex<HashMap<Arc<str>, Arc<Mutex<TopicLog>>>>,
    /// The bounds, as atomics: read on every publish, set before serving.
    size: AtomicUsize,
    ttl_ms: AtomicU64,
    memory_limit: AtomicUsize,
    /// Bytes kept over every topic.
    bytes: AtomicUsize,
    /// Cores of the server (the length of each topic's `delivered`).
    cores: AtomicUsize,
    /// When the clock below was read first, and the last sweep in ms after it.
    epoch_start: Instant,
    last_sweep_ms: AtomicU64,
    /// Held by the one eviction running.
    evicting: Mutex<()>,
    /// Topics that lost their kept publications to `memory_limit`.
    pub(crate) evicted: AtomicU64,
}

impl Default for History {
    fn default() -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            size: AtomicUsize::new(DEFAULT_HISTORY_SIZE),
            ttl_ms: AtomicU64::new(DEFAULT_HISTORY_TTL.as_millis() as u64),
            memory_limit: AtomicUsize::new(DEFAULT_HISTORY_MEMORY_LIMIT),
            bytes: AtomicUsize::new(0),
            cores: AtomicUsize::new(0),
            epoch_start: Instant::now(),
            last_sweep_ms: AtomicU64::new(0),
            evicting: Mutex::new(()),
            evicted: AtomicU64::new(0),
        }
    }
}

impl History {
    /// Sets the bounds (before serving) and the number of cores.
    pub(crate) fn configure(&self, settings: HistorySettings, cores: usize) {
        self.size.store(settings.size, Ordering::Relaxed);
        self.ttl_ms
            .store(settings.ttl.as_millis() as u64, Ordering::Relaxed);
        self.memory_limit
            .store(settings.memory_limit, Ordering::Relaxed);
        self.cores.store(cores, Ordering::Relaxed);
    }

    pub(crate) fn settings(&self) -> HistorySettings {
        HistorySettings {
            size: self.size.load(Ordering::Relaxed),
            ttl: Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed)),
            memory_limit: self.memory_limit.load(Ordering::Relaxed),
        }
    }

    /// Bytes kept over every topic.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Topics with a log.
    pub(crate) fn topics(&self) -> usize {
        lock(&self.topics).len()
    }

    /// The log of `topic`, if it has one (nothing is made).
    pub(crate) fn peek<R>(&self, topic: &str, f: impl FnOnce(&mut TopicLog) -> R) -> Option<R> {
        let log = lock(&self.topics).get(topic).cloned()?;
        let mut log = lock(&log);
        self.pruned(&mut log, Instant::now(), &self.settings());
        Some(f(&mut log))
    }

    /// Runs `f` on the log of `topic` (made, with a new epoch, if there is none), with
    /// the topic's lock held: what `f` fans out reaches every core in offset order.
    pub(crate) fn with_topic<R>(&self, topic: &str, f: impl FnOnce(&mut TopicLog) -> R) -> R {
        self.with_topic_using(topic, &self.settings(), f)
    }

    fn with_topic_using<R>(
        &self,
        topic: &str,
        settings: &HistorySettings,
        f: impl FnOnce(&mut TopicLog) -> R,
    ) -> R {
        let now = Instant::now();
        let log = {
            let mut topics = lock(&self.topics);
            match topics.get(topic) {
                Some(log) => log.clone(),
                None => {
                    let cores = self.cores.load(Ordering::Relaxed);
                    let per_core =
                        || -> PerCore { (0..cores).map(|_| CoreCounter::default()).collect() };
                    let overhead = LOG_OVERHEAD + 2 * topic.len();
                    let log = Arc::new(Mutex::new(TopicLog {
                        epoch: new_epoch(),
                        top: 0,
                        entries: VecDeque::new(),
                        bytes: 0,
                        active: now,
                        delivered: per_core(),
                        queued: per_core(),
                        overhead,
                        v1_name: super::v1_name(topic).into(),
                        gap_at: 0,
                    }));
                    self.bytes.fetch_add(overhead, Ordering::Relaxed);
                    topics.insert(topic.into(), log.clone());
                    log
                }
            }
        };
        let mut log = lock(&log);
        log.active = now;
        self.pruned(&mut log, now, settings);
        f(&mut log)
    }

    /// Prunes `log` (its lock held) and takes what it freed off the total.
    fn pruned(&self, log: &mut TopicLog, now: Instant, settings: &HistorySettings) {
        let freed = log.prune(now, settings);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Records a publication of `message` to `topic` and runs `fan_out` with its
    /// `ringsocket.v1` side, the topic's lock held. Returns what `fan_out` returned and
    /// the publication's position.
    pub(crate) fn record<R>(
        &self,
        topic: &str,
        message: &Message,
        known_json: bool,
        fan_out: impl FnOnce(Recorded) -> R,
    ) -> (R, Position) {
        let settings = self.settings();
        let (data, base64) = data_of(message, known_json);
        let (out, position, total) = self.with_topic_using(topic, &settings, |log| {
            let (recorded, grew) = log.record(topic, &data, base64, Instant::now(), &settings);
            // Counted while the log's lock is held, so that an eviction of this log
            // never takes off bytes the total does not hold yet.
            let total = if grew >= 0 {
                self.bytes.fetch_add(grew as usize, Ordering::Relaxed) + grew as usize
            } else {
                let freed = grew.unsigned_abs();
                self.bytes
                    .fetch_sub(freed, Ordering::Relaxed)
                    .saturating_sub(freed)
            };
            let position = Position {
                offset: recorded.offset,
                epoch: log.epoch.clone(),
            };
            (fan_out(recorded), position, total)
        });
        if total > settings.memory_limit {
            self.evict(settings.memory_limit);
        }
        (out, position)
    }

    /// Records a publication the broker numbered `offset` in `epoch` and runs
    /// `fan_out` with its `ringsocket.v1` side, the topic's lock held; or reports a gap
    /// (once) or a publication seen already.
    pub(crate) fn record_at(
        &self,
        topic: &str,
        message: &Message,
        offset: u64,
        epoch: &str,
        fan_out: impl FnOnce(Recorded),
    ) -> Accepted {
        let settings = self.settings();
        let (accepted, total) = self.with_topic_using(topic, &settings, |log| {
            let (verdict, freed) = log.accept(offset, epoch);
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            match verdict {
                Verdict::Seen => (Accepted::Delivered, 0),
                Verdict::Gap(after) => (Accepted::Gap { after }, 0),
                Verdict::Next => {
                    let (data, base64) = data_of(message, false);
                    let (recorded, grew) =
                        log.record_at(topic, offset, &data, base64, Instant::now(), &settings);
                    let total = self.add(grew);
                    fan_out(recorded);
                    (Accepted::Delivered, total)
                }
            }
        });
        if total > settings.memory_limit {
            self.evict(settings.memory_limit);
        }
        accepted
    }

    /// Adds `grew` (negative: takes off) to the total (a log's lock held); returns it.
    pub(crate) fn add(&self, grew: isize) -> usize {
        if grew >= 0 {
            self.bytes.fetch_add(grew as usize, Ordering::Relaxed) + grew as usize
        } else {
            let freed = grew.unsigned_abs();
            self.bytes
                .fetch_sub(freed, Ordering::Relaxed)
                .saturating_sub(freed)
        }
    }

    /// Clears the topics published longest ago until the total is under 7/8 of
    /// `limit` (a little room, so that the next publishes do not evict again at once).
    fn evict(&self, limit: usize) {
        // One eviction at a time: the others' publishes go on.
        let Ok(_evicting) = self.evicting.try_lock() else {
            return;
        };
        let mut by_age: Vec<(Instant, Arc<Mutex<TopicLog>>)> = lock(&self.topics)
            .values()
            .filter_map(|log| {
                let at = log.try_lock().ok()?.active;
                Some((at, log.clone()))
            })
            .collect();
        by_age.sort_by_key(|(at, _)| *at);
        let goal = limit / 8 * 7;
        let mut cleared = 0u64;
        for (_, log) in &by_age {
            if self.bytes() <= goal {
                break;
            }
            let Ok(mut log) = log.try_lock() else {
                continue;
            };
            let freed = log.clear();
            if freed > 0 {
                cleared += 1;
                self.bytes.fetch_sub(freed, Ordering::Relaxed);
            }
        }
        drop(by_age);
        if self.bytes() > goal {
            // Still over: logs that keep nothing (many topic names) go, the idle ones
            // first; their next publication starts a new epoch.
            self.forget(|log, _| log.entries.is_empty(), goal);
        }
        let before = self.evicted.fetch_add(cleared, Ordering::Relaxed);
        if cleared > 0 && (before + cleared).is_power_of_two() {
            tracing::warn!(
                limit,
                evicted = before + cleared,
                "history_memory_limit reached: the topics published longest ago lost their kept publications (clients behind them get recovered: false)"
            );
        }
    }

    /// Evicts if the total is over the limit (after a subscription made a log).
    pub(crate) fn check_limit(&self) {
        let limit = self.settings().memory_limit;
        if self.bytes() > limit {
            self.evict(limit);
        }
    }

    /// Removes the logs nobody holds for which `gone` says so, until the total is at
    /// most `goal` (`usize::MAX`: every such log).
    fn forget(&self, gone: impl Fn(&TopicLog, &str) -> bool, goal: usize) {
        let mut topics = lock(&self.topics);
        topics.retain(|topic, log| {
            if self.bytes() <= goal {
                return true;
            }
            // Held by nobody else: no publish or subscription is between looking it
            // up and locking it (clones are made under the map's lock, held here).
            if Arc::strong_count(log) != 1 {
                return true;
            }
            let Ok(log) = log.try_lock() else {
                return true;
            };
            if !gone(&log, topic) {
                return true;
            }
            self.bytes
                .fetch_sub(log.bytes + log.overhead, Ordering::Relaxed);
            false
        });
    }

    /// Forgets the topics that keep nothing, saw no activity for the ttl and have no
    /// subscriber here (`subscribed`), at most once every quarter of the ttl (at least
    /// a second apart). Expired publications of idle topics go too.
    pub(crate) fn sweep(&self, subscribed: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let settings = self.settings();
        let ttl = settings.ttl;
        // One relaxed load on most publishes; the sweeper is whoever swaps the clock.
        let now_ms = now.saturating_duration_since(self.epoch_start).as_millis() as u64;
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        let every = (ttl / 4).max(Duration::from_secs(1)).as_millis() as u64;
        if now_ms.saturating_sub(last) < every
            || self
                .last_sweep_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        for log in lock(&self.topics).values() {
            if let Ok(mut log) = log.try_lock() {
                let freed = log.prune(now, &settings);
                self.bytes.fetch_sub(freed, Ordering::Relaxed);
            }
        }
        self.forget(
            |log, topic| {
                log.entries.is_empty()
                    && now.saturating_duration_since(log.active) > ttl
                    && !subscribed(topic)
            },
            0,
        );
    }
}

/// The `data` of a publication of `message`: a text that is one JSON value as it is,
/// any other text as a JSON string, a binary message as a base64 JSON string (then
/// `true`). `known_json`: the text was checked already.
pub(crate) fn data_of(message: &Message, known_json: bool) -> (Cow<'_, [u8]>, bool) {
    match message {
        Message::Text(text) => {
            let bytes = text.as_bytes();
            if known_json || serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
                (Cow::Borrowed(&bytes[..]), false)
            } else {
                (Cow::Owned(json_string(text.as_str())), false)
            }
        }
        Message::Binary(bytes) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            (Cow::Owned(json_string(&encoded)), true)
        }
    }
}

/// `s` as a JSON string.
fn json_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    out
}

/// Appends `s` as a JSON string.
fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The `ringsocket.v1` frame of a publication, written in one buffer.
pub(crate) fn envelope(topic: &str, offset: u64, epoch: &str, data: &[u8], base64: bool) -> Bytes {
    use std::io::Write;
    let mut json = Vec::with_capacity(data.len() + topic.len() + epoch.len() + 72);
    json.extend_from_slice(b"{\"type\":\"pub\",\"topic\":");
    push_json_string(&mut json, topic);
    let _ = write!(json, ",\"offset\":{offset},\"epoch\":");
    push_json_string(&mut json, epoch);
    if base64 {
        json.extend_from_slice(b",\"encoding\":\"base64\"");
    }
    json.extend_from_slice(b",\"data\":");
    json.extend_from_slice(data);
    json.push(b'}');
    encode_server_frame(OpCode::Text, &json)
}

/// The JSON text of a `ringsocket.v1` frame made here.
pub(crate) fn frame_json(frame: &Bytes) -> Bytes {
    split_unmasked_frame(frame)
        .map(|(_, payload)| payload)
        .unwrap_or_default()
}

/// A new epoch: 16 random hex digits.
fn new_epoch() -> Arc<str> {
    let mut raw = [0u8; 8];
    if getrandom::fill(&mut raw).is_err() {
        // No system randomness: the clock still tells one epoch from the next.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        raw = nanos.to_be_bytes();
    }
    raw.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Utf8Bytes;

    fn text(s: &str) -> Message {
        Message::Text(Utf8Bytes::from(s.to_owned()))
    }

    fn settings(size: usize) -> HistorySettings {
        HistorySettings {
            size,
            ..HistorySettings::default()
        }
    }

    fn history(size: usize) -> History {
        let h = History::default();
        h.configure(settings(size), 1);
        h
    }

    fn json(frame: &Bytes) -> serde_json::Value {
        serde_json::from_slice(&frame_json(frame)).unwrap()
    }

    #[test]
    fn offsets_count_from_one_in_an_epoch() {
        let h = history(10);
        let (f1, p1) = h.record("t", &text("{\"a\":1}"), false, |r| r.frame);
        let (f2, p2) = h.record("t", &text("hello"), false, |r| r.frame);
        assert_eq!((p1.offset, p2.offset), (1, 2));
        assert_eq!(p1.epoch, p2.epoch);
        assert_eq!(p1.epoch.len(), 16);
        let (v1, v2) = (json(&f1), json(&f2));
        assert_eq!(v1["type"], "pub");
        assert_eq!(v1["topic"], "t");
        assert_eq!(v1["offset"], 1);
        assert_eq!(v1["epoch"], &*p1.epoch);
        assert_eq!(v1["data"], serde_json::json!({"a": 1}));
        assert_eq!(v2["data"], "hello", "text that is not JSON is a string");
        let (_, other) = h.record("u", &text("1"), false, |_| ());
        assert_eq!(other.offset, 1, "offsets are per topic");
        assert_ne!(other.epoch, p1.epoch);
    }

    #[test]
    fn binary_is_base64_and_topics_are_escaped() {
        let h = history(10);
        let (f, _) = h.record(
            "a\"b",
            &Message::Binary(Bytes::from_static(&[0, 255, 1])),
            false,
            |r| r.frame,
        );
        let v = json(&f);
        assert_eq!(v["topic"], "a\"b");
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["data"], "AP8B");
    }

    #[test]
    fn recovery_within_history_is_complete_and_ordered() {
        let h = history(10);
        let mut epoch = String::new();
        for i in 1..=8 {
            let (_, p) = h.record("t", &text(&i.to_string()), false, |_| ());
            epoch = p.epoch.to_string();
        }
        let since = Since {
            offset: 5,
            epoch: epoch.clone(),
        };
        let r = h.with_topic("t", |log| log.since(&since, 8, usize::MAX));
        assert!(r.recovered);
        let offsets: Vec<u64> = r
            .frames
            .iter()
            .map(|f| json(f)["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [6, 7, 8]);
        // Up to what the core delivered only: the rest comes through its inbox.
        let r = h.with_topic("t", |log| log.since(&since, 7, usize::MAX));
        assert!(r.recovered);
        assert_eq!(r.frames.len(), 2);
        // Nothing missed.
        let r = h.with_topic("t", |log| {
            log.since(&Since { offset: 8, epoch }, 8, usize::MAX)
        });
        assert!(r.recovered && r.frames.is_empty());
    }

    #[test]
    fn recovery_fails_beyond_history_or_in_another_epoch() {
        let h = history(3);
        let mut epoch = String::new();
        for i in 1..=10 {
            let (_, p) = h.record("t", &text(&i.to_string()), false, |_| ());
            epoch = p.epoch.to_string();
        }
        let r = h.with_topic("t", |log| {
            log.since(
                &Since {
                    offset: 2,
                    epoch: epoch.clone(),
                },
                10,
                usize::MAX,
            )
        });
        assert!(!r.recovered);
        assert_eq!(r.frames.len(), 3, "what is still kept is sent");
        let r = h.with_topic("t", |log| {
            log.since(
                &Since {
                    offset: 9,
                    epoch: "0000000000000000".into(),
                },
                10,
                usize::MAX,
            )
        });
        assert!(!r.recovered && r.frames.is_empty());
        let r = h.with_topic("t", |log| {
            log.since(&Since { offset: 11, epoch }, 10, usize::MAX)
        });
        assert!(!r.recovered, "an offset from the future is not ours");
    }

    #[test]
    fn size_zero_keeps_offsets_but_nothing_else() {
        let h = history(0);
        for _ in 0..5 {
            h.record("t", &text("x"), false, |_| ());
        }
        assert_eq!(h.bytes(), LOG_OVERHEAD + 2);
        let p = h.with_topic("t", |log| log.position());
        assert_eq!(p.offset, 5);
    }

    #[test]
    fn the_memory_limit_evicts_the_oldest_topics_and_keeps_their_epoch() {
        let h = History::default();
        h.configure(
            HistorySettings {
                size: 1000,
                ttl: Duration::from_secs(300),
                memory_limit: 8 << 10,
            },
            1,
        );
        let (_, first) = h.record("old", &text(&"x".repeat(1000)), false, |_| ());
        std::thread::sleep(Duration::from_millis(2));
        for _ in 0..20 {
            h.record("new", &text(&"y".repeat(500)), false, |_| ());
        }
        assert!(h.bytes() <= 8 << 10, "{}", h.bytes());
        assert!(h.evicted.load(Ordering::Relaxed) >= 1);
        let (kept, position) = h.with_topic("old", |log| (log.entries.len(), log.position()));
        assert_eq!(kept, 0);
        assert_eq!(position, first, "offsets and epoch survive an eviction");
    }

    /// What a numbering broker holds is merged in: kept publications missing here are
    /// added in offset order; another epoch starts the log over and says so.
    #[test]
    fn a_broker_snapshot_merges_in_order_or_starts_a_new_epoch() {
        let h = history(10);
        let settings = h.settings();
        h.with_topic("t", |log| {
            let epoch = log.epoch.to_string();
            let entries = vec![
                (3, b"3".to_vec(), false),
                (1, b"1".to_vec(), false),
                (2, b"2".to_vec(), false),
            ];
            let (grew, new_epoch) = log.merge("t", &epoch, 3, &entries, true, &settings);
            assert!(grew > 0 && !new_epoch);
            assert_eq!(log.top, 3, "idle: the broker's last offset");
            let offsets: Vec<u64> = log.entries.iter().map(|e| e.offset).collect();
            assert_eq!(offsets, [1, 2, 3]);
            // Merged twice: nothing kept twice.
            let (grew, _) = log.merge("t", &epoch, 3, &entries, true, &settings);
            assert_eq!(grew, 0);
            let (_, new_epoch) = log.merge(
                "t",
                "00000000000000ff",
                1,
                &[(1, b"x".to_vec(), false)],
                false,
                &settings,
            );
            assert!(new_epoch);
            assert_eq!(
                (&*log.epoch, log.top, log.entries.len()),
                ("00000000000000ff", 1, 1)
            );
        });
    }

    /// A gap is reported once; what fills it, even with some offsets gone from the
    /// broker's history, and the publication that showed it are then taken in order.
    #[test]
    fn a_gap_is_reported_once_and_its_filling_taken_as_it_comes() {
        let h = history(10);
        h.with_topic("t", |log| {
            let epoch = log.epoch.to_string();
            for offset in 1..=5 {
                assert_eq!(log.accept(offset, &epoch).0, Verdict::Next);
                log.top = offset;
            }
            assert_eq!(log.accept(5, &epoch).0, Verdict::Seen);
            assert_eq!(log.accept(11, &epoch).0, Verdict::Gap(5));
            // 6 and 7 are gone at the broker: 8, 9, 10 fill what they can.
            for offset in [8, 9, 10, 11] {
                assert_eq!(log.accept(offset, &epoch).0, Verdict::Next, "{offset}");
                log.top = offset;
            }
            assert_eq!(log.accept(13, &epoch).0, Verdict::Gap(11), "a new gap");
            // Another epoch starts over, and its gaps are reported again.
            assert_eq!(log.accept(1, "00000000000000ee").0, Verdict::Next);
            log.top = 1;
            assert_eq!(log.accept(4, "00000000000000ee").0, Verdict::Gap(1));
        });
    }

    /// A log someone looked up (and is about to lock) is never forgotten under them.
    #[test]
    fn a_held_log_is_not_forgotten() {
        let h = History::default();
        h.configure(
            HistorySettings {
                size: 0,
                ttl: Duration::from_millis(1),
                memory_limit: 1 << 20,
            },
            1,
        );
        h.record("t", &text("x"), false, |_| ());
        let held = lock(&h.topics).get("t").cloned().unwrap();
        h.forget(|_, _| true, 0);
        assert_eq!(h.topics(), 1, "held by someone: kept");
        drop(held);
        h.forget(|_, _| true, 0);
        assert_eq!(h.topics(), 0);
        assert_eq!(h.bytes(), 0, "its overhead is given back");
    }

    /// The total stays the sum of what the logs hold while two threads publish and
    /// evict at once.
    #[test]
    fn the_total_matches_the_logs_under_concurrent_evictions() {
        let h = Arc::new(History::default());
        h.configure(
            HistorySettings {
                size: 50,
                ttl: Duration::from_secs(300),
                memory_limit: 32 << 10,
            },
            1,
        );
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        let topic = format!("t{}", (i * 7 + t) % 40);
                        h.record(&topic, &text(&"x".repeat(i % 300)), false, |_| ());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let sum: usize = lock(&h.topics)
            .values()
            .map(|log| {
                let log = lock(log);
                log.bytes + log.overhead
            })
            .sum();
        assert_eq!(h.bytes(), sum);
        assert!(h.evicted.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let h = History::default();
        h.configure(
            HistorySettings {
                size: 10,
                ttl: Duration::from_millis(1),
                memory_limit: 1 << 20,
            },
            1,
        );
        h.record("t", &text("x"), false, |_| ());
        std::thread::sleep(Duration::from_millis(5));
        let (kept, overhead) = h.with_topic("t", |log| (log.entries.len(), log.overhead));
        assert_eq!(kept, 0);
        assert_eq!(h.bytes(), overhead);
    }
}
