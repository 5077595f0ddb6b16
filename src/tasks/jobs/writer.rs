//! The writer thread: one Redis connection that adds enqueued jobs (`XADD`) and settles
//! the ones that ran (the settle script), in one pipelined batch per round trip.
//!
//! An enqueue is answered once Redis has replied to its `XADD`: while Redis is
//! unreachable it is answered at once with the cause (the request gets 503), never
//! held. Outcomes are held instead and written when Redis is back: settling is
//! idempotent (the script does nothing for an entry no longer pending).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redis::Value;

use super::{AckSender, EnqueueError, GROUP, JobId, RateLimit, Settle, Shared, netstrings};

/// Most commands in one pipelined batch.
const MAX_BATCH: usize = 512;
/// First wait before reconnecting; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Acknowledges a run (`XACK`, `XDEL`) and, for a failure, schedules the retry or adds
/// the dead letter, atomically. Does nothing (returns 0) when the entry is no longer
/// pending: another process settled it already.
///
/// KEYS: stream, retry set, dead-letter stream. ARGV: group, id, action (`done`,
/// `retry`, `dead`), then for `retry` the due time (ms) and the member, for `dead` the
/// stream's MAXLEN and the field-value pairs.
pub(super) const SETTLE_SCRIPT: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
elseif ARGV[3] == 'dead' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
end
return 1
";

/// Releases this consumer's unfinished entries at shutdown: their idle time set past
/// the visibility timeout (another process takes them at once), their delivery count
/// as before, only where this consumer still owns them (one another process took
/// over stays that process's). KEYS: stream. ARGV: group, consumer, idle (ms), then
/// id and retry count pairs. Returns how many were released.
pub(super) const RELEASE_SCRIPT: &str = r"
local released = 0
for i = 4, #ARGV - 1, 2 do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #row == 1 and row[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3],
      'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    released = released + 1
  end
end
return released
";

/// What the writer is asked to do.
pub(super) enum Command {
    /// `XADD` a job and answer `ack`.
    Enqueue {
        job: usize,
        payload: Bytes,
        ack: AckSender,
    },
    /// Write the outcome of a run.
    Settle {
        job: usize,
        id: String,
        settle: Settle,
    },
    /// The last command: release the unfinished entries ((job, id), deliveries), write
    /// what is held, say so on `done`, and end.
    Stop {
        release: Vec<((usize, String), u32)>,
        done: Sender<()>,
    },
}

/// One Redis connection with reconnection backoff and per-connection setup, for the
/// reader and the writer.
pub(super) struct Link {
    role: &'static str,
    con: Option<redis::Connection>,
    /// The SHA1 of the script(s) loaded on `con`.
    shas: Vec<String>,
    next_try: Instant,
    backoff: Duration,
    /// Why the last connection failed or was lost, while it is down.
    pub(super) cause: Option<String>,
    warn: RateLimit,
}

impl Link {
    pub(super) fn new(role: &'static str) -> Self {
        Self {
            role,
            con: None,
            shas: Vec::new(),
            next_try: Instant::now(),
            backoff: BACKOFF_MIN,
            cause: None,
            warn: RateLimit::new(),
        }
    }

    /// The connection and the SHA1s of its scripts (in the order `setup` loaded them),
    /// connecting (and running `setup` on it) when it is time to try; `Err` with the
    /// cause while Redis is unreachable.
    pub(super) fn get(
        &mut self,
        shared: &Shared,
        client: &redis::Client,
        setup: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<Vec<String>>,
    ) -> Result<(&mut redis::Connection, Vec<String>), String> {
        if self.con.is_none() {
            if Instant::now() < self.next_try {
                return Err(self.cause.clone().unwrap_or_else(|| "not connected".into()));
            }
            let connected = shared
                .connect(client)
                .and_then(|mut con| setup(&mut con).map(|shas| (con, shas)));
            match connected {
                Ok((con, shas)) => {
                    if let Some(cause) = self.cause.take() {
                        tracing::info!(addr = %shared.addr, role = self.role, was = %cause, "durable jobs: Redis connection back");
                    }
                    self.con = Some(con);
                    self.shas = shas;
                    self.backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    self.failed(shared, &e);
                    return Err(e.to_string());
                }
            }
        }
        match self.con.as_mut() {
            Some(con) => Ok((con, self.shas.clone())),
            None => Err("not connected".into()),
        }
    }

    /// The connection broke (or setup failed): drop it and try again after the backoff.
    pub(super) fn failed(&mut self, shared: &Shared, e: &redis::RedisError) {
        self.con = None;
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if self.warn.ready() {
            tracing::warn!(addr = %shared.addr, role = self.role, error = %e, "durable jobs: Redis unreachable; retrying");
        }
        self.cause = Some(e.to_string());
    }

    /// How long until the next connection attempt (zero when connected).
    pub(super) fn retry_in(&self) -> Duration {
        if self.con.is_some() {
            Duration::ZERO
        } else {
            self.next_try.saturating_duration_since(Instant::now())
        }
    }
}

/// The writer's connection setup: the durability check (once per process, if the
/// reader did not), and its script.
fn setup(shared: &Shared, con: &mut redis::Connection) -> redis::RedisResult<Vec<String>> {
    shared.check_durability(con);
    load_scripts(con, &[SETTLE_SCRIPT, RELEASE_SCRIPT])
}

/// Loads `scripts` and returns their SHA1s.
pub(super) fn load_scripts(
    con: &mut redis::Connection,
    scripts: &[&str],
) -> redis::RedisResult<Vec<String>> {
    scripts
        .iter()
        .map(|s| redis::cmd("SCRIPT").arg("LOAD").arg(*s).query(con))
        .collect()
}

/// Runs until [`Command::Stop`].
pub(super) fn run(shared: &Shared, client: &redis::Client, rx: &Receiver<Command>) {
    let mut link = Link::new("writer");
    let mut writer = Writer {
        shared,
        held: Vec::new(),
        refused: RateLimit::new(),
    };
    loop {
        let first = if writer.held.is_empty() {
            match rx.recv() {
                Ok(command) => Some(command),
                // Every sender gone (the queue and the server dropped): nothing to do.
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(link.retry_in().max(BACKOFF_MIN)) {
                Ok(command) => Some(command),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut enqueues = Vec::new();
        let mut stop = None;
        let commands = first.into_iter().chain(rx.try_iter().take(MAX_BATCH));
        for command in commands {
            match command {
                Command::Enqueue { job, payload, ack } => enqueues.push((job, payload, ack)),
                Command::Settle { job, id, settle } => writer.held.push((job, id, settle)),
                Command::Stop { release, done } => {
                    stop = Some((release, done));
                    break;
                }
            }
        }
        writer.batch(&mut link, client, enqueues);
        if let Some((release, done)) = stop {
            writer.finish(&mut link, client, &release);
            let _ = done.send(());
            return;
        }
    }
}

struct Writer<'a> {
    shared: &'a Shared,
    /// Outcomes not yet written: (job, id, settle).
    held: Vec<(usize, String, Settle)>,
    refused: RateLimit,
}

impl Writer<'_> {
    /// Sends `enqueues` and the held outcomes in one pipeline, and answers the enqueues.
    fn batch(
        &mut self,
        link: &mut Link,
        client: &redis::Client,
        enqueues: Vec<(usize, Bytes, AckSender)>,
    ) {
        if enqueues.is_empty() && self.held.is_empty() {
            return;
        }
        let shared = self.shared;
        let (con, sha) = match link.get(shared, client, |con| setup(shared, con)) {
            Ok((con, shas)) => (con, shas.into_iter().next().unwrap_or_default()),
            Err(cause) => {
                for (job, _, ack) in enqueues {
                    self.refuse(job, ack, EnqueueError::Unavailable(cause.clone()));
                }
                return;
            }
        };
        let mut pipe = redis::pipe();
        // One command's error reply does not fail the others: its own reply says so.
        pipe.ignore_errors();
        for (job, payload, _) in &enqueues {
            pipe.cmd("XADD")
                .arg(&shared.slots[*job].keys.stream)
                .arg("*")
                .arg("payload")
                .arg(&payload[..]);
        }
        for (job, id, settle) in &self.held {
            settle_command(&mut pipe, shared, &sha, *job, id, settle);
        }
        let replies = match pipe.query::<Vec<Value>>(con) {
            Ok(replies) => replies,
            Err(e) => {
                link.failed(shared, &e);
                for (job, _, ack) in enqueues {
                    self.refuse(job, ack, EnqueueError::Unavailable(e.to_string()));
                }
                return;
            }
        };
        let mut replies = replies.into_iter();
        for (job, _, ack) in enqueues {
            match replies.next() {
                Some(Value::BulkString(id)) => {
                    shared.metrics.job(job).enqueued();
                    shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    ack.send(Ok(JobId(String::from_utf8_lossy(&id).into_owned())));
                }
                Some(Value::SimpleString(id)) => {
                    shared.metrics.job(job).enqueued();
                    shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    ack.send(Ok(JobId(id)));
                }
                other => {
                    let why = match other {
                        Some(Value::ServerError(e)) => e.to_string(),
                        other => format!("unexpected reply to XADD: {other:?}"),
                    };
                    self.refuse(job, ack, EnqueueError::Unavailable(why));
                }
            }
        }
        let mut reload = false;
        let mut written = Vec::new();
        for ((job, id, settle), reply) in std::mem::take(&mut self.held).into_iter().zip(replies) {
            let counters = shared.metrics.job(job);
            if !matches!(&reply, Value::ServerError(e) if e.code() == "NOSCRIPT") {
                written.push((job, id.clone()));
            }
            match reply {
                Value::Int(1) => match settle {
                    Settle::Done => {}
                    Settle::Retry { .. } => counters.retried(),
                    Settle::Dead { .. } => {
                        counters.dead_lettered();
                        tracing::warn!(job = %shared.slots[job].name, %id, "durable job moved to the dead-letter stream");
                    }
                },
                Value::Int(_) => {
                    tracing::debug!(job = %shared.slots[job].name, %id, "durable job already settled (taken over by another process)");
                }
                Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                    // Redis lost its scripts (SCRIPT FLUSH): load them on a new connection.
                    reload = true;
                    self.held.push((job, id, settle));
                }
                other => {
                    tracing::error!(job = %shared.slots[job].name, %id, reply = ?other, "durable jobs: Redis refused an outcome; the job runs again after the visibility timeout");
                }
            }
        }
        // Held (and renewed) until here: only now may the slot take another job.
        if !written.is_empty() {
            let mut in_flight = shared.in_flight();
            for key in &written {
                in_flight.remove(key);
            }
            drop(in_flight);
            let _ = shared.freed.0.try_send(());
        }
        if reload {
            link.failed(
                shared,
                &redis::RedisError::from((redis::ErrorKind::Client, "scripts flushed")),
            );
        }
    }

    fn refuse(&mut self, job: usize, ack: AckSender, e: EnqueueError) {
        let shared = self.shared;
        shared.metrics.job(job).enqueue_failed();
        shared.waiting.fetch_sub(1, Ordering::AcqRel);
        if self.refused.ready() {
            tracing::warn!(job = %shared.slots[job].name, error = %e, "durable job not enqueued: the request is refused");
        }
        ack.send(Err(e));
    }

    /// At shutdown: the held outcomes, then the unfinished entries released (their
    /// idle time set past the visibility timeout, their delivery count as before),
    /// then this consumer deleted from the groups where it holds nothing.
    fn finish(
        &mut self,
        link: &mut Link,
        client: &redis::Client,
        release: &[((usize, String), u32)],
    ) {
        self.batch(link, client, Vec::new());
        let shared = self.shared;
        let lost = self.held.len();
        let Ok((con, shas)) = link.get(shared, client, |con| setup(shared, con)) else {
            if lost > 0 || !release.is_empty() {
                tracing::warn!(
                    unwritten_outcomes = lost,
                    unreleased = release.len(),
                    "durable jobs: Redis unreachable at shutdown; those jobs run again after the visibility timeout"
                );
            }
            return;
        };
        let idle = shared.settings.visibility_timeout.as_millis() as u64;
        let release_sha = shas.get(1).cloned().unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut releases = 0;
        for (job, slot) in shared.slots.iter().enumerate() {
            let mine: Vec<_> = release.iter().filter(|((j, _), _)| *j == job).collect();
            if mine.is_empty() {
                continue;
            }
            let cmd = release_command(
                &mut pipe,
                &release_sha,
                &slot.keys.stream,
                &shared.consumer,
                idle,
            );
            for ((_, id), deliveries) in mine {
                cmd.arg(id).arg(deliveries.saturating_sub(1));
            }
            releases += 1;
        }
        for slot in &shared.slots {
            pipe.cmd("XPENDING")
                .arg(&slot.keys.stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(&shared.consumer);
        }
        let replies = match pipe.query::<Vec<Value>>(con) {
            Ok(replies) => replies,
            Err(e) => {
                tracing::warn!(error = %e, "durable jobs: could not release the unfinished jobs; they run again after the visibility timeout");
                return;
            }
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let pendings = replies.get(releases..).unwrap_or_default();
        for (slot, pending) in shared.slots.iter().zip(pendings) {
            if matches!(pending, Value::Array(items) if items.is_empty()) {
                pipe.cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&slot.keys.stream)
                    .arg(GROUP)
                    .arg(&shared.consumer);
            }
        }
        let _ = pipe.query::<Vec<Value>>(con);
    }
}

/// Adds the release script's call for `stream` to `pipe`; the caller adds the ids
/// and retry counts.
fn release_command<'a>(
    pipe: &'a mut redis::Pipeline,
    sha: &str,
    stream: &str,
    consumer: &str,
    idle_ms: u64,
) -> &'a mut redis::Pipeline {
    pipe.cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(idle_ms)
}

/// Adds the settle script's call for one outcome to `pipe`.
fn settle_command(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    sha: &str,
    job: usize,
    id: &str,
    settle: &Settle,
) {
    let keys = &shared.slots[job].keys;
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(sha)
        .arg(3)
        .arg(&keys.stream)
        .arg(&keys.retry)
        .arg(&keys.dead)
        .arg(GROUP)
        .arg(id);
    match settle {
        Settle::Done => {
            cmd.arg("done");
        }
        Settle::Retry { due_ms, fields } => {
            cmd.arg("retry").arg(*due_ms).arg(netstrings(fields));
        }
        Settle::Dead { fields } => {
            cmd.arg("dead").arg(shared.settings.dead_letter_maxlen);
            for (name, value) in fields {
                cmd.arg(*name).arg(&value[..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_redis::TestRedis;
    use super::*;

    /// At shutdown an unfinished entry is released (idle past the timeout, its
    /// delivery count as before) only where this consumer still owns it.
    #[test]
    fn release_leaves_an_entry_another_process_took_over() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        let stream = "t:{job}";
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .exec(&mut con)
            .unwrap();
        let ids: Vec<String> = (0..2)
            .map(|i| {
                redis::cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("payload")
                    .arg(i)
                    .query(&mut con)
                    .unwrap()
            })
            .collect();
        let _: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("me")
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query(&mut con)
            .unwrap();
        let _: Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg("other")
            .arg(0)
            .arg(&ids[1])
            .query(&mut con)
            .unwrap();
        let sha = load_scripts(&mut con, &[RELEASE_SCRIPT]).unwrap().remove(0);
        let mut pipe = redis::pipe();
        release_command(&mut pipe, &sha, stream, "me", 60_000)
            .arg(&ids[0])
            .arg(0)
            .arg(&ids[1])
            .arg(1);
        let released: Vec<i64> = pipe.query(&mut con).unwrap();
        assert_eq!(released, [1]);
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(10)
            .query(&mut con)
            .unwrap();
        assert_eq!(rows[0].1, "me");
        assert!(rows[0].2 >= 60_000, "released: idle {}", rows[0].2);
        assert_eq!(rows[0].3, 0, "RETRYCOUNT as given");
        assert_eq!(rows[1].1, "other", "not taken back");
        assert!(rows[1].2 < 60_000, "not released: idle {}", rows[1].2);
    }
}
