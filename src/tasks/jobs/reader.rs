//! The reader thread: one Redis connection that reads jobs for this process
//! (`XREADGROUP`), takes over the ones of processes that died (`XAUTOCLAIM`), renews
//! the claims of the jobs running here, moves due retries back to their stream, and
//! refreshes the queue gauges. Each job it reads runs on the executor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use redis::Value;

use super::writer::{Command, Link, load_scripts};
use super::{CatchUnwind, Entry, GROUP, Held, Job, Outcome, Shared, now_ms, settle};
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

/// Renews the claims of this consumer on the entries given, only where it still owns
/// them: an entry another process took over (`XAUTOCLAIM` after a renewal came too
/// late) stays that process's. KEYS: stream. ARGV: group, consumer, ids. Returns the
/// ids this consumer no longer owns.
pub(super) const RENEW_SCRIPT: &str = r"
local lost = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #row == 1 and row[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

/// Deletes a consumer from a group, atomically, only if it holds nothing and was idle
/// past the given time: a consumer that read an entry since it was seen idle keeps it.
/// KEYS: stream. ARGV: group, consumer, idle (ms). Returns 1 if it was deleted.
pub(super) const CLEANUP_SCRIPT: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name == ARGV[2] then
    if idle and idle > tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
";

/// The scripts the reader loads, in this order.
const SCRIPTS: [&str; 3] = [PROMOTE_SCRIPT, RENEW_SCRIPT, CLEANUP_SCRIPT];

/// The reader's scripts' SHA1s on its connection.
struct Shas {
    promote: String,
    renew: String,
    cleanup: String,
}

impl Shas {
    fn new(shas: Vec<String>) -> Self {
        let mut shas = shas.into_iter();
        let mut next = || shas.next().unwrap_or_default();
        Self {
            promote: next(),
            renew: next(),
            cleanup: next(),
        }
    }
}

/// Runs until the queue stops reading (then says so on `stopped`), then renews the
/// claims of the jobs still running here until they are done or the shutdown ends.
pub(super) fn run(shared: &Arc<Shared>, client: &redis::Client, stopped: &Sender<()>) {
    let mut link = Link::new("reader");
    let mut reader = Reader::new(shared);
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
        shared.check_durability(con);
        load_scripts(con, &SCRIPTS)
    };
    while !shared.stopping() {
        let (con, shas) = match link.get(shared, client, setup) {
            Ok(got) => got,
            Err(_) => {
                let _ = shared.freed.1.recv_timeout(link.retry_in().max(POLL / 5));
                continue;
            }
        };
        if let Err(e) = reader.turn(con, &Shas::new(shas)) {
            link.failed(shared, &e);
        }
    }
    let _ = stopped.send(());
    tracing::debug!(
        waiting = reader.waiting.len(),
        "durable jobs: reader stopped reading"
    );
    // The drain: the jobs running here go on, so their claims must stay fresh, or
    // another process takes them over and runs them a second time.
    while !shared.halted() && !shared.in_flight().is_empty() {
        if reader.last_renew.elapsed() >= shared.settings.visibility_timeout / 3 {
            if let Ok((con, shas)) = link.get(shared, client, setup) {
                match reader.renew(con, &Shas::new(shas).renew) {
                    Ok(()) => reader.last_renew = Instant::now(),
                    Err(e) => link.failed(shared, &e),
                }
            }
        }
        let _ = shared.freed.1.recv_timeout(POLL);
    }
}

/// What this Redis server's configuration risks for jobs (no append-only file: a
/// crash loses the jobs of the last seconds or more; an eviction policy: Redis may
/// delete job streams under memory pressure). Empty when it is fine or when `CONFIG`
/// is not allowed.
pub(super) fn durability_warnings(con: &mut redis::Connection) -> Vec<String> {
    let get = |con: &mut redis::Connection, name: &str| -> Option<String> {
        let reply: Value = redis::cmd("CONFIG").arg("GET").arg(name).query(con).ok()?;
        let value = match reply {
            Value::Array(items) => items.into_iter().nth(1)?,
            Value::Map(items) => items.into_iter().next()?.1,
            _ => return None,
        };
        match value {
            Value::BulkString(v) => Some(String::from_utf8_lossy(&v).into_owned()),
            Value::SimpleString(v) => Some(v),
            _ => None,
        }
    };
    let mut warnings = Vec::new();
    if let Some(aof) = get(con, "appendonly") {
        if aof != "yes" {
            warnings.push(format!(
                "the jobs Redis runs with appendonly {aof}: a Redis crash or restart may lose                  jobs answered 202; set appendonly yes (appendfsync everysec)"
            ));
        } else if let Some(fsync) = get(con, "appendfsync").filter(|f| f == "no") {
            warnings.push(format!(
                "the jobs Redis runs with appendfsync {fsync}: a crash may lose recent jobs;                  set appendfsync everysec"
            ));
        }
    }
    if let Some(policy) = get(con, "maxmemory-policy").filter(|p| p != "noeviction") {
        warnings.push(format!(
            "the jobs Redis runs with maxmemory-policy {policy}: under memory pressure it may              evict job streams; set maxmemory-policy noeviction"
        ));
    }
    warnings
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
    /// Per job, where `XAUTOCLAIM` goes on (`0-0` once it went through the stream).
    cursors: Vec<String>,
    /// The first stream of the next read when there are fewer free slots than jobs.
    next_stream: usize,
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

impl<'a> Reader<'a> {
    /// A reader that has done nothing yet: renewal and cleanup count from now, every
    /// `XAUTOCLAIM` starts at `0-0`.
    fn new(shared: &'a Arc<Shared>) -> Self {
        Reader {
            shared,
            waiting: VecDeque::new(),
            last_renew: Instant::now(),
            last_reclaim: None,
            last_gauges: None,
            last_cleanup: Instant::now(),
            last_promote: None,
            cursors: vec!["0-0".to_owned(); shared.slots.len()],
            next_stream: 0,
        }
    }
}

impl Reader<'_> {
    /// One turn: the periodic work, then one blocking read for the free slots.
    fn turn(&mut self, con: &mut redis::Connection, shas: &Shas) -> redis::RedisResult<()> {
        let shared = self.shared;
        let settings = &shared.settings;
        self.run_waiting();
        if due(&mut self.last_promote, POLL) {
            let mut pipe = redis::pipe();
            for slot in &shared.slots {
                pipe.cmd("EVALSHA")
                    .arg(&shas.promote)
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
            self.renew(con, &shas.renew)?;
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
            self.cleanup(con, &shas.cleanup)?;
        }
        let free = self.free();
        if free == 0 {
            let _ = shared.freed.1.recv_timeout(POLL);
            return Ok(());
        }
        let (streams, count) = read_plan(free, shared.slots.len(), self.next_stream);
        self.next_stream = (self.next_stream + streams.len()) % shared.slots.len().max(1);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&shared.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(POLL.as_millis() as u64)
            .arg("STREAMS");
        for &job in &streams {
            cmd.arg(&shared.slots[job].keys.stream);
        }
        for _ in &streams {
            cmd.arg(">");
        }
        let reply: Value = cmd.query(con)?;
        for (key, entries) in read_reply(reply) {
            let Some(job) = shared
                .slots
                .iter()
                .position(|s| s.keys.stream.as_bytes() == key.as_slice())
            else {
                continue;
            };
            for entry in entries.iter().filter_map(parse_entry) {
                self.dispatch(job, entry, 1);
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

    /// Renews the claim on every entry this process holds (running, or its outcome
    /// not yet written) and still owns: its idle time starts over, so no other process
    /// takes it (`JUSTID` leaves the delivery count). One it no longer owns (another
    /// process took it over) is counted and logged, and no longer renewed.
    fn renew(&self, con: &mut redis::Connection, sha: &str) -> redis::RedisResult<()> {
        let shared = self.shared;
        let held: Vec<(usize, String)> = shared
            .in_flight()
            .iter()
            .filter(|(_, held)| !held.lost)
            .map(|(key, _)| key.clone())
            .collect();
        for (job, slot) in shared.slots.iter().enumerate() {
            let ids: Vec<&String> = held
                .iter()
                .filter(|(j, _)| *j == job)
                .map(|(_, id)| id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let lost = renew_claims(con, sha, &slot.keys.stream, &shared.consumer, &ids)?;
            for id in lost {
                let mut in_flight = shared.in_flight();
                let Some(held) = in_flight.get_mut(&(job, id.clone())) else {
                    continue;
                };
                held.lost = true;
                drop(in_flight);
                shared.metrics.job(job).claim_lost();
                tracing::warn!(job = %slot.name, %id, "durable job: another process took it over before its claim was renewed; it may run twice");
            }
        }
        Ok(())
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
            let Some(cursor) = self.cursors.get_mut(job) else {
                continue;
            };
            let entries = autoclaim(con, &slot.keys.stream, &shared.consumer, idle, cursor, free)?;
            for entry in entries {
                // Already held here (read, running, or its outcome on its way): its
                // renewal came late, but it must not run a second time.
                if shared.in_flight().contains_key(&(job, entry.id.clone())) {
                    continue;
                }
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
    fn cleanup(&self, con: &mut redis::Connection, sha: &str) -> redis::RedisResult<()> {
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
                // Seen idle with nothing pending; the script checks again, atomically,
                // as it may have read an entry since.
                if *idle > idle_ms && name.as_slice() != shared.consumer.as_bytes() {
                    delete_consumer_if_idle(con, sha, &slot.keys.stream, name, idle_ms)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the entries the executor refused, while it takes them.
    fn run_waiting(&mut self) {
        if self.shared.stopping() {
            return; // Held, to be released at the shutdown.
        }
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
        {
            let mut in_flight = shared.in_flight();
            let key = (job, entry.id.clone());
            if in_flight.contains_key(&key) {
                return; // Held already: never two runs of it here.
            }
            in_flight.insert(key, Held::new(deliveries.max(1)));
        }
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
        // Counted as a run that failed: it starts and ends here.
        self.shared.metrics.job(job).started();
        self.shared.metrics.job(job).finished(false);
        Self::settle_with(self.shared, job, entry, attempt, outcome);
    }

    /// Sends the outcome to the writer; the entry stays held (and renewed) until the
    /// writer has written it, which frees the slot.
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
        if let Some(held) = shared.in_flight().get_mut(&(job, entry.id.clone())) {
            held.settled = true;
        }
        let _ = shared.writer.send(Command::Settle {
            job,
            id: entry.id.clone(),
            settle,
        });
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

/// Which streams one read asks (job indexes) and how many entries from each, so that
/// it never takes more than `free` entries: every stream with `free / jobs` each, or
/// with fewer free slots than jobs, `free` streams from `first` on (turn by turn), one
/// each.
fn read_plan(free: usize, jobs: usize, first: usize) -> (Vec<usize>, usize) {
    if jobs == 0 || free == 0 {
        return (Vec::new(), 0);
    }
    if free >= jobs {
        return ((0..jobs).collect(), free / jobs);
    }
    ((0..free).map(|i| (first + i) % jobs).collect(), 1)
}

/// The streams of an `XREADGROUP` reply, as (key, entries): an array of
/// `[key, entries]` (RESP2), or a map of key → entries (RESP3). Nil (nothing within
/// the block) and anything else: none.
fn read_reply(reply: Value) -> Vec<(Vec<u8>, Vec<Value>)> {
    let key = |v: Value| match v {
        Value::BulkString(key) => Some(key),
        Value::SimpleString(key) => Some(key.into_bytes()),
        _ => None,
    };
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| {
                let Value::Array(parts) = stream else {
                    return None;
                };
                let mut parts = parts.into_iter();
                match (parts.next().and_then(key), parts.next()) {
                    (Some(key), Some(Value::Array(entries))) => Some((key, entries)),
                    _ => None,
                }
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .filter_map(|(k, entries)| match (key(k), entries) {
                (Some(key), Value::Array(entries)) => Some((key, entries)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs the renew script on `ids` of `stream`; the ids `consumer` no longer owns.
fn renew_claims(
    con: &mut redis::Connection,
    sha: &str,
    stream: &str,
    consumer: &str,
    ids: &[&String],
) -> redis::RedisResult<Vec<String>> {
    let reply: Value = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(ids)
        .query(con)?;
    let Value::Array(lost) = reply else {
        return Ok(Vec::new());
    };
    Ok(lost
        .into_iter()
        .filter_map(|id| match id {
            Value::BulkString(id) => Some(String::from_utf8_lossy(&id).into_owned()),
            Value::SimpleString(id) => Some(id),
            _ => None,
        })
        .collect())
}

/// Runs the cleanup script for `consumer`: whether it was deleted.
fn delete_consumer_if_idle(
    con: &mut redis::Connection,
    sha: &str,
    stream: &str,
    consumer: &[u8],
    idle_ms: i64,
) -> redis::RedisResult<bool> {
    let deleted: i64 = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(idle_ms)
        .query(con)?;
    Ok(deleted == 1)
}

/// One `XAUTOCLAIM` of at most `count` entries idle past `idle_ms`, from `cursor`
/// on; `cursor` becomes where the next one goes on (`0-0`: from the start again).
fn autoclaim(
    con: &mut redis::Connection,
    stream: &str,
    consumer: &str,
    idle_ms: u64,
    cursor: &mut String,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(idle_ms)
        .arg(cursor.as_str())
        .arg("COUNT")
        .arg(count)
        .query(con)?;
    let Value::Array(parts) = reply else {
        return Ok(Vec::new());
    };
    *cursor = match parts.first() {
        Some(Value::BulkString(next)) => String::from_utf8_lossy(next).into_owned(),
        Some(Value::SimpleString(next)) => next.clone(),
        _ => "0-0".to_owned(),
    };
    let Some(Value::Array(entries)) = parts.get(1) else {
        return Ok(Vec::new());
    };
    Ok(entries.iter().filter_map(parse_entry).collect())
}

#[cfg(test)]
mod tests {
    use super::super::test_redis::TestRedis;
    use super::*;

    const STREAM: &str = "t:{job}";

    fn group(con: &mut redis::Connection) {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .exec(con)
            .unwrap();
    }

    fn add(con: &mut redis::Connection, payload: &str) -> String {
        redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("payload")
            .arg(payload)
            .query(con)
            .unwrap()
    }

    /// `consumer` reads up to `count` new entries.
    fn read(con: &mut redis::Connection, consumer: &str, count: usize) -> Vec<Entry> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query(con)
            .unwrap();
        read_reply(reply)
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .filter_map(|e| parse_entry(&e))
            .collect()
    }

    fn owner(con: &mut redis::Connection, id: &str) -> String {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query(con)
            .unwrap();
        rows.first().map(|r| r.1.clone()).unwrap_or_default()
    }

    fn consumers(con: &mut redis::Connection) -> Vec<String> {
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(STREAM)
            .arg(GROUP)
            .query(con)
            .unwrap();
        let Value::Array(consumers) = reply else {
            return Vec::new();
        };
        consumers
            .iter()
            .filter_map(|c| match info_field(c, "name") {
                Some(Value::BulkString(n)) => Some(String::from_utf8_lossy(n).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn sha(con: &mut redis::Connection, script: &str) -> String {
        load_scripts(con, &[script]).unwrap().remove(0)
    }

    /// The race of the old cleanup: the consumer was seen idle with nothing pending,
    /// then read an entry; deleting it then would drop the entry from the group's
    /// pending list (never run again). The script checks again and keeps it.
    #[test]
    fn cleanup_keeps_a_consumer_that_read_an_entry_since_it_was_seen_idle() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        group(&mut con);
        let cleanup = sha(&mut con, CLEANUP_SCRIPT);
        assert!(read(&mut con, "gone", 1).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        // Seen: idle, nothing pending. Then it reads.
        let id = add(&mut con, "a");
        assert_eq!(read(&mut con, "gone", 1).len(), 1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!delete_consumer_if_idle(&mut con, &cleanup, STREAM, b"gone", 10).unwrap());
        assert_eq!(owner(&mut con, &id), "gone");
        // Done with it: now it goes, once idle past the time.
        let _: i64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&id)
            .query(&mut con)
            .unwrap();
        assert!(!delete_consumer_if_idle(&mut con, &cleanup, STREAM, b"gone", 60_000).unwrap());
        assert!(delete_consumer_if_idle(&mut con, &cleanup, STREAM, b"gone", 10).unwrap());
        assert!(consumers(&mut con).is_empty());
    }

    /// A renewal only renews what this consumer still owns; one another process took
    /// over is reported lost and stays that process's.
    #[test]
    fn renewal_leaves_an_entry_another_process_took_over() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        group(&mut con);
        let renew = sha(&mut con, RENEW_SCRIPT);
        let mine = add(&mut con, "mine");
        let taken = add(&mut con, "taken");
        assert_eq!(read(&mut con, "me", 2).len(), 2);
        std::thread::sleep(Duration::from_millis(30));
        // The other process's XAUTOCLAIM takes `taken` (its renewal came late).
        let _: Value = redis::cmd("XCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg("other")
            .arg(0)
            .arg(&taken)
            .query(&mut con)
            .unwrap();
        let gone = "0-1".to_owned(); // Settled and deleted meanwhile.
        let lost = renew_claims(&mut con, &renew, STREAM, "me", &[&mine, &taken, &gone]).unwrap();
        assert_eq!(lost, [taken.clone(), gone]);
        assert_eq!(owner(&mut con, &taken), "other");
        assert_eq!(owner(&mut con, &mine), "me");
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&mine)
            .arg(&mine)
            .arg(1)
            .query(&mut con)
            .unwrap();
        assert!(rows[0].2 < 30, "renewed: idle {} ms", rows[0].2);
        assert_eq!(rows[0].3, 1, "JUSTID: the delivery count stays");
    }

    /// `XAUTOCLAIM` goes on from the cursor it returned, through the stream, and
    /// starts over at `0-0` once it went through.
    #[test]
    fn autoclaim_goes_on_from_its_cursor() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        group(&mut con);
        let ids: Vec<String> = (0..3).map(|i| add(&mut con, &i.to_string())).collect();
        assert_eq!(read(&mut con, "dead", 3).len(), 3);
        let mut cursor = "0-0".to_owned();
        let first = autoclaim(&mut con, STREAM, "me", 0, &mut cursor, 1).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].id, ids[0]);
        assert_eq!(cursor, ids[1], "goes on after what it took");
        let second = autoclaim(&mut con, STREAM, "me", 0, &mut cursor, 2).unwrap();
        let second: Vec<&str> = second.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(second, [ids[1].as_str(), ids[2].as_str()]);
        assert_eq!(cursor, "0-0", "through: from the start again");
    }

    /// A Shared with one job `j` (it succeeds), its writer's channel, and the executor.
    fn shared() -> (
        Arc<Shared>,
        crossbeam_channel::Receiver<Command>,
        crate::tasks::Executor,
    ) {
        let executor = crate::tasks::Executor::start(1, 16).unwrap();
        let (writer, rx) = crossbeam_channel::unbounded();
        let name: Arc<str> = "j".into();
        let handler: super::super::Handler =
            Arc::new(|_job| Box::pin(async { Ok::<(), String>(()) }));
        let settings = super::super::JobSettings::new("redis://127.0.0.1:1");
        let shared = Arc::new(Shared {
            consumer: "me".into(),
            slots: vec![super::super::Slot {
                keys: super::super::Keys::new(&settings.prefix, &name),
                name: name.clone(),
                handler,
            }],
            settings,
            metrics: Arc::new(super::super::JobMetrics::new(&[name])),
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
            freed: crossbeam_channel::bounded(1),
            stop: std::sync::atomic::AtomicBool::new(false),
            halt: std::sync::atomic::AtomicBool::new(false),
            durability_checked: std::sync::atomic::AtomicBool::new(false),
            writer,
            waiting: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            tasks: executor.handle(),
            addr: String::new(),
        });
        (shared, rx, executor)
    }

    fn reader(shared: &Arc<Shared>) -> Reader<'_> {
        Reader::new(shared)
    }

    /// A run that ended keeps its entry held (so renewed, and its slot taken) until
    /// the writer wrote the outcome; an entry held here is never run a second time,
    /// whoever hands it again (a late `XAUTOCLAIM`).
    #[test]
    fn an_entry_stays_held_until_its_outcome_is_written_and_runs_once() {
        let (shared, rx, executor) = shared();
        let mut reader = reader(&shared);
        let entry = Entry::parse("1-0".into(), &[]);
        reader.dispatch(0, entry.clone(), 1);
        let Ok(Command::Settle { id, .. }) = rx.recv_timeout(Duration::from_secs(10)) else {
            panic!("the run sends its outcome to the writer");
        };
        assert_eq!(id, "1-0");
        let held = shared.in_flight().get(&(0, "1-0".to_owned())).copied();
        assert_eq!(
            held.map(|h| (h.settled, h.lost)),
            Some((true, false)),
            "held until written"
        );
        assert_eq!(reader.free(), shared.settings.concurrency - 1);
        // Handed again while held: not run.
        reader.dispatch(0, entry, 2);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        assert!(reader.waiting.is_empty());
        assert_eq!(shared.metrics.job(0).counts().done, 1);
        executor.shutdown(Duration::from_secs(1));
    }

    #[test]
    fn reads_never_ask_more_than_the_free_slots() {
        for jobs in 1..6 {
            for free in 0..12 {
                for first in 0..jobs {
                    let (streams, count) = read_plan(free, jobs, first);
                    assert!(streams.len() * count <= free, "{free} free, {jobs} jobs");
                    assert!(free == 0 || !streams.is_empty());
                    let mut unique = streams.clone();
                    unique.dedup();
                    assert_eq!(unique.len(), streams.len());
                }
            }
        }
        assert_eq!(read_plan(2, 3, 2), (vec![2, 0], 1));
        assert_eq!(read_plan(7, 3, 1), (vec![0, 1, 2], 2));
    }

    /// `XREADGROUP` answers an array per stream on RESP2 and a map on RESP3: both
    /// give the entries.
    #[test]
    fn read_replies_are_parsed_in_resp2_and_resp3() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        group(&mut con);
        let id = add(&mut con, "x");
        let url = format!("{}?protocol=resp3", redis.url());
        let mut resp3 = redis::Client::open(url)
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("c3")
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query(&mut resp3)
            .unwrap();
        assert!(matches!(reply, Value::Map(_)), "{reply:?}");
        let streams = read_reply(reply);
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].0, STREAM.as_bytes());
        let entry = parse_entry(&streams[0].1[0]).unwrap();
        assert_eq!(
            (entry.id.as_str(), &entry.payload[..]),
            (id.as_str(), &b"x"[..])
        );
        let id2 = add(&mut con, "y");
        let entries = read(&mut con, "c2", 1);
        assert_eq!(entries[0].id, id2);
        assert!(read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn a_redis_that_may_lose_jobs_is_warned_about() {
        let redis = TestRedis::start();
        let mut con = redis.con();
        let warnings = durability_warnings(&mut con);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("appendonly no"), "{warnings:?}");
        for (name, value) in [("appendonly", "yes"), ("maxmemory-policy", "allkeys-lru")] {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .exec(&mut con)
                .unwrap();
        }
        let warnings = durability_warnings(&mut con);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("noeviction"), "{warnings:?}");
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction")
            .exec(&mut con)
            .unwrap();
        assert!(durability_warnings(&mut con).is_empty());
    }
}
