//! Redis Cluster (`RedisConfig::cluster`): key slots, hash tags, the slot map read
//! with `CLUSTER SLOTS`, and redirects; all sans-IO, tested here. The threads use
//! them through [`super::Shared::owner`] and [`super::Shared::refresh`].
//!
//! Every key and the channel of a topic carry the same hash tag, `{` + [`tag`] of
//! the topic + `}`, so they live in one slot: the history script runs on one node
//! and `SPUBLISH`es on the shard that owns the slot.

use redis::Value;
use redis::{ServerError, ServerErrorKind};

/// Key slots in a Redis Cluster.
pub(super) const SLOTS: u16 = 16_384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or shard channel: the CRC16 of its hash tag (what is between
/// the first `{` and the next `}`, when not empty), else of the whole name.
pub(super) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// Appends the hash tag content of `topic`: the topic with `%`, `{` and `}`
/// percent-encoded (so no topic ends the tag early and no two topics share one), or
/// a lone `%` for the empty topic (a tag is never empty).
pub(super) fn tag(topic: &str, out: &mut String) {
    if topic.is_empty() {
        out.push('%');
        return;
    }
    for c in topic.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

/// The topic of a [`tag`]; `None` for anything [`tag`] does not make.
pub(super) fn untag(tag: &str) -> Option<String> {
    if tag == "%" {
        return Some(String::new());
    }
    let mut out = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(at) = rest.find(['%', '{', '}']) {
        out.push_str(&rest[..at]);
        let decoded = match rest.get(at..at + 3) {
            Some("%25") => '%',
            Some("%7B") => '{',
            Some("%7D") => '}',
            _ => return None,
        };
        out.push(decoded);
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Topology {
    /// Sorted by first slot, not overlapping.
    ranges: Vec<SlotRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotRange {
    first: u16,
    last: u16,
    /// `host:port` of the master.
    master: String,
}

impl Topology {
    /// One node serving every slot: a single Redis.
    pub(super) fn single(addr: &str) -> Self {
        Self {
            ranges: vec![SlotRange {
                first: 0,
                last: SLOTS - 1,
                master: addr.to_owned(),
            }],
        }
    }

    /// Reads a `CLUSTER SLOTS` reply. `asked` is the host the question went to, for a
    /// master announced with an empty address ("the one you asked").
    pub(super) fn parse(reply: &Value, asked: &str) -> Result<Self, String> {
        let Value::Array(entries) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}"));
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(parts) = entry else {
                return Err(format!("a CLUSTER SLOTS entry is {entry:?}"));
            };
            let number = |v: Option<&Value>| match v {
                Some(Value::Int(n)) => u16::try_from(*n).ok().filter(|&n| n < SLOTS),
                _ => None,
            };
            let (Some(first), Some(last)) = (number(parts.first()), number(parts.get(1))) else {
                return Err(format!(
                    "a CLUSTER SLOTS entry has no slot range: {parts:?}"
                ));
            };
            let Some(Value::Array(node)) = parts.get(2) else {
                return Err(format!("slots {first}-{last} have no master"));
            };
            let host = match node.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => String::new(),
            };
            let port = match node.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok(),
                _ => None,
            };
            let Some(port) = port else {
                return Err(format!("the master of slots {first}-{last} has no port"));
            };
            let host = if host.is_empty() || host == "?" {
                asked.to_owned()
            } else {
                host
            };
            if first > last {
                return Err(format!("an empty slot range {first}-{last}"));
            }
            ranges.push(SlotRange {
                first,
                last,
                master: join_addr(&host, port),
            });
        }
        ranges.sort_by_key(|r| r.first);
        if ranges.windows(2).any(|w| w[0].last >= w[1].first) {
            return Err("overlapping slot ranges".into());
        }
        if ranges.is_empty() {
            return Err("no slot is served (CLUSTER SLOTS is empty)".into());
        }
        Ok(Self { ranges })
    }

    /// The master serving `slot`; `None` while no master does.
    pub(super) fn owner(&self, slot: u16) -> Option<&str> {
        let at = self.ranges.partition_point(|r| r.first <= slot);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        (slot <= range.last).then_some(range.master.as_str())
    }

    /// Every master, once each, sorted.
    pub(super) fn masters(&self) -> Vec<&str> {
        let mut masters: Vec<&str> = self.ranges.iter().map(|r| r.master.as_str()).collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// Slots no master serves.
    pub(super) fn uncovered(&self) -> u32 {
        let served: u32 = self
            .ranges
            .iter()
            .map(|r| u32::from(r.last - r.first) + 1)
            .sum();
        u32::from(SLOTS) - served
    }

    /// Takes a redirect into account until the next refresh: `slot` is now served by
    /// `master`.
    pub(super) fn moved(&mut self, slot: u16, master: &str) {
        let mut ranges = Vec::with_capacity(self.ranges.len() + 2);
        for r in self.ranges.drain(..) {
            if slot < r.first || slot > r.last {
                ranges.push(r);
                continue;
            }
            if r.first < slot {
                ranges.push(SlotRange {
                    first: r.first,
                    last: slot - 1,
                    master: r.master.clone(),
                });
            }
            if slot < r.last {
                ranges.push(SlotRange {
                    first: slot + 1,
                    last: r.last,
                    master: r.master,
                });
            }
        }
        ranges.push(SlotRange {
            first: slot,
            last: slot,
            master: master.to_owned(),
        });
        ranges.sort_by_key(|r| r.first);
        self.ranges = ranges;
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub(super) fn join_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port` (or `[v6]:port`).
pub(super) fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?)).filter(|(h, _)| !h.is_empty())
}

/// What a cluster node's error reply asks of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Redirect {
    /// `MOVED slot addr`: the slot is served by `addr` now, for good.
    Moved { slot: u16, addr: String },
    /// `ASK slot addr`: this once, on `addr`, after `ASKING` (a slot being migrated).
    Ask { addr: String },
    /// `TRYAGAIN` (a multi-key command mid-migration) or `CLUSTERDOWN`: later.
    Later,
}

impl Redirect {
    /// The redirect in an error reply; `None` for any other error.
    pub(super) fn of(error: &ServerError) -> Option<Self> {
        let target = || {
            let mut words = error.details()?.split_whitespace();
            let slot = words.next()?.parse::<u16>().ok().filter(|&s| s < SLOTS)?;
            let addr = words.next()?;
            split_addr(addr)?;
            Some((slot, addr.to_owned()))
        };
        match error.kind() {
            Some(ServerErrorKind::Moved) => target().map(|(slot, addr)| Self::Moved { slot, addr }),
            Some(ServerErrorKind::Ask) => target().map(|(_, addr)| Self::Ask { addr }),
            Some(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown) => Some(Self::Later),
            _ => None,
        }
    }

    /// The redirect in a failed command's error.
    pub(super) fn of_error(error: &redis::RedisError) -> Option<Self> {
        if let Some((addr, slot)) = error.redirect_node() {
            let addr = addr.to_owned();
            return Some(match error.kind() {
                redis::ErrorKind::Server(ServerErrorKind::Ask) => Self::Ask { addr },
                _ => Self::Moved {
                    slot: slot.min(SLOTS - 1),
                    addr,
                },
            });
        }
        // Not `EXECABORT`: a transaction Redis discarded (a command refused while
        // queued) is an error for what it was to do, not a redirect to retry.
        matches!(
            error.kind(),
            redis::ErrorKind::Server(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown)
        )
        .then_some(Self::Later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_cluster_specs() {
        // The CRC16 check value, and keys from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"123456789"), 12_739);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"bar"), 5_061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
        // An empty tag hashes the whole key; only the first tag counts.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert!(slot(b"") < SLOTS);
    }

    #[test]
    fn tags_round_trip_and_keep_a_topic_in_one_slot() {
        for topic in ["", "room", "a{b}c", "}", "{", "%", "%25", "100%", "é{}%x"] {
            let mut t = String::new();
            tag(topic, &mut t);
            assert!(
                !t.is_empty() && !t.contains(['{', '}']),
                "{topic:?} -> {t:?}"
            );
            assert_eq!(untag(&t).as_deref(), Some(topic), "{t:?}");
            let key = format!("p:{{{t}}}:meta");
            let channel = format!("p:{{{t}}}");
            assert_eq!(slot(key.as_bytes()), slot(channel.as_bytes()), "{topic:?}");
        }
        let (mut a, mut b) = (String::new(), String::new());
        tag("%7B", &mut a);
        tag("{", &mut b);
        assert_ne!(a, b);
        for foreign in ["%", "%zz", "%7", "a{b", "x%2"] {
            if foreign != "%" {
                assert_eq!(untag(foreign), None, "{foreign:?}");
            }
        }
        assert_eq!(untag(""), None);
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"0123abcd".to_vec()),
        ])
    }

    fn range(first: i64, last: i64, master: Value) -> Value {
        Value::Array(vec![Value::Int(first), Value::Int(last), master])
    }

    #[test]
    fn cluster_slots_replies_are_read_and_checked() {
        let reply = Value::Array(vec![
            range(10_923, 16_383, node("127.0.0.1", 7002)),
            range(0, 5_460, node("", 7000)),
            range(5_461, 10_922, node("::1", 7001)),
        ]);
        let topology = Topology::parse(&reply, "10.0.0.9").unwrap();
        assert_eq!(topology.owner(0), Some("10.0.0.9:7000"));
        assert_eq!(topology.owner(5_460), Some("10.0.0.9:7000"));
        assert_eq!(topology.owner(5_461), Some("[::1]:7001"));
        assert_eq!(topology.owner(16_383), Some("127.0.0.1:7002"));
        assert_eq!(topology.owner(16_384), None);
        assert_eq!(topology.uncovered(), 0);
        assert_eq!(
            topology.masters(),
            ["10.0.0.9:7000", "127.0.0.1:7002", "[::1]:7001"]
        );
        let gap = Value::Array(vec![range(0, 99, node("h", 1))]);
        let topology = Topology::parse(&gap, "x").unwrap();
        assert_eq!(topology.owner(100), None);
        assert_eq!(topology.uncovered(), 16_284);
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![range(5, 4, node("h", 1))]),
            Value::Array(vec![range(0, 16_384, node("h", 1))]),
            Value::Array(vec![
                range(0, 10, node("h", 1)),
                range(10, 20, node("h", 2)),
            ]),
            Value::Array(vec![range(0, 10, Value::Nil)]),
            Value::Array(vec![Value::Int(3)]),
        ] {
            assert!(Topology::parse(&bad, "x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_move_changes_one_slot_until_the_next_refresh() {
        let mut topology = Topology::single("a:1");
        topology.moved(100, "b:2");
        assert_eq!(topology.owner(99), Some("a:1"));
        assert_eq!(topology.owner(100), Some("b:2"));
        assert_eq!(topology.owner(101), Some("a:1"));
        topology.moved(0, "c:3");
        topology.moved(SLOTS - 1, "c:3");
        assert_eq!(topology.owner(0), Some("c:3"));
        assert_eq!(topology.owner(SLOTS - 1), Some("c:3"));
        assert_eq!(topology.uncovered(), 0);
        assert_eq!(topology.masters(), ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn addresses_split_and_join() {
        assert_eq!(split_addr("127.0.0.1:7000"), Some(("127.0.0.1", 7000)));
        assert_eq!(split_addr("[::1]:7000"), Some(("::1", 7000)));
        assert_eq!(split_addr(&join_addr("::1", 7)), Some(("::1", 7)));
        assert_eq!(split_addr("nope"), None);
        assert_eq!(split_addr(":7000"), None);
        assert_eq!(split_addr("h:99999"), None);
    }

    #[test]
    fn redirects_are_read_from_error_replies() {
        let parse = |text: &str| {
            let value = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
            match value {
                Value::ServerError(e) => Redirect::of(&e),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            parse("ASK 3999 127.0.0.1:6382"),
            Some(Redirect::Ask {
                addr: "127.0.0.1:6382".into()
            })
        );
        assert_eq!(
            parse("TRYAGAIN Multiple keys request during rehashing of slot"),
            Some(Redirect::Later)
        );
        assert_eq!(
            parse("CLUSTERDOWN The cluster is down"),
            Some(Redirect::Later)
        );
        assert_eq!(parse("MOVED nonsense"), None);
        assert_eq!(parse("ERR unknown command"), None);
        let failed = |text: &str| {
            let value = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
            match value {
                Value::ServerError(e) => Redirect::of_error(&redis::RedisError::from(e)),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            failed("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(failed("TRYAGAIN later"), Some(Redirect::Later));
        // A discarded transaction is an error, never retried as a redirect.
        assert_eq!(
            failed("EXECABORT Transaction discarded because of previous errors."),
            None
        );
    }
}
