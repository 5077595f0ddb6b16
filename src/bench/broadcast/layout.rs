//! Who connects where: the rooms (`--rooms`) and the subscribers' URLs (`--sub-urls`).
//!
//! With `--rooms N` the URL (and every `--sub-urls` URL, and with `--v1` the
//! `--topic`) holds `{room}`, replaced by the room's number `0..N`. Publisher `p` is in
//! room `p % N` and connects to the URL; subscriber `i` is in room `i % N` and
//! connects to sub URL `(i / N) % U` of the `U` given (the URL when none is), so that
//! every room has subscribers on every sub URL once there are `N × U` of them. A
//! subscriber expects every message of its room's publishers and nothing else: one
//! from another room is malformed.
//!
//! Two servers that share a broker, the URL on one and `--sub-urls` naming both, make
//! a cross-node run: half the subscribers get each message through the broker, and
//! the report gives each sub URL's latency apart.

use std::sync::Arc;

use super::BroadcastOptions;
use super::v1;
use crate::bench::BenchError;
use crate::bench::target::Target;

/// What `{room}` stands for in URLs and topics.
pub const ROOM: &str = "{room}";

/// The rooms and the URLs of a run, resolved once.
#[derive(Debug)]
pub(super) struct Layout {
    rooms: usize,
    /// Per room: where its publishers connect.
    pub_targets: Vec<Arc<Target>>,
    /// `sub_targets[url][room]`: where a subscriber connects (with --v1, the `/v1` of
    /// the sub URL's host).
    sub_targets: Vec<Vec<Arc<Target>>>,
    /// The sub URLs as given (the URL alone when none was).
    pub(super) sub_urls: Vec<String>,
    /// Per room, with --v1: its topic.
    topics: Vec<String>,
    /// Per room: its subscribers.
    subs_in_room: Vec<u64>,
    /// Per room: its publishers.
    pubs_in_room: Vec<usize>,
}

impl Layout {
    /// Checks `--rooms` and `--sub-urls` against the other options.
    pub(super) fn validate(options: &BroadcastOptions) -> Result<(), BenchError> {
        let bad = |what: String| Err(BenchError::Options(what));
        let rooms = options.rooms;
        if rooms == 0 {
            return bad("--rooms must be at least 1".into());
        }
        if rooms > options.pubs || rooms > options.subs {
            return bad(format!(
                "--rooms {rooms} needs at least as many --pubs and --subs: every room \
                 needs a publisher and a subscriber"
            ));
        }
        if rooms > 1 {
            let urls = std::iter::once(&options.url).chain(&options.sub_urls);
            if let Some(url) = urls.into_iter().find(|u| !u.contains(ROOM)) {
                return bad(format!(
                    "{url}: with --rooms {rooms} every URL needs {ROOM}, replaced by the \
                     room's number (e.g. ws://host/ws/bench-{ROOM})"
                ));
            }
            if options.v1 && !options.topic.contains(ROOM) {
                return bad(format!(
                    "with --rooms {rooms} and --v1, --topic needs {ROOM} (e.g. bench-{ROOM})"
                ));
            }
        }
        Ok(())
    }

    /// Resolves every room's URLs.
    pub(super) fn resolve(options: &BroadcastOptions) -> Result<Self, BenchError> {
        let rooms = options.rooms;
        let room_of = |template: &str, room: usize| template.replace(ROOM, &room.to_string());
        let resolve = |url: &str| -> Result<Arc<Target>, BenchError> {
            let target = Target::resolve(url)?;
            // The subscribers' sockets leave tokio for a raw epoll set (`subs`), where
            // TLS records could not be read; refuse before opening anything.
            if target.tls || options.common.tls {
                return Err(BenchError::Options(format!(
                    "{target}: bench broadcast does not speak TLS yet: point it at a plain \
                     listener (plain_bind)"
                )));
            }
            Ok(Arc::new(target))
        };
        let pub_targets = (0..rooms)
            .map(|r| resolve(&room_of(&options.url, r)))
            .collect::<Result<Vec<_>, _>>()?;
        let sub_urls = if options.sub_urls.is_empty() {
            vec![options.url.clone()]
        } else {
            options.sub_urls.clone()
        };
        let mut sub_targets = Vec::with_capacity(sub_urls.len());
        for url in &sub_urls {
            let mut per_room = Vec::with_capacity(rooms);
            for r in 0..rooms {
                let target = resolve(&room_of(url, r))?;
                per_room.push(if options.v1 {
                    Arc::new(v1::subscriber_url(&target)?)
                } else {
                    target
                });
            }
            sub_targets.push(per_room);
        }
        let count = |n: usize| -> Vec<usize> {
            let mut per = vec![0; rooms];
            for i in 0..n {
                per[i % rooms] += 1;
            }
            per
        };
        Ok(Self {
            rooms,
            pub_targets,
            sub_targets,
            sub_urls,
            topics: (0..rooms).map(|r| room_of(&options.topic, r)).collect(),
            subs_in_room: count(options.subs).into_iter().map(|n| n as u64).collect(),
            pubs_in_room: count(options.pubs),
        })
    }

    /// How many rooms there are.
    pub(super) fn rooms(&self) -> usize {
        self.rooms
    }

    /// Subscriber `i`'s room.
    pub(super) fn sub_room(&self, i: usize) -> usize {
        i % self.rooms
    }

    /// Subscriber `i`'s sub URL (an index into `sub_urls`).
    pub(super) fn sub_url(&self, i: usize) -> usize {
        (i / self.rooms) % self.sub_urls.len()
    }

    /// Publisher `p`'s room.
    pub(super) fn pub_room(&self, p: usize) -> usize {
        p % self.rooms
    }

    /// Where subscriber `i` connects.
    pub(super) fn sub_target(&self, i: usize) -> &Arc<Target> {
        &self.sub_targets[self.sub_url(i)][self.sub_room(i)]
    }

    /// Where publisher `p` connects.
    pub(super) fn pub_target(&self, p: usize) -> &Arc<Target> {
        &self.pub_targets[self.pub_room(p)]
    }

    /// With --v1: the topic of `room`.
    pub(super) fn topic(&self, room: usize) -> &str {
        &self.topics[room]
    }

    /// Publishers in `room`: a subscriber of the room is ready once it heard them all.
    pub(super) fn pubs_in(&self, room: usize) -> usize {
        self.pubs_in_room[room]
    }

    /// Deliveries expected when publisher `p` sent `published[p]`: each message to
    /// every subscriber of its room.
    pub(super) fn expected(&self, published: &[u64]) -> u64 {
        published
            .iter()
            .enumerate()
            .map(|(p, n)| n * self.subs_in_room[self.pub_room(p)])
            .sum()
    }

    /// Sub URLs whose latency is reported apart: none when there is one.
    pub(super) fn split_urls(&self) -> usize {
        if self.sub_urls.len() > 1 {
            self.sub_urls.len()
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(rooms: usize, subs: usize, pubs: usize, sub_urls: &[&str]) -> BroadcastOptions {
        let mut o = BroadcastOptions::new("ws://127.0.0.1:1/ws/r-{room}");
        o.rooms = rooms;
        o.subs = subs;
        o.pubs = pubs;
        o.sub_urls = sub_urls.iter().map(|s| (*s).to_owned()).collect();
        o
    }

    #[test]
    fn rooms_and_urls_spread_evenly() {
        let o = options(
            3,
            12,
            4,
            &[
                "ws://127.0.0.1:1/ws/r-{room}",
                "ws://127.0.0.1:2/ws/r-{room}",
            ],
        );
        Layout::validate(&o).unwrap();
        let l = Layout::resolve(&o).unwrap();
        // Every room has subscribers on both URLs.
        for room in 0..3 {
            for url in 0..2 {
                assert!(
                    (0..12).any(|i| l.sub_room(i) == room && l.sub_url(i) == url),
                    "room {room} url {url}"
                );
            }
        }
        assert_eq!(l.sub_target(4).path, "/ws/r-1");
        assert_eq!(l.sub_target(4).addr.port(), 2);
        assert_eq!(l.pub_target(3).path, "/ws/r-0");
        assert_eq!(l.pubs_in(0), 2);
        assert_eq!(l.pubs_in(2), 1);
        // 4 subscribers per room; publishers 0 and 3 in room 0.
        assert_eq!(l.expected(&[10, 20, 30, 40]), (10 + 20 + 30 + 40) * 4);
        assert_eq!(l.split_urls(), 2);
    }

    #[test]
    fn one_room_keeps_the_old_behaviour() {
        let mut o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.subs = 5;
        o.pubs = 2;
        Layout::validate(&o).unwrap();
        let l = Layout::resolve(&o).unwrap();
        assert_eq!(l.sub_urls, ["ws://127.0.0.1:1/broadcast"]);
        assert_eq!(l.expected(&[3, 4]), 7 * 5);
        assert_eq!(l.split_urls(), 0);
        assert_eq!(l.pubs_in(0), 2);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let err = |o: &BroadcastOptions| Layout::validate(o).unwrap_err().to_string();
        assert!(err(&options(0, 4, 4, &[])).contains("--rooms must be"));
        assert!(err(&options(5, 10, 4, &[])).contains("every room needs"));
        let mut o = options(2, 4, 4, &["ws://127.0.0.1:2/broadcast"]);
        assert!(err(&o).contains("127.0.0.1:2/broadcast: with --rooms 2"));
        o.sub_urls.clear();
        o.v1 = true;
        assert!(err(&o).contains("--topic needs {room}"));
        o.topic = "t-{room}".into();
        assert!(Layout::validate(&o).is_ok());
        let mut tls = options(1, 1, 1, &["wss://127.0.0.1:2/x"]);
        tls.url = "ws://127.0.0.1:1/x".into();
        assert!(
            Layout::resolve(&tls)
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
    }
}
