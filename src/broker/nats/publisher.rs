//! The publisher: takes the backlog's messages in publish order and appends them to
//! JetStream, one append in flight per topic (the next offset depends on the last), up
//! to [`MAX_IN_FLIGHT`] topics at once. A message leaves the backlog when JetStream
//! has stored it (or refused it for good); while NATS is away the appends are retried
//! as they are, and what follows waits behind them, in order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::reader::{Appended, Failure, Head, Store};
use super::{Shared, lock};
use crate::broker::Inbound;
use crate::broker::backlog::{Backlog, Outbound, RateLimit};

/// Topics with an append in flight at once (and JetStream acks awaited).
pub(super) const MAX_IN_FLIGHT: usize = 1024;
/// Topics whose last message is remembered between appends; past it the memory starts
/// over (the next append of a forgotten topic reads its last message first).
const MAX_HEADS: usize = 4096;

/// A message of the backlog with its sequence number.
struct Numbered {
    message: Outbound,
    seq: u64,
}

type Done = (Box<str>, Option<Head>, Result<Appended, Failure>);

/// Runs until the broker stops; then what is still in the backlog is counted as
/// failed and its acks told `None`.
pub(super) async fn run(
    shared: Arc<Shared>,
    store: Store,
    mut queue: mpsc::Receiver<Outbound>,
    deliver: mpsc::Sender<Inbound>,
    mut stop: watch::Receiver<bool>,
) {
    let mut publisher = Publisher {
        shared: shared.clone(),
        store,
        stop: stop.clone(),
        next_seq: 1,
        waiting: HashMap::new(),
        flying: HashSet::new(),
        ready: VecDeque::new(),
        heads: HashMap::new(),
        tasks: JoinSet::new(),
        refused_log: RateLimit::new(),
    };
    let mut stream_ready = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(done) = publisher.tasks.join_next(), if !publisher.tasks.is_empty() => {
                let Ok((topic, head, result)) = done else { continue };
                publisher.done(topic, head, result, &deliver).await;
            }
            message = queue.recv() => {
                let Some(message) = message else { break };
                if !stream_ready {
                    // Once, before the first append (retried by the append when the
                    // stream goes missing later).
                    stream_ready = publisher.store.ensure_stream().await;
                }
                publisher.take(message);
            }
        }
    }
    publisher.tasks.abort_all();
    while publisher.tasks.join_next().await.is_some() {}
    queue.close();
    let mut abandoned: Vec<Outbound> = publisher
        .waiting
        .drain()
        .flat_map(|(_, messages)| messages.into_iter().map(|n| n.message))
        .collect();
    while let Ok(message) = queue.try_recv() {
        abandoned.push(message);
    }
    if !abandoned.is_empty() {
        let count = abandoned.len() as u64;
        let bytes: u64 = abandoned.iter().map(|m| m.payload.len() as u64).sum();
        for message in abandoned {
            message.unacked();
        }
        Backlog::release(&shared.metrics, count, bytes);
        Backlog::failed(&shared.metrics, count);
        tracing::warn!(
            addr = %shared.addr,
            "NATS broker: stopped with {count} messages in the backlog; they were not forwarded"
        );
    }
}

struct Publisher {
    shared: Arc<Shared>,
    store: Store,
    stop: watch::Receiver<bool>,
    next_seq: u64,
    /// Per topic, its messages not yet stored, oldest first; the first one's append
    /// is in flight when the topic is in `flying`.
    waiting: HashMap<Box<str>, VecDeque<Numbered>>,
    flying: HashSet<Box<str>>,
    /// Topics with messages waiting for a free slot (more than [`MAX_IN_FLIGHT`]).
    ready: VecDeque<Box<str>>,
    heads: HashMap<Box<str>, Head>,
    tasks: JoinSet<Done>,
    refused_log: RateLimit,
}

impl Publisher {
    fn take(&mut self, message: Outbound) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let topic = message.topic.clone();
        let queue = self.waiting.entry(topic.clone()).or_default();
        queue.push_back(Numbered { message, seq });
        if queue.len() == 1 && !self.flying.contains(&topic) {
            self.launch(topic);
        }
    }

    /// Starts the append of `topic`'s oldest waiting message, or queues the topic
    /// for a free slot.
    fn launch(&mut self, topic: Box<str>) {
        if self.flying.len() >= MAX_IN_FLIGHT {
            self.ready.push_back(topic);
            return;
        }
        let Some(first) = self.waiting.get(&topic).and_then(VecDeque::front) else {
            return;
        };
        let (kind, payload, seq) = (first.message.kind, first.message.payload.clone(), first.seq);
        let head = self.heads.get(&topic).cloned();
        let store = self.store.clone();
        let stop = self.stop.clone();
        self.flying.insert(topic.clone());
        self.tasks.spawn(async move {
            let (head, result) = store
                .append(&topic, (kind, &payload), seq, head, stop)
                .await;
            (topic, head, result)
        });
    }

    /// An append ended: ack, deliver here, release, and start the topic's next.
    async fn done(
        &mut self,
        topic: Box<str>,
        head: Option<Head>,
        result: Result<Appended, Failure>,
        deliver: &mpsc::Sender<Inbound>,
    ) {
        let shared = self.shared.clone();
        self.flying.remove(&topic);
        match head {
            Some(head) => {
                if self.heads.len() >= MAX_HEADS && !self.heads.contains_key(&topic) {
                    self.heads.clear();
                }
                self.heads.insert(topic.clone(), head);
            }
            None => {
                self.heads.remove(&topic);
            }
        }
        let Some(queue) = self.waiting.get_mut(&topic) else {
            return;
        };
        if matches!(result, Err(Failure::Stopped)) {
            // Stays in the backlog, abandoned (and counted) by `run`.
            return;
        }
        let Some(Numbered { message, .. }) = queue.pop_front() else {
            return;
        };
        let empty = queue.is_empty();
        if empty {
            self.waiting.remove(&topic);
        }
        let metrics = &shared.metrics;
        Backlog::release(metrics, 1, message.payload.len() as u64);
        match result {
            Ok(Appended { offset, epoch }) => {
                metrics.published.fetch_add(1, Ordering::Relaxed);
                let position = (offset, epoch);
                let wanted_here = lock(&shared.wanted).contains(&*topic);
                let Outbound {
                    kind, payload, ack, ..
                } = message;
                if let Some(ack) = ack {
                    ack(Some(position.clone()));
                }
                if wanted_here {
                    // Its ringsocket.v1 side, here, with its offset.
                    let own = Inbound {
                        topic: topic.to_string(),
                        kind,
                        payload,
                        position: Some(position),
                        own: true,
                    };
                    let _ = deliver.send(own).await;
                }
            }
            Err(Failure::Refused(e)) => {
                Backlog::failed(metrics, 1);
                message.unacked();
                if let Some(suppressed) = self.refused_log.check() {
                    tracing::warn!(
                        addr = %shared.addr,
                        topic = %topic,
                        "NATS broker: JetStream refused a publication: {e}; it is dropped \
                         ({suppressed} more such lines held back)"
                    );
                }
            }
            Err(Failure::Stopped) => {}
        }
        if !empty {
            self.launch(topic);
        }
        while self.flying.len() < MAX_IN_FLIGHT {
            let Some(next) = self.ready.pop_front() else {
                break;
            };
            if !self.flying.contains(&next) {
                self.launch(next);
            }
        }
    }
}
