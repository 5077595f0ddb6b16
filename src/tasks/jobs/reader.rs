//! The reader thread: one Redis connection that reads jobs for this process
//! (`XREADGROUP`), takes over the ones of processes that died (`XAUTOCLAIM`), renews
//! the claims of the jobs running here, moves due retries back to their stream, and
//! refreshes the queue gauges. Each job it reads runs on the executor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use super::writer::{Command, Link, load_scripts};
use super::{CatchUnwind, Entry, GROUP, Job, Outcome, Shared, now_ms, settle};
use crate::tasks::SpawnError;

/// The longest a read blocks, and so the longest the reader takes to notice a stop, a
/// due retry or a free slot.
pub(super) const POLL: Duration = Duration::from_millis(250);
/// How often the gauges (stream length, pending, retries, dead letters) are read.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// How often consumers of processes gone (nothing pending, idle past the visibility
/// timeout) are deleted from the groups.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// Most retries moved back per job and turn.
const PROMOTE_BATCH: usize = 100;

/// Moves the due members of the retry set (netstring-encoded field-value pairs) back
/// to the stream as new entries. KEYS: stream, retry set. ARGV: now (ms), most.
pub(super) const PROMOTE_SCRIPT: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local fields = {}
  local pos = 1
  while pos <= #m do
    local colon = string.find(m, ':', pos, true)
    if not colon then break end
    local n = tonumber(string.sub(m, pos, colon - 1))
    if not n then break end
    fields[#fields + 1] = string.sub(m, colon + 1, colon + n)
    pos = colon + n + 2
  end
  if #fields >= 2 and #fields % 2 == 0 then
    redis.call('XADD', KEYS[1], '*', unpack(fields))
  end
  redis.call('ZREM', KEYS[2], m)
end
return #due
";

/// Runs until the queue stops reading.
pub(super) fn run(shared: &Arc<Shared>, client: &redis::Client) {
    let mut link = Link::new("reader");
    let mut reader = Reader {
        shared,
        waiting: VecDeque::new(),
        last_renew: Instant::now(),
        last_reclaim: None,
        last_gauges: None,
        last_cleanup: Instant::now(),
        last_promote: None,
    };
    while !shared.stopping() {
        let setup = |con: &mut redis::Connection| {
            for slot in &shared.slots {
                let created = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&slot.keys.stream)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .exec(con);
                match created {
                    Err(e) if e.code() == Some("BUSYGROUP") => {}
                    other => other?,
                }
            }
            load_scripts(con, &[PROMOTE_SCRIPT])
        };
        let (con, sha) = match link.get(shared, client, setup) {
            Ok(got) => got,
            Err(_) => {
                let _ = shared.freed.1.recv_timeout(link.retry_in().max(POLL / 5));
                continue;
            }
        };
        if let Err(e) = reader.turn(con, &sha) {
            link.failed(shared, &e);
        }
    }
    tracing::debug!(
        waiting = reader.waiting.len(),
        "durable jobs: reader stopped"
    );
}

/// An entry read and not yet handed to the executor: job, entry, attempt.
type Waiting = (usize, Entry, u32);

struct Reader<'a> {
    shared: &'a Arc<Shared>,
    /// Read but refused by the executor (its queue full): run when there is room.
    waiting: VecDeque<Waiting>,
    last_renew: Instant,
    last_reclaim: Option<Instant>,
    last_gauges: Option<Instant>,
    last_cleanup: Instant,
    last_promote: Option<Instant>,
}

/// Whether `last` is unset or at least `every` ago; if so, sets it to now.
fn due(last: &mut Option<Instant>, every: Duration) -> bool {
    let now = Instant::now();
    if last.is_some_and(|at| now < at + every) {
        return false;
    }
    *last = Some(now);
    true
}

impl Reader<'_> {
    /// One turn: the periodic work, then one blocking read for the free slots.
    fn turn(&mut self, con: &mut redis::Connection, promote_sha: &str) -> redis::RedisResult<()> {
        let shared = self.shared;
        let settings = &shared.settings;
        self.run_waiting();
        if due(&mut self.last_promote, POLL) {
            let mut pipe = redis::pipe();
            for slot in &shared.slots {
                pipe.cmd("EVALSHA")
                    .arg(promote_sha)
                    .arg(2)
                    .arg(&slot.keys.stream)
                    .arg(&slot.keys.retry)
                    .arg(now_ms())
                    .arg(PROMOTE_BATCH)
                    .ignore();
            }
            pipe.exec(con)?;
        }
        if self.last_renew.elapsed() >= settings.visibility_timeout / 3 {
            self.last_renew = Instant::now();
            self.renew(con)?;
        }
        if due(
            &mut self.last_reclaim,
            (settings.visibility_timeout / 4).max(POLL),
        ) {
            self.reclaim(con)?;
        }
        if due(&mut self.last_gauges, GAUGES_EVERY) {
            self.gauges(con)?;
        }
        if self.last_cleanup.elapsed() >= CLEANUP_EVERY {
            self.last_cleanup = Instant::now();
            self.cleanup(con)?;
        }
        let free = self.free();
        if free == 0 {
            let _ = shared.freed.1.recv_timeout(POLL);
            return Ok(());
        }
        let per_stream = (free / shared.slots.len()).max(1);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&shared.consumer)
            .arg("COUNT")
            .arg(per_stream)
            .arg("BLOCK")
            .arg(POLL.as_millis() as u64)
            .arg("STREAMS");
        for slot in &shared.slots {
            cmd.arg(&slot.keys.stream);
        }
        for _ in &shared.slots {
            cmd.arg(">");
        }
        let reply: Value = cmd.query(con)?;
        let Value::Array(streams) = reply else {
            return Ok(()); // Nil: nothing within POLL.
        };
        for stream in streams {
            let Value::Array(parts) = stream else {
                continue;
            };
            let [Value::BulkString(key), Value::Array(entries)] = parts.as_slice() else {
                continue;
            };
            let Some(job) = shared
                .slots
                .iter()
                .position(|s| s.keys.stream.as_bytes() == key.as_slice())
            else {
                continue;
            };
            for entry in entries {
                if let Some(entry) = parse_entry(entry) {
                    self.dispatch(job, entry, 1);
                }
            }
        }
        Ok(())
    }

    /// Slots for more jobs: `job_concurrency` less those read and not settled.
    fn free(&self) -> usize {
        self.shared
            .settings
            .concurrency
            .saturating_sub(self.shared.in_flight().len())
    }

    /// Renews the claim on every entry this process holds: its idle time starts over,
    /// so no other process takes it while it runs (`JUSTID` leaves the delivery count).
    fn renew(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let shared = self.shared;
        let held: Vec<(usize, String)> = shared.in_flight().keys().cloned().collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (job, slot) in shared.slots.iter().enumerate() {
            let ids: Vec<&String> = held
                .iter()
                .filter(|(j, _)| *j == job)
                .map(|(_, id)| id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            pipe.cmd("XCLAIM")
                .arg(&slot.keys.stream)
                .arg(GROUP)
                .arg(&shared.consumer)
                .arg(0)
                .arg(ids)
                .arg("JUSTID")
                .ignore();
        }
        pipe.exec(con)
    }

    /// Takes over entries no process renewed for the visibility timeout, with their
    /// delivery counts (`XPENDING`).
    fn reclaim(&mut self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let shared = self.shared;
        let idle = shared.settings.visibility_timeout.as_millis() as u64;
        for (job, slot) in shared.slots.iter().enumerate() {
            let free = self.free();
            if free == 0 {
                return Ok(());
            }
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&slot.keys.stream)
                .arg(GROUP)
                .arg(&shared.consumer)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(free)
                .query(con)?;
            let Value::Array(parts) = reply else { continue };
            let Some(Value::Array(entries)) = parts.get(1) else {
                continue;
            };
            for entry in entries.iter().filter_map(parse_entry) {
                let deliveries = delivery_count(con, &slot.keys.stream, &entry.id)?;
                shared.metrics.job(job).reclaimed();
                tracing::info!(job = %slot.name, id = %entry.id, deliveries, "durable job taken over from a process that stopped renewing it");
                self.dispatch(job, entry, deliveries);
            }
        }
        Ok(())
    }

    /// The queue gauges, per job.
    fn gauges(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let shared = self.shared;
        let mut pipe = redis::pipe();
        for slot in &shared.slots {
            pipe.cmd("XLEN").arg(&slot.keys.stream);
            pipe.cmd("XPENDING").arg(&slot.keys.stream).arg(GROUP);
            pipe.cmd("ZCARD").arg(&slot.keys.retry);
            pipe.cmd("XLEN").arg(&slot.keys.dead);
        }
        let replies: Vec<Value> = pipe.query(con)?;
        for (job, four) in replies.chunks_exact(4).enumerate() {
            let int = |v: &Value| match v {
                Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            let pending = match &four[1] {
                Value::Array(summary) => summary.first().map_or(0, int),
                _ => 0,
            };
            let length = int(&four[0]);
            shared.metrics.job(job).set_gauges(
                length.saturating_sub(pending),
                pending,
                int(&four[2]),
                int(&four[3]),
            );
        }
        Ok(())
    }

    /// Deletes consumers that hold nothing and were idle past the visibility timeout
    /// (processes gone), so that the groups do not grow with every restart.
    fn cleanup(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let shared = self.shared;
        let idle_ms = shared.settings.visibility_timeout.as_millis() as i64;
        for slot in &shared.slots {
            let reply: Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&slot.keys.stream)
                .arg(GROUP)
                .query(con)?;
            let Value::Array(consumers) = reply else {
                continue;
            };
            for consumer in consumers {
                let (Some(name), Some(pending), Some(idle)) = (
                    info_field(&consumer, "name"),
                    info_field(&consumer, "pending"),
                    info_field(&consumer, "idle"),
                ) else {
                    continue;
                };
                let (Value::BulkString(name), Value::Int(0), Value::Int(idle)) =
                    (name, pending, idle)
                else {
                    continue;
                };
                if *idle > idle_ms && name.as_slice() != shared.consumer.as_bytes() {
                    redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(&slot.keys.stream)
                        .arg(GROUP)
                        .arg(name.as_slice())
                        .exec(con)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the entries the executor refused, while it takes them.
    fn run_waiting(&mut self) {
        while let Some((job, entry, attempt)) = self.waiting.pop_front() {
            if let Err(back) = self.spawn(job, entry, attempt) {
                self.waiting.push_front(*back);
                return;
            }
        }
    }

    /// Starts run number `attempts + deliveries` of `entry` on the executor, or, past
    /// `job_max_attempts` (processes died running it), sends it to the dead letters.
    fn dispatch(&mut self, job: usize, entry: Entry, deliveries: u32) {
        let shared = self.shared;
        let attempt = entry.attempts.saturating_add(deliveries.max(1));
        shared
            .in_flight()
            .insert((job, entry.id.clone()), deliveries.max(1));
        if attempt > shared.settings.max_attempts {
            let last = entry.error.clone().unwrap_or_else(|| "none".into());
            let outcome: Outcome = Err(format!(
                "the process running it stopped before it finished ({} deliveries); last error: {last}",
                deliveries
            ));
            self.settled(job, &entry, attempt, &outcome);
            return;
        }
        if !self.waiting.is_empty() {
            self.waiting.push_back((job, entry, attempt));
            return;
        }
        if let Err(back) = self.spawn(job, entry, attempt) {
            self.waiting.push_back(*back);
        }
    }

    /// Hands one run to the executor; gives the entry back when its queue is full.
    /// When it is shutting down the entry stays held, to be released.
    fn spawn(&self, job: usize, entry: Entry, attempt: u32) -> Result<(), Box<Waiting>> {
        let shared = self.shared.clone();
        let slot = &shared.slots[job];
        let run = Job {
            name: slot.name.clone(),
            id: entry.id.clone(),
            payload: entry.payload.clone(),
            attempt,
            max_attempts: shared.settings.max_attempts,
        };
        let handler = slot.handler.clone();
        let name = slot.name.to_string();
        let back = entry.clone();
        let tasks = shared.tasks.clone();
        let future = async move {
            shared.metrics.job(job).started();
            let outcome =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(run))) {
                    Ok(future) => CatchUnwind(future).await,
                    Err(payload) => Err(format!(
                        "panicked: {}",
                        crate::tasks::panic_message(&*payload)
                    )),
                };
            shared.metrics.job(job).finished(outcome.is_ok());
            if let Err(error) = &outcome {
                tracing::warn!(job = %shared.slots[job].name, id = %entry.id, attempt, %error, "durable job failed");
            }
            Reader::settle_with(&shared, job, &entry, attempt, &outcome);
        };
        match tasks.spawn_async(name, future) {
            Ok(()) => Ok(()),
            Err(SpawnError::QueueFull) => Err(Box::new((job, back, attempt))),
            Err(_) => Ok(()),
        }
    }

    fn settled(&self, job: usize, entry: &Entry, attempt: u32, outcome: &Outcome) {
        self.shared.metrics.job(job).finished(false);
        Self::settle_with(self.shared, job, entry, attempt, outcome);
    }

    /// Sends the outcome to the writer and frees the slot.
    fn settle_with(shared: &Shared, job: usize, entry: &Entry, attempt: u32, outcome: &Outcome) {
        let name = &shared.slots[job].name;
        let settle = settle(
            &shared.settings,
            name,
            entry,
            attempt,
            outcome,
            &shared.consumer,
            now_ms(),
        );
        shared.in_flight().remove(&(job, entry.id.clone()));
        let _ = shared.writer.send(Command::Settle {
            job,
            id: entry.id.clone(),
            settle,
        });
        let _ = shared.freed.0.try_send(());
    }
}

/// `[id, [field, value, …]]` → an entry (`None` for a deleted one: nil fields).
fn parse_entry(entry: &Value) -> Option<Entry> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [Value::BulkString(id), Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    Some(Entry::parse(
        String::from_utf8_lossy(id).into_owned(),
        fields,
    ))
}

/// The delivery count of pending entry `id` (1 when Redis does not say).
fn delivery_count(con: &mut redis::Connection, stream: &str, id: &str) -> redis::RedisResult<u32> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg(id)
        .arg(id)
        .arg(1)
        .query(con)?;
    let count = match reply {
        Value::Array(rows) => match rows.first() {
            Some(Value::Array(row)) => match row.get(3) {
                Some(Value::Int(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
                _ => 1,
            },
            _ => 1,
        },
        _ => 1,
    };
    Ok(count.max(1))
}

/// A field of an `XINFO` reply (a flat name-value array, or a map).
fn info_field<'a>(info: &'a Value, name: &str) -> Option<&'a Value> {
    match info {
        Value::Array(items) => items.chunks_exact(2).find_map(|pair| match &pair[0] {
            Value::BulkString(n) if n == name.as_bytes() => Some(&pair[1]),
            Value::SimpleString(n) if n == name => Some(&pair[1]),
            _ => None,
        }),
        Value::Map(items) => items.iter().find_map(|(k, v)| match k {
            Value::BulkString(n) if n == name.as_bytes() => Some(v),
            Value::SimpleString(n) if n == name => Some(v),
            _ => None,
        }),
        _ => None,
    }
}
