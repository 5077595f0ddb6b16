//! Fan-out: one publish of a plain (not conflated) topic, delivered to the topic's
//! subscribers on one core.
//!
//! The frame is appended once to the topic's feed, which the subscribers that are in no
//! other topic follow: a publish costs them one append, whatever their number (see
//! `runtime::feed`). The topic's other subscribers get a reference-counted copy of the
//! frame in their own queue. Followers the flusher found closing, and direct
//! subscribers that can no longer be sent to, are handed back to leave the topic.

use std::rc::Rc;

use bytes::Bytes;
use indexmap::IndexMap;

use super::registry::SessionId;
use crate::runtime::{Feed, Session};

/// A plain topic's delivery state on one core.
pub(super) struct Fanout {
    /// The topic's broadcasts, followed by its subscribers that are in no other topic.
    /// A session follows one feed at most, so that one write keeps the order of
    /// everything it is sent.
    pub(super) feed: Rc<Feed>,
    /// The topic's other subscribers (in several topics), sent each frame.
    pub(super) direct: IndexMap<SessionId, Session>,
}

impl Fanout {
    pub(super) fn new() -> Self {
        Self {
            feed: Feed::new(),
            direct: IndexMap::new(),
        }
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
        let feed = &self.feed;
        // Followers the flusher found closing leave now. The report is checked against
        // the subscriber under that id now, which may have changed since: only one that
        // cannot be sent to leaves.
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
        let skip = exclude
            .and_then(|id| subscribers.get(&id))
            .filter(|session| feed.is_followed_by(session));
        match skip {
            Some(session) => feed.push_except(frame, session),
            None => feed.push(frame),
        }
        *delivered += (feed.followers() - usize::from(skip.is_some())) as u64;
        for (id, session) in &self.direct {
            if Some(*id) == exclude {
                continue;
            }
            if session.send_frame(frame.clone()).is_ok() {
                *delivered += 1;
            } else {
                closing.push(*id);
            }
        }
    }
}
