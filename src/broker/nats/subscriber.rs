//! The subscriber: one core NATS subscription per wanted topic (its live subject),
//! everything received handed to the sink in one place, in order, with gaps filled
//! from the stream; the connection's events (metrics, log lines, the catch-up after a
//! reconnection).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::reader::{Store, split_stored};
use super::{NAME, Shared, lock};
use crate::broker::backlog::RateLimit;
use crate::broker::{Accepted, Inbound, report};

/// Messages received and not yet handed to the sink, across topics.
pub(super) const INBOX: usize = 4096;

/// Runs until the broker stops.
pub(super) async fn run(
    shared: &Arc<Shared>,
    client: &async_nats::Client,
    store: &Store,
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    mut own: mpsc::Receiver<Inbound>,
    mut stop: watch::Receiver<bool>,
) {
    let (live_tx, mut live) = mpsc::channel(INBOX);
    let mut listener = Listener {
        shared: shared.clone(),
        store: store.clone(),
        subscriptions: HashMap::new(),
        live_tx,
        down_since: Some((Instant::now(), false)),
        malformed_log: RateLimit::new(),
        slow_log: RateLimit::new(),
    };
    loop {
        let mut catch_up = false;
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            event = events.recv() => match event {
                Some(event) => catch_up = listener.event(event),
                None => break,
            },
            () = shared.wanted_changed.notified() => listener.sync(client).await,
            inbound = own.recv() => match inbound {
                Some(inbound) => listener.hand_over(inbound).await,
                None => break,
            },
            Some(message) = live.recv() => listener.live(&message).await,
        }
        if catch_up {
            listener.catch_up(client).await;
        }
    }
    for (_, task) in listener.subscriptions.drain() {
        task.abort();
    }
}

struct Listener {
    shared: Arc<Shared>,
    store: Store,
    /// Topic → the task forwarding its subscription's messages (aborting it drops the
    /// subscription: an `UNSUB`).
    subscriptions: HashMap<String, JoinHandle<()>>,
    live_tx: mpsc::Sender<async_nats::Message>,
    /// When the connection went down (`None` while up), and whether after a loss.
    down_since: Option<(Instant, bool)>,
    malformed_log: RateLimit,
    slow_log: RateLimit,
}

impl Listener {
    /// A connection event: metrics and one log line. True when a lost connection is
    /// back (then what was missed meanwhile is read from the stream).
    fn event(&mut self, event: async_nats::Event) -> bool {
        let shared = &self.shared;
        let metrics = &shared.metrics;
        match event {
            async_nats::Event::Connected => {
                metrics.connected.store(1, Ordering::Relaxed);
                shared.was_connected.store(true, Ordering::Relaxed);
                match self.down_since.take() {
                    Some((since, true)) => {
                        metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            addr = %shared.addr,
                            "NATS broker: reconnected after {:.1} s; catching up from the stream",
                            since.elapsed().as_secs_f64()
                        );
                        return true;
                    }
                    Some((_, false)) => {
                        tracing::debug!(addr = %shared.addr, "NATS broker: connected");
                    }
                    None => {}
                }
            }
            async_nats::Event::Disconnected => {
                metrics.connected.store(0, Ordering::Relaxed);
                metrics.connection_errors.fetch_add(1, Ordering::Relaxed);
                self.down_since = Some((Instant::now(), true));
                tracing::warn!(
                    addr = %shared.addr,
                    "NATS broker: connection lost; reconnecting (publishes wait in the backlog)"
                );
            }
            async_nats::Event::SlowConsumer(_) => {
                if let Some(suppressed) = self.slow_log.check() {
                    tracing::warn!(
                        addr = %shared.addr,
                        "NATS broker: a subscription fell behind and NATS dropped messages \
                         for it; they are filled from the stream at the next one \
                         ({suppressed} more such lines held back)"
                    );
                }
            }
            async_nats::Event::ServerError(e) => {
                tracing::warn!(addr = %shared.addr, "NATS broker: server error: {e}");
            }
            // Each failed attempt while reconnecting (logged once, above).
            async_nats::Event::ClientError(e) => {
                tracing::debug!(addr = %shared.addr, "NATS broker: client error: {e}");
            }
            other => tracing::info!(addr = %shared.addr, "NATS broker: {other}"),
        }
        false
    }

    /// Brings the subscriptions in line with the wanted topics.
    async fn sync(&mut self, client: &async_nats::Client) {
        let shared = self.shared.clone();
        let (add, remove): (Vec<String>, Vec<String>) = {
            let wanted = lock(&shared.wanted);
            (
                wanted
                    .iter()
                    .filter(|t| !self.subscriptions.contains_key(*t))
                    .cloned()
                    .collect(),
                self.subscriptions
                    .keys()
                    .filter(|t| !wanted.contains(*t))
                    .cloned()
                    .collect(),
            )
        };
        for topic in remove {
            if let Some(task) = self.subscriptions.remove(&topic) {
                task.abort();
            }
        }
        for topic in add {
            match client.subscribe(shared.live_subject(&topic)).await {
                Ok(mut subscriber) => {
                    let tx = self.live_tx.clone();
                    let task = tokio::spawn(async move {
                        while let Some(message) = subscriber.next().await {
                            if tx.send(message).await.is_err() {
                                break;
                            }
                        }
                    });
                    self.subscriptions.insert(topic, task);
                }
                Err(e) => {
                    tracing::warn!(topic, "NATS broker: cannot subscribe: {e}");
                }
            }
        }
        shared
            .metrics
            .subscriptions
            .store(self.subscriptions.len() as u64, Ordering::Relaxed);
    }

    /// A message on a live subject: another process's publication, numbered.
    async fn live(&mut self, message: &async_nats::Message) {
        let shared = self.shared.clone();
        let Some(topic) = shared.topic_of_live(&message.subject) else {
            self.malformed(&message.subject, "not one of our subjects");
            return;
        };
        if !self.subscriptions.contains_key(&topic) {
            // Sent before our UNSUB took effect: nobody here wants it any more.
            return;
        }
        let Some((offset, epoch, rest)) = split_stored(&message.payload) else {
            self.malformed(&message.subject, "no rso <offset> <epoch> position");
            return;
        };
        if offset == 0 {
            // An epoch marker: no publication.
            return;
        }
        let Some(inbound) = self.store.inbound(&topic, (offset, epoch), rest) else {
            return;
        };
        if inbound.own {
            // Handed over when JetStream numbered it.
            return;
        }
        shared.metrics.received.fetch_add(1, Ordering::Relaxed);
        self.hand_over(inbound).await;
    }

    /// After a reconnection: once the subscriptions are back at the server, hands the
    /// last message of every topic to the sink; a topic that missed some shows a gap,
    /// filled from the stream.
    async fn catch_up(&mut self, client: &async_nats::Client) {
        // The resubscriptions went out before anything asked after the reconnection:
        // a flush's answer means the server has them.
        if let Err(e) = client.flush().await {
            tracing::debug!("NATS broker: flush after reconnecting failed: {e}");
        }
        let topics: Vec<String> = self.subscriptions.keys().cloned().collect();
        for topic in topics {
            match self.store.last(&topic).await {
                Ok(Some(inbound)) => self.hand_over(inbound).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    topic,
                    "NATS broker: cannot read the topic's last message after reconnecting: {e}"
                ),
            }
        }
    }

    /// Hands `inbound` to the sink; when the sink finds offsets missing before it,
    /// reads them from the stream first, hands them over in order, then `inbound`
    /// again.
    async fn hand_over(&mut self, inbound: Inbound) {
        let shared = self.shared.clone();
        let again = inbound.clone();
        let Some(Accepted::Gap { after }) = self.sink(inbound) else {
            return;
        };
        let inbound = again;
        let Some(offset) = inbound.position.as_ref().map(|(offset, _)| *offset) else {
            return;
        };
        let timeout = shared.config.io_timeout * 2;
        let filled =
            tokio::time::timeout(timeout, self.store.fill(&inbound.topic, after, offset - 1))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let entries = report::gap_fill(
            NAME,
            &shared.metrics,
            &inbound.topic,
            (after, offset - 1),
            filled,
        );
        for entry in entries {
            let _ = self.sink(entry);
        }
        // Taken now, whatever is still missing.
        let _ = self.sink(inbound);
    }

    /// Calls the sink, which is the pubsub layer's: should it panic, the broker
    /// carries on.
    fn sink(&self, inbound: Inbound) -> Option<Accepted> {
        let topic = inbound.topic.clone();
        report::deliver(NAME, &self.shared.sink, &topic, inbound)
    }

    fn malformed(&self, subject: &str, cause: &str) {
        report::malformed(
            NAME,
            &self.shared.metrics,
            &self.malformed_log,
            subject,
            &cause,
        );
    }
}
