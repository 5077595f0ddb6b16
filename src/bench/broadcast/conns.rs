//! The connections of `bench broadcast`: each load generator thread's subscribers and
//! publishers, and the state they share on that thread.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::LocalSet;

use super::layout::Layout;
use super::message::{Arrival, Format, Header, Track};
use super::v1::{self, Envelope};
use super::{BroadcastOptions, Collected, Phase, Plan, Shared, StepStats, ThreadEnd};
use crate::bench::client::{self, Client};
use crate::bench::new_runtime;
use crate::bench::stats;
use crate::proto::{CloseCode, Event};

/// A thread's subscribers' tracks and its counts, shared by its tasks.
#[derive(Debug)]
pub(super) struct ThreadState {
    pubs: usize,
    format: Rc<Format>,
    /// With --v1, per room: takes the message out of each publication of its topic.
    envelopes: Vec<Envelope>,
    /// `tracks[sub * pubs + publisher]`; only those of a subscriber's room's
    /// publishers are used.
    tracks: Vec<Track>,
    /// Per subscriber: its room, and its sub URL when their latency is kept apart.
    subs: Vec<SubPlace>,
    /// Per publisher: its room.
    pub_rooms: Vec<usize>,
    /// Per room: its publishers.
    room_pubs: Vec<usize>,
    /// Per subscriber: publishers heard during the probe, and how many.
    heard: Vec<(Vec<bool>, usize)>,
    /// The step `stats` belong to.
    stats_step: u32,
    stats: StepStats,
    errors: BTreeMap<String, u64>,
    pub(super) close_failures: u64,
    /// Per publisher (by id): when it next has messages due, if it is waiting for that.
    publish_due: Vec<Option<Instant>>,
}

/// Where a thread's subscriber is.
#[derive(Debug, Clone, Copy)]
struct SubPlace {
    room: usize,
    /// Its sub URL, when each one's latency is kept apart.
    url: Option<usize>,
}

impl ThreadState {
    /// `subs`: the global indices of the thread's subscribers, in order.
    fn new(
        subs: &[usize],
        pubs: usize,
        format: Rc<Format>,
        v1_topics: Option<Vec<String>>,
        layout: &Layout,
    ) -> Self {
        let split = layout.split_urls() > 0;
        let places: Vec<SubPlace> = subs
            .iter()
            .map(|&i| SubPlace {
                room: layout.sub_room(i),
                url: split.then(|| layout.sub_url(i)),
            })
            .collect();
        Self {
            pubs,
            format,
            envelopes: v1_topics
                .unwrap_or_default()
                .iter()
                .map(|t| Envelope::new(t))
                .collect(),
            tracks: vec![Track::default(); subs.len() * pubs],
            subs: places,
            pub_rooms: (0..pubs).map(|p| layout.pub_room(p)).collect(),
            room_pubs: (0..layout.rooms()).map(|r| layout.pubs_in(r)).collect(),
            heard: vec![(vec![false; pubs], 0); subs.len()],
            stats_step: 0,
            stats: StepStats::new(),
            errors: BTreeMap::new(),
            close_failures: 0,
            publish_due: vec![None; pubs],
        }
    }

    fn stats_for(&mut self, step: u32) -> &mut StepStats {
        if self.stats_step != step {
            self.stats_step = step;
            self.stats = StepStats::new();
        }
        &mut self.stats
    }

    fn malformed(&mut self, step: u32, why: String) {
        let stats = self.stats_for(step);
        stats.malformed += 1;
        stats.first_malformed.get_or_insert(why);
    }

    /// Accounts for one message received by subscriber `sub` at `now`; returns
    /// whether it was a new delivery of the current step.
    fn receive(
        &mut self,
        sub: usize,
        payload: &[u8],
        now: Instant,
        phase: &Phase,
        shared: &Shared,
    ) -> bool {
        let current = match phase {
            Phase::Step(plan) => plan.step,
            Phase::Collect { plan, .. } => plan.step,
            _ => 0,
        };
        let Some(place) = self.subs.get(sub).copied() else {
            return false;
        };
        let data;
        let payload = match self.envelopes.get(place.room) {
            None => payload,
            Some(envelope) => match envelope.data(payload, |b| self.format.json_len_at(b)) {
                Ok(inner) => {
                    data = inner;
                    &data[..]
                }
                Err(why) => {
                    self.malformed(current, why);
                    return false;
                }
            },
        };
        let header = match self.format.decode(payload) {
            Ok(header) => header,
            Err(why) => {
                self.malformed(current, why);
                return false;
            }
        };
        let publisher = header.publisher as usize;
        if publisher >= self.pubs {
            self.malformed(
                current,
                format!("a message from publisher {publisher}, of {}", self.pubs),
            );
            return false;
        }
        let room = self.pub_rooms[publisher];
        if room != place.room {
            self.malformed(
                current,
                format!(
                    "a message of publisher {publisher} (room {room}) on a subscriber of \
                     room {}",
                    place.room
                ),
            );
            return false;
        }
        if payload.len() != self.format.size {
            self.malformed(
                current,
                format!(
                    "a {} B message instead of {}",
                    payload.len(),
                    self.format.size
                ),
            );
            return false;
        }
        let plan = match phase {
            Phase::Probe if header.step == 0 => {
                let (heard, count) = &mut self.heard[sub];
                if !heard[publisher] {
                    heard[publisher] = true;
                    *count += 1;
                    if *count == self.room_pubs[place.room] {
                        shared.ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return false;
            }
            Phase::Step(plan) if header.step == plan.step => plan,
            _ => {
                self.stats_for(current).stale += 1;
                return false;
            }
        };
        let arrival = self.tracks[sub * self.pubs + publisher].arrive(plan.step, header.seq);
        let stats = self.stats_for(plan.step);
        match arrival {
            Arrival::Duplicate => {
                stats.duplicated += 1;
                return false;
            }
            Arrival::Reordered => stats.reordered += 1,
            Arrival::InOrder => {}
        }
        stats.delivered += 1;
        if now >= plan.warm_end && now < plan.end {
            stats.window_deliveries += 1;
            let latency =
                Duration::from_nanos(shared.nanos_since_base(now).saturating_sub(header.sent_ns));
            stats::record(&mut stats.latency, latency);
            if let Some(url) = place.url {
                if stats.latency_by_url.len() <= url {
                    stats
                        .latency_by_url
                        .resize_with(url + 1, stats::new_histogram);
                }
                stats::record(&mut stats.latency_by_url[url], latency);
            }
        }
        true
    }

    /// Whether a publisher of this thread has messages due (and is waiting for its
    /// timer, which runs only when the thread's tasks yield).
    pub(super) fn publisher_due(&self, now: Instant) -> bool {
        self.publish_due.iter().flatten().any(|&due| due <= now)
    }

    /// Publisher lag: messages `seqs` of `plan`'s step were written by `now`; those due
    /// in the measured window are counted.
    fn publish_lag(&mut self, plan: &Plan, (from, to): (u64, u64), now: Instant) {
        let stats = self.stats_for(plan.step);
        for seq in from..to {
            let due = plan.due_at(seq);
            if due >= plan.warm_end && due < plan.end {
                stats::record(&mut stats.publish_lag, now.saturating_duration_since(due));
            }
        }
    }

    /// The step's counts, with the messages each subscriber is missing.
    fn collect(&mut self, plan: &Plan, published: &[u64]) -> Collected {
        let mut lost = 0;
        for (i, track) in self.tracks.iter().enumerate() {
            let (sub, publisher) = (i / self.pubs, i % self.pubs);
            if self.subs[sub].room != self.pub_rooms[publisher] {
                continue;
            }
            let sent = published.get(publisher).copied().unwrap_or(0);
            lost += track.missing(plan.step, sent);
        }
        let mut stats = std::mem::replace(self.stats_for(plan.step), StepStats::new());
        stats.lost = lost;
        Collected {
            stats,
            failures: self.errors.values().sum(),
        }
    }

    pub(super) fn fail(&mut self, cause: String) {
        stats::count(&mut self.errors, cause, 1);
    }
}

/// One load generator thread: its runtime, its share of the connections.
pub(super) struct Job {
    pub(super) thread: usize,
    pub(super) threads: usize,
    pub(super) options: BroadcastOptions,
    /// Who connects where.
    pub(super) layout: Arc<Layout>,
    pub(super) shared: Arc<Shared>,
    pub(super) phase: watch::Receiver<Phase>,
}

/// A connection's part.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Subscriber with this index among the thread's subscribers.
    Subscriber(usize),
    /// Publisher with this id.
    Publisher(u32),
}

impl Job {
    pub(super) fn run(
        self,
        ready: mpsc::Sender<BTreeMap<String, u64>>,
        collect: mpsc::Sender<Collected>,
    ) -> ThreadEnd {
        let mut failures = BTreeMap::new();
        let runtime = match new_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                failures.insert(format!("cannot start a runtime: {e}"), 1);
                let _ = ready.send(failures);
                return ThreadEnd::default();
            }
        };
        let local = LocalSet::new();
        let opened = local.block_on(&runtime, self.open_all());
        let mut clients = Vec::with_capacity(opened.len());
        for (role, result) in opened {
            match result {
                Ok(client) => clients.push((role, client)),
                Err(cause) => stats::count(&mut failures, cause, 1),
            }
        }
        let _ = ready.send(failures);
        local.block_on(&runtime, self.run_all(clients, collect))
    }

    /// Subscribers are connections `0..subs`, publishers `subs..subs + pubs`; this
    /// thread has every `threads`-th one.
    fn roles(&self) -> impl Iterator<Item = (usize, Role)> + use<> {
        let subs = self.options.subs;
        let mut local_subs = 0;
        (self.thread..subs + self.options.pubs)
            .step_by(self.threads)
            .map(move |index| {
                let role = if index < subs {
                    local_subs += 1;
                    Role::Subscriber(local_subs - 1)
                } else {
                    Role::Publisher((index - subs) as u32)
                };
                (index, role)
            })
    }

    /// Opens this thread's connections, at most 256 handshakes at a time.
    async fn open_all(&self) -> Vec<(Role, Result<Client, String>)> {
        let permits = Rc::new(Semaphore::new(256));
        let timeout = self.options.common.timeout();
        let handles: Vec<_> = self
            .roles()
            .map(|(index, role)| {
                // With --v1, subscribers subscribe over ringsocket.v1 once open.
                let (target, v1_topic) = match role {
                    Role::Subscriber(_) => (
                        self.layout.sub_target(index).clone(),
                        self.options
                            .v1
                            .then(|| self.layout.topic(self.layout.sub_room(index)).to_owned()),
                    ),
                    Role::Publisher(p) => (self.layout.pub_target(p as usize).clone(), None),
                };
                let permits = permits.clone();
                let source = target.source_for(index, self.options.common.source_addrs);
                let deflate = self.options.common.deflate;
                let task = tokio::task::spawn_local(async move {
                    let _permit = permits.acquire().await;
                    let protocol = v1_topic.as_ref().map(|_| v1::PROTOCOL);
                    let mut client = client::open_with_protocol(
                        &target, None, deflate, protocol, source, timeout,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    if let Some(topic) = v1_topic {
                        match tokio::time::timeout(timeout, v1::subscribe(&mut client, &topic))
                            .await
                        {
                            Ok(result) => result?,
                            Err(_) => {
                                return Err(format!(
                                    "no \"subscribed\" reply within {:.1} s",
                                    timeout.as_secs_f64()
                                ));
                            }
                        }
                    }
                    Ok(client)
                });
                (role, task)
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for (role, handle) in handles {
            let result = handle
                .await
                .unwrap_or_else(|e| Err(format!("connection task failed: {e}")));
            out.push((role, result));
        }
        out
    }

    async fn run_all(
        &self,
        clients: Vec<(Role, Client)>,
        collect: mpsc::Sender<Collected>,
    ) -> ThreadEnd {
        // Every subscriber of the thread, opened or not, keeps its index.
        let sub_indices: Vec<usize> = self
            .roles()
            .filter(|(_, role)| matches!(role, Role::Subscriber(_)))
            .map(|(index, _)| index)
            .collect();
        let subs = sub_indices.len();
        let format = Rc::new(Format::new(self.options.size, self.options.payload));
        let v1_topics = self.options.v1.then(|| {
            (0..self.options.rooms)
                .map(|r| self.layout.topic(r).to_owned())
                .collect()
        });
        let state = Rc::new(RefCell::new(ThreadState::new(
            &sub_indices,
            self.options.pubs,
            format.clone(),
            v1_topics,
            &self.layout,
        )));
        let mut subscribers = Vec::with_capacity(subs);
        let mut handles = Vec::with_capacity(self.options.pubs + 1);
        for (role, client) in clients {
            match role {
                Role::Subscriber(sub) => subscribers.push((sub, client)),
                Role::Publisher(id) => handles.push(tokio::task::spawn_local(publish(
                    client,
                    id,
                    format.clone(),
                    state.clone(),
                    self.shared.clone(),
                    self.phase.clone(),
                ))),
            }
        }
        handles.push(tokio::task::spawn_local(super::subs::run(
            subscribers,
            state.clone(),
            self.shared.clone(),
            self.phase.clone(),
        )));
        let mut phase = self.phase.clone();
        loop {
            let current = phase.borrow_and_update().clone();
            match current {
                Phase::Collect { plan, published } => {
                    let collected = state.borrow_mut().collect(&plan, &published);
                    let _ = collect.send(collected);
                }
                Phase::Stop => break,
                Phase::Idle | Phase::Probe | Phase::Step(_) => {}
            }
            if phase.changed().await.is_err() {
                break;
            }
        }
        for handle in handles {
            if let Err(e) = handle.await {
                state
                    .borrow_mut()
                    .fail(format!("connection task failed: {e}"));
            }
        }
        let mut state = state.borrow_mut();
        ThreadEnd {
            errors: std::mem::take(&mut state.errors),
            close_failures: state.close_failures,
        }
    }
}

/// Accounts for every message a subscriber's last read completed. `Err(cause)`: the
/// connection failed.
pub(super) fn receive(
    conn: &mut crate::proto::Connection,
    sub: usize,
    state: &RefCell<ThreadState>,
    shared: &Shared,
    phase: &Phase,
) -> Result<(), String> {
    let now = Instant::now();
    let mut state = state.borrow_mut();
    let (mut received, mut delivered) = (0, 0);
    let result = loop {
        let payload = match conn.poll_event() {
            Ok(Some(Event::Binary(bytes))) => bytes,
            Ok(Some(Event::Text(text))) => text.into_bytes(),
            Ok(Some(Event::Close(frame))) => break Err(closed_by_server(frame)),
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("protocol error from the server: {e}")),
        };
        received += 1;
        if state.receive(sub, &payload, now, phase, shared) {
            delivered += 1;
        }
    };
    shared.received.fetch_add(received, Ordering::Relaxed);
    shared.delivered.fetch_add(delivered, Ordering::Relaxed);
    result
}

pub(super) fn closed_by_server(frame: Option<crate::proto::CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => {
            format!("closed early by the server with {}", frame.code)
        }
        Some(frame) => format!(
            "closed early by the server with {} ({})",
            frame.code, frame.reason
        ),
        None => "closed early by the server with no status (1005)".to_owned(),
    }
}

/// A publisher: sends probes, then each step's messages on schedule, while reading
/// (and discarding) what the room sends it.
async fn publish(
    client: Client,
    id: u32,
    format: Rc<Format>,
    state: Rc<RefCell<ThreadState>>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    let Client { stream, conn } = client;
    // `broadcast` refuses TLS before opening anything, so a publisher is plain TCP.
    let mut stream = match stream.into_plain() {
        Ok(stream) => stream,
        Err(e) => {
            state.borrow_mut().fail(format!("publisher: {e}"));
            return;
        }
    };
    let conn = RefCell::new(conn);
    let wake = Notify::new();
    let stopping = Cell::new(false);
    let (mut rd, mut wr) = stream.split();
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) => {
                    return Some("closed by the server without a close frame (1006)".to_owned());
                }
                Ok(n) => n,
                Err(e) => return Some(format!("read failed: {e}")),
            };
            let mut conn = conn.borrow_mut();
            conn.handle_bytes(&buf[..n]);
            loop {
                match conn.poll_event() {
                    Ok(Some(Event::Close(frame))) => return Some(closed_by_server(frame)),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Some(format!("protocol error from the server: {e}")),
                }
            }
            if conn.pending_output() > 0 {
                wake.notify_one();
            }
        }
    };
    let writer = async {
        let mut phase = phase;
        let mut chunks = Vec::new();
        let mut probe_seq = 0u64;
        let mut step_sent: Option<(u32, u64)> = None;
        let mut done_step = None;
        loop {
            let current = phase.borrow_and_update().clone();
            let mut written = None;
            let mut next_wake = None;
            let mut write_deadline = None;
            match &current {
                Phase::Idle | Phase::Collect { .. } => {}
                Phase::Stop => {
                    stopping.set(true);
                    let _ = conn.borrow_mut().close(CloseCode::Normal, "");
                    conn.borrow_mut().drain_transmit(&mut chunks);
                    for chunk in chunks.drain(..) {
                        let _ = wr.write_all(&chunk).await;
                    }
                    return None;
                }
                Phase::Probe => {
                    let header = Header {
                        publisher: id,
                        step: 0,
                        seq: probe_seq,
                        sent_ns: shared.nanos_since_base(Instant::now()),
                    };
                    probe_seq += 1;
                    if let Err(e) = format.send(&mut conn.borrow_mut(), &header) {
                        return Some(format!("cannot send: {e}"));
                    }
                    next_wake = Some(Instant::now() + Duration::from_millis(20));
                }
                Phase::Step(plan) => {
                    let sent = match step_sent {
                        Some((step, sent)) if step == plan.step => sent,
                        _ => 0,
                    };
                    let due = plan.due(Instant::now());
                    {
                        let mut conn = conn.borrow_mut();
                        for seq in sent..due {
                            let header = Header {
                                publisher: id,
                                step: plan.step,
                                seq,
                                sent_ns: shared.nanos_since_base(plan.due_at(seq)),
                            };
                            if let Err(e) = format.send(&mut conn, &header) {
                                return Some(format!("cannot send: {e}"));
                            }
                        }
                    }
                    if due > sent {
                        written = Some((sent, due));
                    }
                    step_sent = Some((plan.step, due));
                    write_deadline = Some(plan.end + plan.grace);
                    if due < plan.total() {
                        next_wake = Some(plan.due_at(due));
                    }
                }
            }
            conn.borrow_mut().drain_transmit(&mut chunks);
            for chunk in chunks.drain(..) {
                let write = wr.write_all(&chunk);
                let written = match write_deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline.into(), write).await {
                        Ok(result) => result,
                        Err(_) => {
                            return Some(
                                "a publisher's write was still blocked at the end of the \
                                     grace period: the server stopped reading"
                                    .to_owned(),
                            );
                        }
                    },
                    None => write.await,
                };
                if let Err(e) = written {
                    return Some(format!("write failed: {e}"));
                }
            }
            if let (Phase::Step(plan), Some(seqs)) = (&current, written) {
                state.borrow_mut().publish_lag(plan, seqs, Instant::now());
            }
            if let (Phase::Step(plan), Some((step, sent))) = (&current, step_sent) {
                shared.published[id as usize].store(sent, Ordering::Relaxed);
                if sent == plan.total() && done_step != Some(step) {
                    done_step = Some(step);
                    shared.pubs_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(due) = state.borrow_mut().publish_due.get_mut(id as usize) {
                *due = next_wake;
            }
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = wake.notified() => {}
                () = sleep_until(next_wake) => {}
            }
        }
    };
    let failure = tokio::select! {
        failure = reader => failure,
        failure = writer => failure,
    };
    // An ended publisher has nothing due: the subscribers' task stops yielding for it.
    if let Some(due) = state.borrow_mut().publish_due.get_mut(id as usize) {
        *due = None;
    }
    // A reader that ends because the bench is stopping is not a failure.
    if let Some(cause) = failure.filter(|_| !stopping.get()) {
        state.borrow_mut().fail(cause);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
