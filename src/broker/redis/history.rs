//! Offsets, epochs and history in Redis, for `ringsocket.v1` across processes
//! (`RedisConfig::history`).
//!
//! Per topic, three keys beside its channel (`prefix + topic`; with Redis Cluster
//! `prefix + "{" + tag + "}"`, see `cluster::tag`, so that all four share a slot):
//!
//! - channel + `":meta"`, a hash: `off` (the last offset) and `epoch`;
//! - channel + `":stream"`, a stream: one entry per publication, id `<offset>-0`,
//!   fields `m` (what was published on the channel) and `t` (milliseconds since the
//!   Unix epoch), `MAXLEN ~ history_size`;
//! - channel + `":o:" + origin`, per publishing process: the sequence number and
//!   offset of its last publication there, so that a batch sent again after a broken
//!   connection (or a redirect) is not numbered twice.
//!
//! Every key expires `history_ttl_secs` after the topic's last publication. The
//! publisher runs [`PUBLISH_SCRIPT`] for each publication, atomically: next offset,
//! the epoch (a new one when the hash is gone: a flush, an expiry), the stream entry,
//! and the `PUBLISH` (`SPUBLISH` on a cluster, on the node that runs the script, which
//! serves the slot) of `rso <offset> <epoch> ` + the envelope. Every process, the
//! publishing one included, delivers the `ringsocket.v1` side of a publication when
//! it comes back on the channel, with the offset Redis gave it.
//!
//! The reader thread (`ringsocket-rhist`, its own connection to each node) answers two
//! questions: a subscription's snapshot (epoch, last offset, kept entries after
//! `since`, read in one `MULTI` on the node serving the topic), and the subscriber
//! threads' gap fills (the entries between the last offset this process has and one
//! that arrived above the next).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use redis::Value;

use super::cluster::Redirect;
use super::envelope::{self, Origin};
use super::{Link, LinkState, Nodes, Shared, redis_error, wait_unless_stopped};
use crate::broker::{HistoryReply, Inbound, Snapshot};

/// What each publication runs at Redis. KEYS: meta, stream, origin key. ARGV: channel,
/// envelope, history size (0: no stream entry), ttl in ms, a new epoch (used when the
/// topic has none), now in ms, the envelope's sequence number, the publish command
/// (`PUBLISH`, or `SPUBLISH` on a cluster). Returns
/// `{offset, epoch, receivers}`; `{offset, epoch, -1}` for a publication sent again
/// that was numbered already (the last one of its process here), `{-1, "", -1}` for
/// an older one.
pub(super) const PUBLISH_SCRIPT: &str = r"
local meta, stream, mine = KEYS[1], KEYS[2], KEYS[3]
local seq = tonumber(ARGV[7])
local last = redis.call('GET', mine)
if last then
  local lseq, loff = string.match(last, '^(%d+) (%d+)$')
  if lseq and tonumber(lseq) >= seq then
    if tonumber(lseq) == seq then
      return {tonumber(loff), redis.call('HGET', meta, 'epoch') or '', -1}
    end
    return {-1, '', -1}
  end
end
local off = redis.call('HINCRBY', meta, 'off', 1)
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', meta, 'epoch', epoch)
end
if off == 1 then
  redis.call('DEL', stream)
end
local msg = 'rso ' .. off .. ' ' .. epoch .. ' ' .. ARGV[2]
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], off .. '-0', 'm', msg, 't', ARGV[6])
  redis.call('PEXPIRE', stream, ARGV[4])
end
redis.call('PEXPIRE', meta, ARGV[4])
redis.call('SET', mine, seq .. ' ' .. off, 'PX', ARGV[4])
local n = redis.call(ARGV[8], ARGV[1], msg)
return {off, epoch, n}
";

/// The history's bounds at Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHistory {
    /// Entries kept per topic (`MAXLEN ~`, so a few more may stay). 0: none (offsets
    /// and epochs still count).
    pub size: usize,
    /// How long the keys live after the topic's last publication, and how old a kept
    /// entry may be when read.
    pub ttl: Duration,
}

/// The key of a process's last publication to `topic`; `origin_hex` is
/// [`origin_hex`] of its origin, made once.
pub(super) fn origin_key(shared: &Shared, topic: &str, origin_hex: &str) -> String {
    let mut key = shared.key(topic, "o:");
    key.push_str(origin_hex);
    key
}

/// `origin` in hex, for [`origin_key`].
pub(super) fn origin_hex(origin: &Origin) -> String {
    origin.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new epoch: 16 random hex digits.
pub(super) fn new_epoch(rng: &mut impl rand_core::RngCore) -> String {
    format!("{:016x}", rng.next_u64())
}

/// A question for the reader thread.
pub(super) struct Read {
    pub(super) topic: String,
    /// Entries with an offset above it.
    pub(super) after: u64,
    /// ... and at most this one (`None`: up to the last).
    pub(super) upto: Option<u64>,
    pub(super) limit: usize,
    pub(super) reply: HistoryReply,
}

/// The reader thread: answers [`Read`]s until the broker stops.
pub(super) fn run(shared: &Shared, reads: &Receiver<Read>, stop: &Receiver<()>) {
    let mut link = LinkState::new(Link::Reader, shared);
    let mut rng = super::seeded_rng(&shared.origin);
    // A read whose connection broke (Redis restarted, say): asked once more on the
    // next one before it is answered with the error.
    let mut again: Option<Read> = None;
    let mut nodes = Nodes::default();
    'connections: while shared
        .connect(
            &mut link,
            || shared.reach(&mut nodes),
            |d| wait_unless_stopped(stop, d),
        )
        .is_some()
    {
        link.connected(shared);
        loop {
            let (read, retried) = match again.take() {
                Some(read) => (read, true),
                None => crossbeam_channel::select! {
                    recv(reads) -> read => match read {
                        Ok(read) => (read, false),
                        Err(_) => break 'connections,
                    },
                    recv(stop) -> _ => break 'connections,
                },
            };
            let cluster = !shared.seeds.is_empty();
            let mut result = routed(shared, &mut nodes, &read, &new_epoch(&mut rng), stop);
            if cluster && !retried && matches!(&result, Err(e) if connection_failed(e)) {
                // One master's connection broke (it was dropped): once more on a new
                // one, without holding up the reads of the other shards.
                result = routed(shared, &mut nodes, &read, &new_epoch(&mut rng), stop);
            }
            match result {
                Ok(snapshot) => (read.reply)(Ok(snapshot)),
                // Redis answered, with an error (`EXECABORT`, say): the answer for this
                // read; the connection is fine. The slot map is read again, in case a
                // slot moved under the transaction. With a cluster, a master that is
                // away fails only the reads of its own topics.
                Err(e) if cluster || !connection_failed(&e) => {
                    shared.refresh_asked.store(true, Ordering::Release);
                    tracing::debug!(
                        topic = %read.topic,
                        "Redis broker: a history read failed: {e}"
                    );
                    (read.reply)(Err(format!("Redis: {e}")));
                }
                Err(e) => {
                    if retried {
                        (read.reply)(Err(format!("Redis: {e}")));
                    } else {
                        again = Some(read);
                    }
                    link.lost(shared, &e);
                    continue 'connections;
                }
            }
            if shared.stopping() {
                break 'connections;
            }
        }
    }
    // Nobody waits forever: what is still asked gets an error.
    for read in again.into_iter().chain(reads.try_iter()) {
        (read.reply)(Err("the Redis broker stopped".into()));
    }
    link.closed(shared);
}

/// [`snapshot`] on the node serving the topic, following redirects (a few times:
/// then the error).
fn routed(
    shared: &Shared,
    nodes: &mut Nodes,
    read: &Read,
    epoch: &str,
    stop: &Receiver<()>,
) -> redis::RedisResult<Snapshot> {
    let channel = shared.channel(&read.topic);
    for _ in 0..8 {
        let Some(addr) = shared.owner(&channel) else {
            shared.refresh(nodes)?;
            if !wait_unless_stopped(stop, Duration::from_millis(50)) {
                break;
            }
            continue;
        };
        let result = nodes
            .get(shared, &addr)
            .and_then(|(con, _)| snapshot(shared, con, read, epoch));
        match result {
            Ok(snapshot) => return Ok(snapshot),
            Err(e) => match Redirect::of_error(&e) {
                Some(Redirect::Moved { slot, addr }) => shared.moved(slot, &addr),
                // A slot being migrated (`ASK` does not carry into a `MULTI`), or a
                // cluster that is not serving: shortly, where the slot map says.
                Some(Redirect::Ask { .. } | Redirect::Later) => {
                    shared
                        .metrics
                        .redirects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = shared.refresh(nodes);
                    if !wait_unless_stopped(stop, Duration::from_millis(50)) {
                        break;
                    }
                }
                None => {
                    if connection_failed(&e) {
                        nodes.forget(&addr);
                    }
                    return Err(e);
                }
            },
        }
    }
    Err(redis_error("the topic's node kept redirecting"))
}

/// Whether `error` is the connection's (it is dropped, and the read asked again on
/// the next one), not an error reply of Redis.
fn connection_failed(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_timeout()
}

/// Reads the epoch (made, with a short life, if the topic has none yet: a subscriber
/// before any publication gets the epoch the first publication will carry), the last
/// offset and the entries of `read`, in one `MULTI`.
fn snapshot(
    shared: &Shared,
    con: &mut redis::Connection,
    read: &Read,
    epoch: &str,
) -> redis::RedisResult<Snapshot> {
    let meta = shared.key(&read.topic, "meta");
    let stream = shared.key(&read.topic, "stream");
    let ttl = shared
        .config
        .history
        .map_or(Duration::from_secs(300), |h| h.ttl);
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let upto = read
        .upto
        .map_or_else(|| "+".to_owned(), |u| format!("{u}-0"));
    let replies: Vec<Value> = redis::pipe()
        .atomic()
        .cmd("HSETNX")
        .arg(&meta)
        .arg("epoch")
        .arg(epoch)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&meta)
        .arg(ttl_ms)
        .arg("NX")
        .ignore()
        .cmd("HMGET")
        .arg(&meta)
        .arg("off")
        .arg("epoch")
        .cmd("XRANGE")
        .arg(&stream)
        .arg(format!("{}-0", read.after.saturating_add(1)))
        .arg(upto)
        .arg("COUNT")
        .arg(read.limit.max(1))
        .query(con)?;
    let mut replies = replies.into_iter();
    let (Some(Value::Array(fields)), Some(entries)) = (replies.next(), replies.next()) else {
        return Err(redis_error("an unexpected reply to HMGET / XRANGE"));
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    let top = text(fields.first())
        .and_then(|o| o.parse::<u64>().ok())
        .unwrap_or(0);
    let epoch: Arc<str> = text(fields.get(1)).unwrap_or_default().into();
    let oldest = now_ms().saturating_sub(ttl_ms);
    let mut out = Vec::new();
    if let Value::Array(entries) = entries {
        for entry in entries {
            if let Some(inbound) = parse_entry(shared, &read.topic, &entry, oldest) {
                out.push(inbound);
            }
        }
    }
    Ok(Snapshot {
        epoch,
        top,
        entries: out,
    })
}

/// One stream entry as an [`Inbound`] with its position; `None` for one older than
/// `oldest` (ms) or not ours (counted as malformed).
fn parse_entry(shared: &Shared, topic: &str, entry: &Value, oldest: u64) -> Option<Inbound> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let Some(Value::Array(fields)) = parts.get(1) else {
        return None;
    };
    let mut message = None;
    let mut at = None;
    for pair in fields.chunks(2) {
        match pair {
            [Value::BulkString(name), Value::BulkString(value)] if name == b"m" => {
                message = Some(value.as_slice());
            }
            [Value::BulkString(name), Value::BulkString(value)] if name == b"t" => {
                at = std::str::from_utf8(value)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok());
            }
            _ => {}
        }
    }
    if at.is_some_and(|t| t < oldest) {
        return None;
    }
    decode(shared, topic, message?)
}

/// A numbered publication (`rso <offset> <epoch> ` + envelope) as an [`Inbound`];
/// `None` (counted as malformed) for anything else.
pub(super) fn decode(shared: &Shared, topic: &str, bytes: &[u8]) -> Option<Inbound> {
    let decoded = envelope::split_position(bytes)
        .and_then(|(position, rest)| envelope::decode(rest).map(|envelope| (position, envelope)));
    match decoded {
        Ok((Some((offset, epoch)), envelope)) => Some(Inbound {
            topic: topic.to_owned(),
            kind: envelope.kind,
            payload: Bytes::copy_from_slice(envelope.payload),
            position: Some((offset, epoch.into())),
            own: envelope.origin == shared.origin,
        }),
        _ => {
            shared
                .metrics
                .malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    }
}
