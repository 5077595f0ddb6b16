//! Fan-out: one publish of a plain (not conflated) topic, delivered to the topic's
//! subscribers on one core.
//!
//! Each subscriber has a [`Route`], the same in all of its plain topics and decided in
//! one place ([`Route::for_topic_count`]): a subscriber of one topic follows the topic's
//! feed, to which a publish is appended once, whatever the number of followers (see
//! `runtime::feed`); a subscriber of several gets a reference-counted copy of each frame
//! in its own queue. Followers the flusher found closing, and direct subscribers that
//! can no longer be sent to, are handed back to leave the topic.
//!
//! With permessage-deflate, a publish is compressed at most once per core
//! ([`Frames`]): subscribers that negotiated it (with the full window) follow the
//! topic's second feed, of compressed frames, or are sent the compressed frame as their
//! direct copy; the others get the plain frame. A message under `compression_min_bytes`
//! (or that does not shrink) goes to both as the plain frame.

use std::rc::Rc;

use bytes::Bytes;
use indexmap::IndexMap;

use super::registry::SessionId;
use crate::proto::deflate::encode_deflated_frame;
use crate::proto::frame::split_unmasked_frame;
use crate::runtime::{Feed, Session, unfollow};

/// One publish's frame on one core: the plain frame, and the compressed one, made the
/// first time a subscriber that takes it asks (then shared by all of them).
pub(super) struct Frames<'a> {
    plain: &'a Bytes,
    /// `None` until asked; `Some(None)` when it goes out plain (too small, or does not
    /// shrink).
    deflated: Option<Option<Bytes>>,
}

impl<'a> Frames<'a> {
    pub(super) fn new(plain: &'a Bytes) -> Self {
        Self {
            plain,
            deflated: None,
        }
    }

    /// The frame for subscribers with permessage-deflate at `level`, compressing
    /// messages of `min_bytes` and more.
    pub(super) fn deflated(&mut self, (level, min_bytes): (u32, usize)) -> &Bytes {
        let plain = self.plain;
        self.deflated
            .get_or_insert_with(|| {
                let (opcode, payload) = split_unmasked_frame(plain)?;
                encode_deflated_frame(opcode, &payload, level, min_bytes)
            })
            .as_ref()
            .unwrap_or(plain)
    }

    /// The frame for `session`.
    pub(super) fn for_session(&mut self, session: &Session) -> &Bytes {
        match session.shared_deflate() {
            Some(settings) => self.deflated(settings),
            None => self.plain,
        }
    }
}

/// How a subscriber of a plain topic is sent the topic's publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// It follows the topic's feed: a publish costs it nothing of its own.
    Feed,
    /// It is sent a reference-counted copy of each frame, in its own queue.
    Direct,
}

impl Route {
    /// The route of a session in `topics` topics (plain or conflated, the one at hand
    /// included), for each of its plain topics: [`Route::Feed`] for exactly one,
    /// [`Route::Direct`] otherwise.
    ///
    /// It relies on a rule of the runtime: a session follows one feed at most (following
    /// another leaves the first). That is how the runtime keeps the order of everything
    /// a connection is sent: whatever is queued to a session itself (a handler's send, a
    /// direct copy, a Close) first moves what its feed owes it into its queue, so the
    /// queue and that one feed make a single sequence; two feeds would have no order
    /// between them. A session in several topics therefore follows none of their feeds
    /// and gets direct copies of every topic's frames, in publish order. (Following one
    /// feed beside direct copies would keep the order too, but each copy would first copy
    /// out what the feed owes: no cheaper than copies alone.) Only a change of this
    /// result moves a subscriber between the feed and the direct copies.
    pub(super) fn for_topic_count(topics: usize) -> Self {
        if topics == 1 {
            Self::Feed
        } else {
            Self::Direct
        }
    }
}

/// A plain topic's delivery state on one core.
pub(super) struct Fanout {
    /// The topic's broadcasts, followed by its subscribers on [`Route::Feed`].
    feed: Rc<Feed>,
    /// The same, compressed, followed by those of them that take compressed frames,
    /// with their compression settings; made when the first one joins.
    deflate_feed: Option<(Rc<Feed>, (u32, usize))>,
    /// Its subscribers on [`Route::Direct`], sent each frame.
    direct: IndexMap<SessionId, Session>,
}

impl Fanout {
    pub(super) fn new() -> Self {
        Self {
            feed: Feed::new(),
            deflate_feed: None,
            direct: IndexMap::new(),
        }
    }

    /// The feed `session` follows when on [`Route::Feed`].
    fn feed_for(&mut self, session: &Session) -> &Rc<Feed> {
        match session.shared_deflate() {
            Some(settings) => {
                &self
                    .deflate_feed
                    .get_or_insert_with(|| (Feed::new(), settings))
                    .0
            }
            None => &self.feed,
        }
    }

    /// Whether `session` follows one of the topic's feeds.
    fn follows(&self, session: &Session) -> bool {
        self.feed.is_followed_by(session)
            || self
                .deflate_feed
                .as_ref()
                .is_some_and(|(feed, _)| feed.is_followed_by(session))
    }

    /// Adds subscriber `id` (`session`) on `route`.
    pub(super) fn join(&mut self, id: SessionId, session: &Session, route: Route) {
        match route {
            Route::Feed => self.feed_for(session).follow(session),
            Route::Direct => {
                self.direct.insert(id, session.clone());
            }
        }
    }

    /// Moves subscriber `id` (`session`), already in the topic, to `route`; nothing is
    /// lost or given twice. To the direct copies: what the feed owes it is moved to its
    /// queue first. To the feed: it follows from the feed's end, since everything
    /// published before is in its queue already.
    pub(super) fn reroute(&mut self, id: SessionId, session: &Session, route: Route) {
        match route {
            Route::Direct => {
                if self.follows(session) {
                    unfollow(session);
                    self.direct.insert(id, session.clone());
                }
            }
            Route::Feed => {
                if let Some(session) = self.direct.swap_remove(&id) {
                    self.feed_for(&session).follow(&session);
                }
            }
        }
    }

    /// Removes subscriber `id` (`session`, if it is still known), whatever its route.
    pub(super) fn leave(&mut self, id: SessionId, session: Option<&Session>) {
        self.direct.swap_remove(&id);
        if let Some(session) = session.filter(|s| self.follows(s)) {
            unfollow(session);
        }
    }

    /// Whether `session` follows the feed (tests).
    #[cfg(test)]
    pub(super) fn is_followed_by(&self, session: &Session) -> bool {
        self.follows(session)
    }

    /// Queues `frame` to every subscriber of the topic (`subscribers`, all of them) but
    /// `exclude`, and counts the deliveries in `delivered`. Subscribers that can no
    /// longer be sent to are added to `closing`: the caller takes them out of the topic.
    /// Allocates nothing unless one is closing.
    pub(super) fn deliver(
        &self,
        subscribers: &IndexMap<SessionId, Session>,
        frame: &Bytes,
        exclude: Option<SessionId>,
        delivered: &mut u64,
        closing: &mut Vec<SessionId>,
    ) {
        let mut frames = Frames::new(frame);
        let feeds = std::iter::once((&self.feed, None))
            .chain(self.deflate_feed.as_ref().map(|(f, s)| (f, Some(*s))));
        for (feed, deflate) in feeds {
            // Followers the flusher found closing leave now. The report is checked
            // against the subscriber under that id now, which may have changed since:
            // only one that cannot be sent to leaves.
            closing.extend(
                feed.take_closing()
                    .into_iter()
                    .map(SessionId::reported)
                    .filter(|id| {
                        subscribers
                            .get(id)
                            .is_some_and(|session| !session.can_send())
                    }),
            );
            if feed.followers() == 0 {
                continue;
            }
            let frame = match deflate {
                Some(settings) => frames.deflated(settings),
                None => frame,
            };
            let skip = exclude
                .and_then(|id| subscribers.get(&id))
                .filter(|session| feed.is_followed_by(session));
            match skip {
                Some(session) => feed.push_except(frame, session),
                None => feed.push(frame),
            }
            *delivered += (feed.followers() - usize::from(skip.is_some())) as u64;
        }
        for (id, session) in &self.direct {
            if Some(*id) == exclude {
                continue;
            }
            if session
                .send_frame(frames.for_session(session).clone())
                .is_ok()
            {
                *delivered += 1;
            } else {
                closing.push(*id);
            }
        }
    }
}
