//! The publisher thread: one Redis connection for the whole process, fed by the bounded
//! publish queue, sending everything queued in one pipelined batch per round trip.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use redis::RedisResult;

use super::envelope;
use super::{Link, LinkState, Outbound, Shared};

/// Most messages in one pipelined batch.
const MAX_BATCH_MESSAGES: usize = 4096;
/// A batch is closed once its payloads reach this many bytes.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Runs until the broker stops: connect, forward batches; on a loss, drop (and count)
/// what is published until Redis is back.
pub(super) fn run(shared: &Shared, queue: &Receiver<Outbound>, stop: &Receiver<()>) {
    let mut link = LinkState::new(Link::Publisher, shared);
    let mut sender = Sender {
        shared,
        queue,
        stop,
        batch: Vec::new(),
        next_seq: 1,
        pipe: redis::pipe(),
        channel: String::new(),
        envelope: Vec::new(),
    };
    while let Some(mut con) = shared.connect(&mut link, |d| sender.drop_for(d)) {
        link.connected(shared);
        let lost = shared.lost_while_away.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                addr = %shared.addr,
                "Redis broker: {lost} messages could not be forwarded while Redis was unreachable"
            );
        }
        match sender.session(&mut con) {
            Ok(()) => break,
            Err(e) => link.lost(shared, &e),
        }
    }
    link.closed(shared);
    // Stopping: what is still queued will not be forwarded.
    for message in queue.try_iter() {
        sender.taken(&message);
        shared.failed(1);
    }
}

/// The publisher's state that outlives one connection (buffers are reused).
struct Sender<'a> {
    shared: &'a Shared,
    queue: &'a Receiver<Outbound>,
    stop: &'a Receiver<()>,
    batch: Vec<Outbound>,
    /// The sequence number of the next message encoded.
    next_seq: u64,
    pipe: redis::Pipeline,
    channel: String,
    envelope: Vec<u8>,
}

impl Sender<'_> {
    /// One connection's life. `Ok` when the broker stops, `Err` when the connection is
    /// lost (the batch in flight is counted as failed).
    fn session(&mut self, con: &mut redis::Connection) -> RedisResult<()> {
        let shared = self.shared;
        loop {
            select! {
                recv(self.queue) -> message => match message {
                    Ok(message) => {
                        self.taken(&message);
                        self.batch.push(message);
                    }
                    Err(_) => return Ok(()),
                },
                recv(self.stop) -> _ => return Ok(()),
                default(shared.config.health_interval) => {
                    redis::cmd("PING").exec(con)?;
                    continue;
                }
            }
            let mut bytes = self.batch.iter().map(|m| m.payload.len()).sum::<usize>();
            while self.batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
                let Ok(message) = self.queue.try_recv() else {
                    break;
                };
                bytes += message.payload.len();
                self.taken(&message);
                self.batch.push(message);
            }
            self.pipe.clear();
            for message in &self.batch {
                shared.channel_into(&message.topic, &mut self.channel);
                self.envelope.clear();
                envelope::encode(
                    &shared.origin,
                    self.next_seq,
                    message.kind,
                    &message.payload,
                    &mut self.envelope,
                );
                self.next_seq += 1;
                self.pipe
                    .cmd("PUBLISH")
                    .arg(self.channel.as_str())
                    .arg(self.envelope.as_slice())
                    .ignore();
            }
            let count = self.batch.len() as u64;
            self.batch.clear();
            match self.pipe.exec(con) {
                Ok(()) => {
                    shared.metrics.published.fetch_add(count, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.failed(count);
                    shared.lost_while_away.fetch_add(count, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Accounts for a message leaving the publish queue.
    fn taken(&self, message: &Outbound) {
        self.shared
            .queued_bytes
            .fetch_sub(message.payload.len(), Ordering::Relaxed);
    }

    /// While Redis is away: drops (and counts) whatever is published for `time`. False
    /// when the broker is stopping.
    fn drop_for(&mut self, time: Duration) -> bool {
        let deadline = Instant::now() + time;
        loop {
            select! {
                recv(self.queue) -> message => match message {
                    Ok(message) => {
                        self.taken(&message);
                        self.shared.failed(1);
                        self.shared.lost_while_away.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return false,
                },
                recv(self.stop) -> _ => return false,
                default(deadline.saturating_duration_since(Instant::now())) => return true,
            }
        }
    }
}
