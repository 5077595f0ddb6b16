//! A feed: one stream of frames that many sessions of a core follow, such as a topic's
//! broadcasts. Each frame is copied once, back to back with the others, into the feed;
//! a follower holds only its position in it.
//!
//! Publishing a frame to a feed costs the same for one follower as for 10,000: the
//! frame is appended and the feed is put in the core's flush queue. The flusher then
//! passes over the followers ([`Feed::write_batch`]) and writes to each, in one
//! non-blocking `send` (`sendmsg` when its own queue holds something, which goes
//! first), every feed frame past its position: one slice, however many frames.
//! Nothing is done per frame and subscriber: no queue entry, no reference count, no
//! slice.
//!
//! After a follower's turn its position is the feed's end: what the socket did not
//! take, and what cannot be written now (the driver has a write in flight, the
//! connection is closing or has no driver), is copied into the connection's own
//! queue, where the outbound limit (slow consumers) and the driver's io_uring write
//! take over. So the feed only holds what arrived since the current pass began, and
//! drops it when the pass ends.
//!
//! Order: a session follows one feed at most, and everything else sent to it (the
//! handler's `send`, a Close) first moves the feed frames before its position into
//! its queue (`State::catch_up`), so each follower gets everything in the order it was
//! queued. Control frames the runtime adds (pings, pongs) may go ahead of feed frames,
//! which RFC 6455 allows.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use super::core::outbox::{FeedHandle, FeedView};
use super::session::SessionInner;
use crate::metrics::WorkerMetrics;

/// A session's place in the feed it follows.
pub(crate) type Follow = super::core::outbox::Follow<Rc<Feed>>;

/// Bytes of frames an empty feed keeps room for; it lets go of more.
const KEPT_CAPACITY: usize = 64 * 1024;

/// Frames that the sessions of one core follow (see the module docs).
pub struct Feed {
    inner: RefCell<FeedInner>,
}

pub(crate) struct FeedInner {
    /// The frames from number `base` on, back to back (a `Vec`, not a ring: what it
    /// owes a follower is then always one slice, and the frames kept after a pass,
    /// those that arrived during it, are few to move to the front).
    data: Vec<u8>,
    /// Where each frame from number `base` on starts, as an offset in the feed's
    /// whole stream; `data[0]` is at offset `data_start`.
    starts: VecDeque<u64>,
    base: u64,
    data_start: u64,
    followers: Vec<Rc<SessionInner>>,
    /// The pass over the followers under way.
    pass: Option<Pass>,
    /// Whether the feed is in the core's flush queue.
    queued: bool,
    /// Followers found closing during passes (their ids), for the owner to drop.
    closing: Vec<usize>,
}

#[derive(Clone, Copy)]
struct Pass {
    /// The index of the next follower to visit.
    at: usize,
    /// The feed's end when the pass began: every follower is at least there after it.
    end: u64,
    /// When it began.
    started: Instant,
}

impl Feed {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            inner: RefCell::new(FeedInner {
                data: Vec::new(),
                starts: VecDeque::new(),
                base: 0,
                data_start: 0,
                followers: Vec::new(),
                pass: None,
                queued: false,
                closing: Vec::new(),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &RefCell<FeedInner> {
        &self.inner
    }

    /// How many sessions follow this feed.
    pub fn followers(&self) -> usize {
        self.inner.borrow().followers.len()
    }

    /// Appends `frame` (an encoded server frame) for every follower.
    pub fn push(self: &Rc<Self>, frame: &[u8]) {
        let mut inner = self.inner.borrow_mut();
        if inner.followers.is_empty() {
            return;
        }
        let offset = inner.data_start + inner.data.len() as u64;
        inner.starts.push_back(offset);
        inner.data.extend_from_slice(frame);
        if !inner.queued {
            inner.queued = true;
            drop(inner);
            super::flush::enqueue(self.clone());
        }
    }

    /// Appends `frame` for every follower but `skip`: what `skip` was owed before is
    /// moved to its own queue, and its position set after the frame.
    pub fn push_except(self: &Rc<Self>, frame: &[u8], skip: &super::Session) {
        let mut state = skip.state().borrow_mut();
        let follows = state
            .out
            .follow()
            .is_some_and(|follow| Rc::ptr_eq(&follow.feed, self));
        if !follows {
            drop(state);
            return self.push(frame);
        }
        state.catch_up();
        drop(state);
        self.push(frame);
        let end = self.inner.borrow().end();
        if let Some(follow) = skip.state().borrow_mut().out.follow_mut() {
            follow.next = end;
        }
    }

    /// Makes `session` follow this feed from its end. Unfollows its earlier feed,
    /// after moving what it was owed there to its queue.
    pub fn follow(self: &Rc<Self>, session: &super::Session) {
        unfollow(session);
        let mut inner = self.inner.borrow_mut();
        let index = inner.followers.len();
        let next = inner.end();
        inner.followers.push(session.inner.clone());
        session.state().borrow_mut().out.set_follow(Follow {
            feed: self.clone(),
            index,
            next,
        });
    }

    /// Whether `session` follows this feed.
    pub fn is_followed_by(self: &Rc<Self>, session: &super::Session) -> bool {
        session
            .state()
            .borrow()
            .out
            .follow()
            .is_some_and(|follow| Rc::ptr_eq(&follow.feed, self))
    }

    /// The ids of followers found closing since the last call: they can no longer be
    /// sent to, and their owner may drop them before their teardown does.
    pub fn take_closing(&self) -> Vec<usize> {
        std::mem::take(&mut self.inner.borrow_mut().closing)
    }

    /// Writes to the next followers of the current pass (starting one if none is under
    /// way), at most `budget` of them. Returns how many it visited and whether the feed
    /// must stay in the flush queue: its pass is not over, or frames arrived during it.
    pub(crate) fn write_batch(&self, budget: usize, metrics: &WorkerMetrics) -> (usize, bool) {
        let (from, to) = {
            let mut inner = self.inner.borrow_mut();
            let end = inner.end();
            let len = inner.followers.len();
            let pass = inner.pass.get_or_insert_with(|| Pass {
                at: 0,
                end,
                started: Instant::now(),
            });
            let from = pass.at.min(len);
            let to = (from + budget).min(len);
            pass.at = to;
            (from, to)
        };
        {
            let inner = self.inner.borrow();
            let mut closing = Vec::new();
            let followers = &inner.followers[from..to];
            for (i, session) in followers.iter().enumerate() {
                if let Some(ahead) = followers.get(i + PREFETCH_AHEAD) {
                    prefetch(ahead);
                }
                let mut state = session.state.borrow_mut();
                if !state.write_now(Some(&inner), metrics) {
                    closing.push(session.id());
                }
            }
            drop(inner);
            if !closing.is_empty() {
                self.inner.borrow_mut().closing.extend(closing);
            }
        }
        let mut inner = self.inner.borrow_mut();
        let Some(pass) = inner.pass else {
            return (to - from, false);
        };
        if pass.at < inner.followers.len() {
            return (to - from, true);
        }
        inner.pass = None;
        metrics.broadcast_pass(pass.started.elapsed());
        inner.trim(pass.end);
        let again = inner.end() > pass.end;
        inner.queued = again;
        (to - from, again)
    }
}

/// How many followers ahead of the one being written the pass asks the CPU to load:
/// a follower's session is rarely in the cache when its turn comes (10,000 of them
/// do not fit), and each write waited for it.
const PREFETCH_AHEAD: usize = 4;

/// Starts loading `session` into the cache (a hint: it never faults or changes state).
#[inline]
fn prefetch(session: &Rc<SessionInner>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = Rc::as_ptr(session).cast::<i8>();
        for line in (0..std::mem::size_of::<SessionInner>()).step_by(64) {
            // SAFETY: SSE, which `_mm_prefetch` needs, is part of x86_64's baseline. A
            // prefetch is a hint that never dereferences its address in a way that can
            // fault; `wrapping_add` stays within the session (`line` < its size).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = session;
}

impl FeedInner {
    /// The number of the next frame to be pushed.
    fn end(&self) -> u64 {
        self.base + self.starts.len() as u64
    }

    /// Drops the frames before number `to`.
    fn trim(&mut self, to: u64) {
        let frames = to.saturating_sub(self.base).min(self.starts.len() as u64) as usize;
        if frames == 0 {
            return;
        }
        let offset = self
            .starts
            .get(frames)
            .copied()
            .unwrap_or(self.data_start + self.data.len() as u64);
        let bytes = (offset - self.data_start) as usize;
        self.data.drain(..bytes);
        self.starts.drain(..frames);
        self.base += frames as u64;
        self.data_start = offset;
        // A burst does not keep its memory once it has gone out.
        if self.data.is_empty() && self.data.capacity() > KEPT_CAPACITY {
            self.data = Vec::new();
            self.starts = VecDeque::new();
        }
    }

    /// The bytes of frames `next..` and how many frames that is.
    pub(crate) fn owed(&self, next: u64) -> (&[u8], u64) {
        let end = self.end();
        if next >= end || next < self.base {
            debug_assert!(next >= self.base, "a follower fell behind the feed");
            return (&[], 0);
        }
        let from = (self.starts[(next - self.base) as usize] - self.data_start) as usize;
        (&self.data[from..], end - next)
    }
}

impl super::flush::Flush for Feed {
    fn flush(&self, budget: usize, metrics: &WorkerMetrics) -> (usize, bool) {
        self.write_batch(budget, metrics)
    }
}

impl FeedView for FeedInner {
    fn end(&self) -> u64 {
        FeedInner::end(self)
    }

    fn owed(&self, next: u64) -> (&[u8], u64) {
        FeedInner::owed(self, next)
    }
}

impl FeedHandle for Rc<Feed> {
    type View = FeedInner;

    fn view(&self) -> Option<std::cell::Ref<'_, FeedInner>> {
        self.inner.try_borrow().ok()
    }
}

/// Stops `session` following its feed, if it follows one; what it was owed is moved
/// to its queue first.
pub fn unfollow(session: &super::Session) {
    let follow = {
        let mut state = session.state().borrow_mut();
        state.catch_up();
        state.out.take_follow()
    };
    let Some(Follow { feed, index, .. }) = follow else {
        return;
    };
    let mut guard = feed.inner.borrow_mut();
    let inner = &mut *guard;
    let mut index = index;
    // A follower the current pass has visited may only be replaced by another visited
    // one: swap it with the last visited, which then takes the place of the last.
    if let Some(pass) = inner.pass.as_mut().filter(|pass| index < pass.at) {
        pass.at -= 1;
        inner.followers.swap(index, pass.at);
        set_index(&inner.followers[index], index);
        index = pass.at;
    }
    inner.followers.swap_remove(index);
    if let Some(moved) = inner.followers.get(index) {
        set_index(moved, index);
    }
}

fn set_index(session: &SessionInner, index: usize) {
    if let Some(follow) = session.state.borrow_mut().out.follow_mut() {
        follow.index = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerMetrics;
    use crate::runtime::Session;

    /// What the pass queued for `session` (without a catch-up, which would hide a
    /// frame the pass failed to give).
    fn queued(session: &Session) -> Vec<u8> {
        let mut chunks = Vec::new();
        session
            .state()
            .borrow_mut()
            .conn
            .drain_transmit(&mut chunks);
        chunks.concat()
    }

    /// A read that completes while the flusher is in the middle of a long pass is
    /// handled after the batch under way, not after the next one: the pass is one
    /// batch in when the reading task runs.
    #[test]
    fn a_read_completing_during_a_pass_is_handled_after_one_batch() {
        use std::cell::Cell;
        use std::io::Write;
        use std::sync::Arc;
        use std::time::Duration;

        use crate::runtime::flush::{self, FLUSH_BATCH};

        crate::runtime::uring::run_local(async {
            let feed = Feed::new();
            let sessions: Vec<Session> = (0..FLUSH_BATCH * 8)
                .map(|_| Session::driverless())
                .collect();
            for session in &sessions {
                feed.follow(session);
            }
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
            let ours = crate::runtime::uring::net::TcpStream::from_fd(ours.into());
            let seen = Rc::new(Cell::new(None));
            let reader = {
                let (seen, feed) = (seen.clone(), feed.clone());
                tokio::task::spawn_local(async move {
                    let (read, _) = ours.read(bytes::BytesMut::with_capacity(16)).await;
                    assert_eq!(read.expect("read"), 1);
                    seen.set(feed.inner().borrow().pass.map(|pass| pass.at));
                })
            };
            // The read reaches the kernel before the pass starts.
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::task::spawn_local(flush::run(Arc::new(WorkerMetrics::default())));
            (&theirs).write_all(b"x").expect("write");
            feed.push(b"frame");
            reader.await.expect("reader");
            assert_eq!(seen.get(), Some(FLUSH_BATCH));
            for session in &sessions {
                session.run_teardown();
            }
        });
    }

    /// Followers that leave in the middle of a pass, visited or not, do not make the
    /// pass skip or repeat anyone: every follower left gets each frame once, one that
    /// leaves gets what it was owed, and the frames are dropped once the pass is over.
    #[test]
    fn leaving_during_a_pass_skips_no_one() {
        let metrics = WorkerMetrics::default();
        let feed = Feed::new();
        let sessions: Vec<Session> = (0..6).map(|_| Session::driverless()).collect();
        for session in &sessions {
            feed.follow(session);
        }
        feed.push(b"one");
        // A pass visits followers 0 and 1, then 0 (visited) and 3 (not) leave. (A
        // plain swap-remove would move 5, not visited, into 0's visited place, and
        // the pass's end would drop "one" before 5 had it.)
        assert_eq!(feed.write_batch(2, &metrics), (2, true));
        unfollow(&sessions[0]);
        unfollow(&sessions[3]);
        feed.push(b"two");
        // The pass goes on with the three not visited yet, then a new pass (for
        // "two") visits the four left.
        assert_eq!(feed.write_batch(64, &metrics), (3, true));
        assert_eq!(feed.write_batch(64, &metrics), (4, false));
        // Leaving, 0 and 3 were given what they were owed then.
        assert_eq!(queued(&sessions[0]), b"one");
        assert_eq!(queued(&sessions[3]), b"one");
        for i in [1, 2, 4, 5] {
            assert_eq!(queued(&sessions[i]), b"onetwo", "follower {i}");
        }
        let inner = feed.inner().borrow();
        assert!(inner.data.is_empty() && inner.starts.is_empty());
        assert_eq!(inner.followers.len(), 4);
        drop(inner);
        for session in &sessions {
            session.run_teardown();
        }
        assert_eq!(feed.followers(), 0);
    }
}
