//! The JetStream side: the stream, appends with their offsets, and reads of a topic's
//! last message and of its kept publications (see the module docs of [`super`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, LastRawMessageErrorKind, Republish, StorageType,
};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::envelope::{self, Origin};
use super::{Shared, sleep_unless_stopped};
use crate::broker::{HistoryReply, Inbound, Kind, Snapshot};

/// How long JetStream remembers a `Nats-Msg-Id`, to answer "duplicate" for a
/// publication sent again.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Consecutive errors of an unknown kind, with NATS answering, after which an append
/// is given up (a setting or permission NATS will never accept).
const MAX_OTHER_ERRORS: u32 = 5;

/// A question for the history reads.
pub(super) struct Read {
    pub(super) topic: String,
    pub(super) since: u64,
    pub(super) limit: usize,
    pub(super) reply: HistoryReply,
}

/// A topic's last message in the stream, as a publisher needs it to append the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// Its stream sequence (0: the subject has no message).
    pub(super) seq: u64,
    /// Its offset (0: none yet, or the epoch marker).
    pub(super) offset: u64,
    pub(super) epoch: Arc<str>,
    /// Who published it, and its sequence number there.
    pub(super) by: Option<(Origin, u64)>,
}

/// A publication stored and numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Appended {
    pub(super) offset: u64,
    pub(super) epoch: Arc<str>,
}

/// Why an append ended without a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The broker stopped first.
    Stopped,
    /// NATS will never take it (named).
    Refused(String),
}

/// A stored message, split: its offset, epoch and envelope.
pub(super) type Stored<'a> = (u64, &'a str, &'a [u8]);

/// Splits a stored message: `rso <offset> <epoch> <envelope>`, or the epoch marker
/// `rso 0 <epoch> ` (offset 0, empty envelope).
pub(super) fn split_stored(bytes: &[u8]) -> Option<Stored<'_>> {
    if let Some(rest) = bytes.strip_prefix(b"rso 0 ") {
        let epoch = rest.strip_suffix(b" ")?;
        let epoch = std::str::from_utf8(epoch).ok()?;
        let valid = !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
        return valid.then_some((0, epoch, &[][..]));
    }
    match envelope::split_position(bytes) {
        Ok((Some((offset, epoch)), envelope)) => Some((offset, epoch, envelope)),
        _ => None,
    }
}

/// A new epoch: 16 random hex digits.
fn new_epoch() -> Arc<str> {
    format!("{:016x}", getrandom::u64().unwrap_or(0)).into()
}

/// The stream and what is done with it; cheap to clone (one per task).
#[derive(Clone)]
pub(super) struct Store {
    pub(super) shared: Arc<Shared>,
    js: jetstream::Context,
    stream: jetstream::stream::Stream<()>,
}

/// An error talking to JetStream, by what to do about it.
enum Trouble {
    /// The stream is not there (deleted, or NATS lost it): make it again.
    NoStream,
    /// No answer, or the connection broke: ask again later.
    Transient(String),
    /// An answer that will not change by asking again.
    Other(String),
}

impl Store {
    pub(super) fn new(
        shared: Arc<Shared>,
        js: jetstream::Context,
        stream: jetstream::stream::Stream<()>,
    ) -> Self {
        Self { shared, js, stream }
    }

    fn config(&self) -> StreamConfig {
        let c = &self.shared.config;
        let prefix = &c.prefix;
        StreamConfig {
            name: self.shared.stream.clone(),
            description: Some("ringsocket: topics' publications, offsets and epochs".into()),
            subjects: vec![format!("{prefix}.h.>")],
            max_messages_per_subject: i64::try_from(c.history_size.max(1)).unwrap_or(i64::MAX),
            max_age: c.history_ttl,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            duplicate_window: DUPLICATE_WINDOW.min(c.history_ttl),
            republish: Some(Republish {
                source: format!("{prefix}.h.>"),
                destination: format!("{prefix}.l.>"),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// Creates the stream, or brings an existing one to our settings. Logged when it
    /// fails (JetStream not enabled, say): the caller tries again later.
    pub(super) async fn ensure_stream(&self) -> bool {
        match self.js.create_or_update_stream(self.config()).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    addr = %self.shared.addr,
                    stream = %self.shared.stream,
                    "NATS broker: cannot create or update the JetStream stream: {e} \
                     (is JetStream enabled: nats-server -js?); retrying"
                );
                false
            }
        }
    }

    /// The last message of `subject` (`Head::seq` 0 when it has none).
    async fn head(&self, subject: &str) -> Result<Head, Trouble> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(self.head_of(message.sequence, &message.payload)),
            Err(e) => match e.kind() {
                LastRawMessageErrorKind::NoMessageFound => Ok(Head {
                    seq: 0,
                    offset: 0,
                    epoch: new_epoch(),
                    by: None,
                }),
                kind => Err(raw_trouble(kind, &e)),
            },
        }
    }

    fn head_of(&self, seq: u64, payload: &[u8]) -> Head {
        match split_stored(payload) {
            Some((offset, epoch, rest)) => Head {
                seq,
                offset,
                epoch: epoch.into(),
                by: envelope::decode(rest)
                    .ok()
                    .and_then(|e| e.seq.map(|s| (e.origin, s))),
            },
            // Not ours: numbering starts over after it, in a new epoch.
            None => {
                self.shared
                    .metrics
                    .malformed
                    .fetch_add(1, Ordering::Relaxed);
                Head {
                    seq,
                    offset: 0,
                    epoch: new_epoch(),
                    by: None,
                }
            }
        }
    }

    /// Appends publication `seq` of this process to `topic`'s subject, numbered after
    /// `head` (read first when `None`): retries until JetStream has stored it, the
    /// broker stops, or JetStream refuses it for good. Returns the head after it.
    pub(super) async fn append(
        &self,
        topic: &str,
        (kind, payload): (Kind, &Bytes),
        seq: u64,
        mut head: Option<Head>,
        mut stop: watch::Receiver<bool>,
    ) -> (Option<Head>, Result<Appended, Failure>) {
        let shared = &self.shared;
        let subject = shared.stored_subject(topic);
        let msg_id = format!("{}-{seq}", shared.origin_hex);
        let mut envelope = Vec::new();
        envelope::encode(&shared.origin, seq, kind, payload, &mut envelope);
        let mut wait = shared.config.backoff_min;
        let mut other_errors = 0;
        loop {
            if shared.stopping() {
                return (head, Err(Failure::Stopped));
            }
            let trouble = match head.take() {
                None => match self.head(&subject).await {
                    Ok(h) if h.by == Some((shared.origin, seq)) => {
                        // Stored by a try whose answer was lost, past the duplicate
                        // window.
                        let appended = Appended {
                            offset: h.offset,
                            epoch: h.epoch.clone(),
                        };
                        return (Some(h), Ok(appended));
                    }
                    Ok(h) => {
                        head = Some(h);
                        continue;
                    }
                    Err(trouble) => trouble,
                },
                Some(h) => {
                    let offset = h.offset + 1;
                    let mut body = format!("rso {offset} {} ", h.epoch).into_bytes();
                    body.extend_from_slice(&envelope);
                    let max = self.js.client().server_info().max_payload;
                    if max > 0 && body.len() > max {
                        return (
                            Some(h),
                            Err(Failure::Refused(format!(
                                "{} bytes, over the NATS server's max_payload of {max}",
                                body.len()
                            ))),
                        );
                    }
                    let mut headers = HeaderMap::new();
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
                    headers.insert(
                        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                        h.seq.to_string().as_str(),
                    );
                    let acked = match self
                        .js
                        .publish_with_headers(subject.clone(), headers, body.into())
                        .await
                    {
                        Ok(future) => future.await,
                        Err(e) => Err(e),
                    };
                    match acked {
                        Ok(ack) if !ack.duplicate => {
                            let appended = Appended {
                                offset,
                                epoch: h.epoch.clone(),
                            };
                            let after = Head {
                                seq: ack.sequence,
                                offset,
                                epoch: h.epoch,
                                by: Some((shared.origin, seq)),
                            };
                            return (Some(after), Ok(appended));
                        }
                        Ok(ack) => {
                            // Stored by an earlier try: its position is in it.
                            shared.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                            match self.stream.get_raw_message(ack.sequence).await {
                                Ok(stored) => {
                                    if let Some((offset, epoch, _)) = split_stored(&stored.payload)
                                    {
                                        let appended = Appended {
                                            offset,
                                            epoch: epoch.into(),
                                        };
                                        return (None, Ok(appended));
                                    }
                                    return (None, Err(Failure::Refused(
                                        "JetStream answered duplicate for a message that is not ours".into(),
                                    )));
                                }
                                Err(e) => {
                                    head = Some(h);
                                    raw_trouble(e.kind(), &e)
                                }
                            }
                        }
                        Err(e) => match e.kind() {
                            // Another process appended first: read its message, number
                            // after it.
                            PublishErrorKind::WrongLastSequence => continue,
                            PublishErrorKind::StreamNotFound => Trouble::NoStream,
                            PublishErrorKind::TimedOut
                            | PublishErrorKind::BrokenPipe
                            | PublishErrorKind::MaxAckPending => {
                                // Sent again as it is: "duplicate" if it was stored.
                                head = Some(h);
                                Trouble::Transient(e.to_string())
                            }
                            _ => {
                                head = Some(h);
                                Trouble::Other(e.to_string())
                            }
                        },
                    }
                }
            };
            match trouble {
                Trouble::NoStream => {
                    // Numbering starts over in the new stream.
                    head = None;
                    if self.ensure_stream().await {
                        continue;
                    }
                }
                Trouble::Transient(e) => {
                    tracing::debug!(topic, "NATS broker: append not answered: {e}; retrying");
                }
                Trouble::Other(e) => {
                    other_errors += 1;
                    if other_errors >= MAX_OTHER_ERRORS {
                        return (head, Err(Failure::Refused(e)));
                    }
                    tracing::debug!(topic, "NATS broker: append failed: {e}; retrying");
                }
            }
            if !sleep_unless_stopped(&mut stop, wait).await {
                return (head, Err(Failure::Stopped));
            }
            wait = (wait * 2).min(shared.config.backoff_max);
        }
    }

    /// The first message of `subject` at or after stream sequence `from`.
    async fn next_from(&self, subject: &str, from: u64) -> Result<Option<(u64, Bytes)>, Trouble> {
        let got = self
            .stream
            .raw_message_builder()
            .sequence(from.max(1))
            .next_by_subject(subject.to_owned())
            .send()
            .await;
        match got {
            Ok(message) => Ok(Some((message.sequence, message.payload))),
            Err(e) => match e.kind() {
                LastRawMessageErrorKind::NoMessageFound => Ok(None),
                kind => Err(raw_trouble(kind, &e)),
            },
        }
    }

    /// The kept publications of `topic` with offsets in `after + 1 ..= upto`, at most
    /// `limit`, oldest first; `head` is the subject's last message (offset ≥ `upto`).
    ///
    /// Offsets grow with stream sequences along a subject, so the first one wanted is
    /// found by a binary search over the sequences up to `head.seq` (each probe one
    /// "next message of the subject from sequence n"), then read on one by one.
    async fn range(
        &self,
        topic: &str,
        head: &Head,
        (after, upto, limit): (u64, u64, usize),
    ) -> Result<Vec<Inbound>, Trouble> {
        let shared = &self.shared;
        let mut out = Vec::new();
        if shared.config.history_size == 0 || upto <= after || limit == 0 || head.seq == 0 {
            return Ok(out);
        }
        let subject = shared.stored_subject(topic);
        let (mut lo, mut hi) = (1, head.seq);
        let mut found = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some((seq, payload)) = self.next_from(&subject, mid).await? else {
                break;
            };
            let offset = split_stored(&payload).map_or(0, |s| s.0);
            if offset > after {
                hi = seq;
                found = Some((seq, payload));
            } else {
                lo = seq + 1;
            }
        }
        let mut current = match found {
            Some((seq, payload)) if seq == hi => Some((seq, payload)),
            _ => self.next_from(&subject, hi).await?,
        };
        while let Some((seq, payload)) = current {
            if out.len() >= limit || seq > head.seq {
                break;
            }
            match split_stored(&payload) {
                Some((offset, _, _)) if offset > upto => break,
                Some((offset, epoch, rest)) if offset > after => {
                    if let Some(inbound) = self.inbound(topic, (offset, epoch), rest) {
                        out.push(inbound);
                    }
                }
                Some(_) => {}
                None => {
                    shared.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            current = self.next_from(&subject, seq + 1).await?;
        }
        Ok(out)
    }

    /// A stored publication as an [`Inbound`]; `None` (counted) for one that is not
    /// our envelope or too large.
    pub(super) fn inbound(
        &self,
        topic: &str,
        (offset, epoch): (u64, &str),
        bytes: &[u8],
    ) -> Option<Inbound> {
        let metrics = &self.shared.metrics;
        let envelope = match envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(_) => {
                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let own = envelope.origin == self.shared.origin;
        if !own && envelope.payload.len() > self.shared.config.max_payload {
            metrics.oversized.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Inbound {
            topic: topic.to_owned(),
            kind: envelope.kind,
            payload: Bytes::copy_from_slice(envelope.payload),
            position: Some((offset, epoch.into())),
            own,
        })
    }

    /// A subscription's snapshot: the epoch (fixed now with a marker when the topic
    /// has no message yet, so that a subscriber before the first publication gets the
    /// epoch it will carry), the last offset and the kept publications after `since`.
    async fn snapshot(&self, topic: &str, since: u64, limit: usize) -> Result<Snapshot, Trouble> {
        let subject = self.shared.stored_subject(topic);
        let mut head = self.head(&subject).await?;
        if head.seq == 0 {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            let marker = format!("rso 0 {} ", head.epoch);
            let acked = match self
                .js
                .publish_with_headers(subject.clone(), headers, marker.into())
                .await
            {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => {}
                // Someone published first: theirs is the epoch.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    head = self.head(&subject).await?;
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(Trouble::NoStream);
                }
                Err(e) => return Err(Trouble::Transient(e.to_string())),
            }
        }
        let entries = if since < head.offset {
            self.range(topic, &head, (since, head.offset, limit))
                .await?
        } else {
            Vec::new()
        };
        Ok(Snapshot {
            epoch: head.epoch,
            top: head.offset,
            entries,
        })
    }

    /// Reads the last message of `topic` (as an [`Inbound`], `None` when it has none
    /// or only the epoch marker).
    pub(super) async fn last(&self, topic: &str) -> Result<Option<Inbound>, String> {
        let subject = self.shared.stored_subject(topic);
        let message = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        Ok(match split_stored(&message.payload) {
            Some((offset, epoch, rest)) if offset > 0 => self.inbound(topic, (offset, epoch), rest),
            _ => None,
        })
    }

    /// The kept publications of `topic` in `after + 1 ..= upto`, for a gap fill.
    pub(super) async fn fill(
        &self,
        topic: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<Inbound>, String> {
        let subject = self.shared.stored_subject(topic);
        let head = self.head(&subject).await.map_err(Trouble::into_string)?;
        let limit = usize::try_from(upto.saturating_sub(after)).unwrap_or(usize::MAX);
        self.range(topic, &head, (after, upto, limit))
            .await
            .map_err(Trouble::into_string)
    }
}

impl Trouble {
    fn into_string(self) -> String {
        match self {
            Self::NoStream => "the JetStream stream is missing".into(),
            Self::Transient(e) | Self::Other(e) => e,
        }
    }
}

fn raw_trouble(kind: LastRawMessageErrorKind, e: &impl std::fmt::Display) -> Trouble {
    match kind {
        LastRawMessageErrorKind::JetStream(err)
            if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
        {
            Trouble::NoStream
        }
        LastRawMessageErrorKind::JetStream(_) | LastRawMessageErrorKind::InvalidSubject => {
            Trouble::Other(e.to_string())
        }
        _ => Trouble::Transient(e.to_string()),
    }
}

/// Answers history reads, each in a task of its own (a slow one holds up no other),
/// until the broker stops; what is still asked then gets an error.
pub(super) async fn serve(
    store: Store,
    mut reads: mpsc::Receiver<Read>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            read = reads.recv() => {
                let Some(read) = read else { break };
                let store = store.clone();
                let Read { topic, since, limit, reply } = read;
                let reply = std::sync::Mutex::new(Some(reply));
                tasks.spawn(async move {
                    let mut result = store.snapshot(&topic, since, limit).await;
                    if matches!(result, Err(Trouble::NoStream)) && store.ensure_stream().await {
                        result = store.snapshot(&topic, since, limit).await;
                    }
                    let reply = reply.lock().ok().and_then(|mut r| r.take());
                    if let Some(reply) = reply {
                        reply(result.map_err(|e| format!("NATS: {}", e.into_string())));
                    }
                });
            }
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    reads.close();
    while let Ok(read) = reads.try_recv() {
        (read.reply)(Err("the NATS broker stopped".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_messages_split_into_offset_epoch_and_envelope() {
        assert_eq!(
            split_stored(b"rso 7 00ab rsb\x02..."),
            Some((7, "00ab", &b"rsb\x02..."[..]))
        );
        assert_eq!(split_stored(b"rso 0 00ab "), Some((0, "00ab", &b""[..])));
        for bad in [
            &b"rso 0 00ab"[..],
            b"rso 0  ",
            b"rso 0 a-b ",
            b"hello",
            b"rso x y z",
        ] {
            assert_eq!(split_stored(bad), None, "{bad:?}");
        }
    }
}
