//! A connection's timers as sans-IO policy: heartbeat pings, the pong timeout, the idle
//! timeout and the close timeout.
//!
//! [`ConnTimers`] is told what happened and when (`now` is handed in; nothing here reads
//! a clock, owns a timer or touches a socket) and answers with what is due
//! ([`TimerAction`]) and when it next needs asking ([`ConnTimers::poll_timeout`]). The
//! durations come from a [`TimerPolicy`], one per core, passed in on the calls that need
//! them, so that a connection keeps two instants and a byte of flags.

use std::time::{Duration, Instant};

use crate::config::Config;

/// The least time after which a rule that has just fired is looked at again.
const REARM: Duration = Duration::from_millis(1);

/// The timeouts of a core's connections: built once from the [`Config`], passed to
/// every [`ConnTimers`] call that needs a duration (connections keep no copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimerPolicy {
    /// Silence (nothing read) after which the peer is pinged.
    pub(crate) ping_interval: Duration,
    /// How long a ping may go unanswered (at least 1 ms is allowed), and how long the
    /// peer has to answer our Close outside a shutdown.
    pub(crate) pong_timeout: Duration,
    /// Time without a data message after which the connection is closed; `None`: never.
    pub(crate) idle_timeout: Option<Duration>,
    /// How long the peer has to answer our Close once the server is shutting down.
    pub(crate) shutdown_timeout: Duration,
}

impl TimerPolicy {
    /// The policy `config` sets.
    pub(crate) fn from_config(config: &Config) -> Self {
        Self {
            ping_interval: config.ping_interval(),
            pong_timeout: config.pong_timeout(),
            idle_timeout: config.idle_timeout(),
            shutdown_timeout: config.shutdown_timeout(),
        }
    }

    /// How long the peer has to answer our Close.
    fn close_timeout(&self, shutdown: bool) -> Duration {
        if shutdown {
            self.shutdown_timeout
        } else {
            self.pong_timeout
        }
    }

    /// How long a ping may go unanswered: `pong_timeout`, at least [`REARM`].
    fn pong_window(&self) -> Duration {
        self.pong_timeout.max(REARM)
    }
}

/// What a timeout calls for. The caller does it; [`ConnTimers`] has already counted it
/// done (a ping as sent, an ended connection as ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerAction {
    /// Ping the peer. The ping is outstanding from now on, whether or not it could be
    /// queued.
    SendPing,
    /// Close with 1001 "idle timeout", then report it with
    /// [`ConnTimers::handle_close_sent`]. Until that call it is asked for again, 1 ms
    /// later at the earliest.
    CloseIdle,
    /// A ping went unanswered for `pong_timeout`: end the connection
    /// (`Disconnect::Timeout`, `CloseReason::PongTimeout`). Nothing is due after it.
    PongTimedOut,
    /// The peer did not answer our Close in time: end the connection, reporting what
    /// the Close was for. Nothing is due after it.
    CloseTimedOut,
}

impl TimerAction {
    /// Every action, in the order they are taken.
    const IN_ORDER: [Self; 4] = [
        Self::CloseTimedOut,
        Self::PongTimedOut,
        Self::SendPing,
        Self::CloseIdle,
    ];

    fn bit(self) -> u8 {
        match self {
            Self::CloseTimedOut => 1,
            Self::PongTimedOut => 2,
            Self::SendPing => 4,
            Self::CloseIdle => 8,
        }
    }
}

/// The actions one [`ConnTimers::handle_timeout`] call found due; iterating yields them
/// in the order to take them. Either one that ends the connection
/// ([`TimerAction::CloseTimedOut`] or [`TimerAction::PongTimedOut`]) alone, or any of
/// [`TimerAction::SendPing`] then [`TimerAction::CloseIdle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TimerActions(u8);

impl TimerActions {
    /// Whether `action` is among them.
    pub(crate) fn contains(self, action: TimerAction) -> bool {
        self.0 & action.bit() != 0
    }

    fn only(action: TimerAction) -> Self {
        Self(action.bit())
    }

    fn push(&mut self, action: TimerAction) {
        self.0 |= action.bit();
    }
}

impl Iterator for TimerActions {
    type Item = TimerAction;

    fn next(&mut self) -> Option<TimerAction> {
        let action = TimerAction::IN_ORDER
            .into_iter()
            .find(|action| self.contains(*action))?;
        self.0 &= !action.bit();
        Some(action)
    }
}

/// A ping was sent and nothing has been read since.
const PING_OUTSTANDING: u8 = 1;
/// Our Close was sent.
const CLOSING: u8 = 2;
/// The server is shutting down.
const SHUTDOWN: u8 = 4;
/// A timeout ended the connection.
const ENDED: u8 = 8;

/// One connection's timers: when to ping, when a ping or our Close has gone unanswered
/// too long, when the connection has been idle too long.
///
/// # Call order
///
/// ```text
///   ConnTimers::new(now)                  the connection is open
///   handle_bytes_received(now)  ─┐        something was read: the peer is alive
///   handle_message(now)          │ any    a data message was delivered
///   handle_close_sent(now)       │ order  our Close was queued
///   handle_shutdown()            │        the server is shutting down
///   poll_timeout(&policy)       ◄┘        arm the timer for this instant
///   handle_timeout(now, &policy)          the timer fired: take the actions
///   poll_timeout(&policy)                 re-arm: later than `now`, or `None`
/// ```
///
/// `now` never goes back between calls. Every `handle_*` call may change
/// [`ConnTimers::poll_timeout`]; a caller that re-arms only after some of them (the
/// driver re-arms after `handle_close_sent` and `handle_timeout`) is woken at the
/// instant it armed, and [`ConnTimers::handle_timeout`] then returns whatever became
/// due before it.
///
/// # Rules
///
/// [`ConnTimers::handle_timeout`] applies them in this order:
///
/// 1. Our Close unanswered for `pong_timeout` (`shutdown_timeout` once
///    [`ConnTimers::handle_shutdown`] was called, even if that came after the Close):
///    [`TimerAction::CloseTimedOut`].
/// 2. A ping unanswered (nothing read since) for `pong_timeout`, closing or not:
///    [`TimerAction::PongTimedOut`].
/// 3. Nothing read for `ping_interval`, no ping outstanding and not closing:
///    [`TimerAction::SendPing`].
/// 4. No data message for `idle_timeout` (bytes and pings do not count), if set, and not
///    closing: [`TimerAction::CloseIdle`].
///
/// The first two end the connection: nothing is due after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnTimers {
    /// When something was last read; while a ping is outstanding, when it was sent.
    heartbeat: Instant,
    /// Until our Close is sent, when the idle clock started (the last data message, or
    /// the opening); from then on, when our Close was sent.
    mark: Instant,
    /// [`PING_OUTSTANDING`], [`CLOSING`], [`SHUTDOWN`], [`ENDED`].
    flags: u8,
}

impl ConnTimers {
    /// The timers of a connection opened at `now`: silent and idle since `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            heartbeat: now,
            mark: now,
            flags: 0,
        }
    }

    /// Something was read at `now`: the silence before a ping starts again, and an
    /// outstanding ping counts as answered.
    pub(crate) fn handle_bytes_received(&mut self, now: Instant) {
        self.heartbeat = now;
        self.flags &= !PING_OUTSTANDING;
    }

    /// A data message was delivered at `now`: the idle clock starts again. Ignored once
    /// our Close is sent (the idle timeout no longer applies).
    pub(crate) fn handle_message(&mut self, now: Instant) {
        if !self.has(CLOSING) {
            self.mark = now;
        }
    }

    /// Our Close was sent at `now`: the peer has the close timeout to answer, and no
    /// ping or idle close follows. Only the first call counts.
    pub(crate) fn handle_close_sent(&mut self, now: Instant) {
        if !self.has(CLOSING) {
            self.mark = now;
            self.flags |= CLOSING;
        }
    }

    /// The server is shutting down: our Close, sent or to come, is answered within
    /// `shutdown_timeout` instead of `pong_timeout`.
    pub(crate) fn handle_shutdown(&mut self) {
        self.flags |= SHUTDOWN;
    }

    /// Whether [`ConnTimers::handle_shutdown`] was called.
    pub(crate) fn shutdown_seen(&self) -> bool {
        self.has(SHUTDOWN)
    }

    /// The timer fired at `now` (at or after [`ConnTimers::poll_timeout`], or earlier:
    /// then nothing is due): applies the rules (see the type's docs) and returns what is
    /// due. Afterwards [`ConnTimers::poll_timeout`] is later than `now`, or `None` once a
    /// timeout has ended the connection.
    pub(crate) fn handle_timeout(&mut self, now: Instant, policy: &TimerPolicy) -> TimerActions {
        let due = |deadline: Option<Instant>| deadline.is_some_and(|d| d <= now);
        if due(self.close_deadline(policy)) {
            self.flags |= ENDED;
            return TimerActions::only(TimerAction::CloseTimedOut);
        }
        if due(self.pong_deadline(policy)) {
            self.flags |= ENDED;
            return TimerActions::only(TimerAction::PongTimedOut);
        }
        let mut actions = TimerActions::default();
        if due(self.ping_deadline(policy)) {
            self.heartbeat = now;
            self.flags |= PING_OUTSTANDING;
            actions.push(TimerAction::SendPing);
        }
        if let Some(idle) = policy
            .idle_timeout
            .filter(|_| due(self.idle_deadline(policy)))
        {
            // Asked again in REARM unless a Close is sent (or a message arrives) first:
            // the idle clock is moved to have started `idle` before `now + REARM`.
            self.mark = now
                .checked_add(REARM)
                .and_then(|t| t.checked_sub(idle))
                .unwrap_or(now);
            actions.push(TimerAction::CloseIdle);
        }
        actions
    }

    /// The earliest instant at which [`ConnTimers::handle_timeout`] has something to
    /// do; `None` once a timeout has ended the connection.
    pub(crate) fn poll_timeout(&self, policy: &TimerPolicy) -> Option<Instant> {
        [
            self.close_deadline(policy),
            self.pong_deadline(policy),
            self.ping_deadline(policy),
            self.idle_deadline(policy),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether a rule can still fire: not once the connection ended.
    fn live(&self) -> bool {
        !self.has(ENDED)
    }

    /// Rule 1: when our Close will have gone unanswered too long.
    fn close_deadline(&self, policy: &TimerPolicy) -> Option<Instant> {
        if !self.live() || !self.has(CLOSING) {
            return None;
        }
        let timeout = policy.close_timeout(self.has(SHUTDOWN));
        self.mark.checked_add(timeout)
    }

    /// Rule 2: when the outstanding ping will have gone unanswered too long.
    fn pong_deadline(&self, policy: &TimerPolicy) -> Option<Instant> {
        if !self.live() || !self.has(PING_OUTSTANDING) {
            return None;
        }
        self.heartbeat.checked_add(policy.pong_window())
    }

    /// Rule 3: when the next ping is due.
    fn ping_deadline(&self, policy: &TimerPolicy) -> Option<Instant> {
        if !self.live() || self.has(PING_OUTSTANDING) || self.has(CLOSING) {
            return None;
        }
        self.heartbeat.checked_add(policy.ping_interval)
    }

    /// Rule 4: when the connection will have been idle too long.
    fn idle_deadline(&self, policy: &TimerPolicy) -> Option<Instant> {
        if !self.live() || self.has(CLOSING) {
            return None;
        }
        self.mark.checked_add(policy.idle_timeout?)
    }
}

#[cfg(test)]
mod tests {
    use super::TimerAction::{CloseIdle, CloseTimedOut, PongTimedOut, SendPing};
    use super::*;
    use proptest::prelude::*;

    /// A virtual clock: instants `ms` milliseconds after a fixed base.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }

        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }

        fn at_us(&self, us: u64) -> Instant {
            self.0 + Duration::from_micros(us)
        }
    }

    fn policy(ping: u64, pong: u64, idle: Option<u64>, shutdown: u64) -> TimerPolicy {
        TimerPolicy {
            ping_interval: Duration::from_millis(ping),
            pong_timeout: Duration::from_millis(pong),
            idle_timeout: idle.map(Duration::from_millis),
            shutdown_timeout: Duration::from_millis(shutdown),
        }
    }

    fn actions(timers: &mut ConnTimers, now: Instant, policy: &TimerPolicy) -> Vec<TimerAction> {
        timers.handle_timeout(now, policy).collect()
    }

    #[test]
    fn pings_after_an_interval_of_silence() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(100)));
        assert_eq!(actions(&mut timers, clock.at(99), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        // The ping is outstanding: next comes its pong deadline.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(150)));
    }

    #[test]
    fn bytes_received_restart_the_silence_and_answer_a_ping() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_bytes_received(clock.at(60));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(160)));
        assert_eq!(actions(&mut timers, clock.at(100), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(160), &policy), [SendPing]);
        // Anything read answers the ping: no pong timeout, the silence starts again.
        timers.handle_bytes_received(clock.at(170));
        assert_eq!(actions(&mut timers, clock.at(210), &policy), []);
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(270)));
        assert_eq!(actions(&mut timers, clock.at(270), &policy), [SendPing]);
    }

    #[test]
    fn an_unanswered_ping_times_out_after_pong_timeout_and_ends_the_timers() {
        let clock = Clock::new();
        let policy = policy(100, 50, Some(120), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        // Meanwhile the idle close came due (and is asked again until a Close is sent).
        assert_eq!(actions(&mut timers, clock.at(120), &policy), [CloseIdle]);
        assert_eq!(actions(&mut timers, clock.at(149), &policy), [CloseIdle]);
        assert_eq!(actions(&mut timers, clock.at(150), &policy), [PongTimedOut]);
        assert_eq!(timers.poll_timeout(&policy), None);
        assert_eq!(actions(&mut timers, clock.at(10_000), &policy), []);
    }

    #[test]
    fn no_second_ping_while_one_is_outstanding() {
        let clock = Clock::new();
        let policy = policy(100, 500, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        for ms in [200, 300, 450, 599] {
            assert_eq!(
                actions(&mut timers, clock.at(ms), &policy),
                [],
                "at {ms} ms"
            );
        }
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(600)));
    }

    #[test]
    fn idle_close_comes_after_idle_timeout_without_data_messages() {
        let clock = Clock::new();
        let policy = policy(100, 1000, Some(250), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        // Pings answered and other bytes read do not count as messages.
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        timers.handle_bytes_received(clock.at(110));
        assert_eq!(actions(&mut timers, clock.at(210), &policy), [SendPing]);
        timers.handle_bytes_received(clock.at(240));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(250)));
        assert_eq!(actions(&mut timers, clock.at(250), &policy), [CloseIdle]);
    }

    #[test]
    fn a_data_message_restarts_the_idle_clock() {
        let clock = Clock::new();
        let policy = policy(1000, 1000, Some(250), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_message(clock.at(200));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(450)));
        assert_eq!(actions(&mut timers, clock.at(250), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(449), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(450), &policy), [CloseIdle]);
    }

    #[test]
    fn no_idle_close_when_the_idle_timeout_is_disabled() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        let mut now = 0;
        for _ in 0..100 {
            let next = timers.poll_timeout(&policy).expect("a ping is always due");
            assert_eq!(next, clock.at(now + 100), "only pings are due");
            now += 100;
            assert_eq!(actions(&mut timers, clock.at(now), &policy), [SendPing]);
            timers.handle_bytes_received(clock.at(now));
        }
    }

    #[test]
    fn a_ping_and_an_idle_close_due_together_come_ping_first() {
        let clock = Clock::new();
        let policy = policy(100, 50, Some(100), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(
            actions(&mut timers, clock.at(100), &policy),
            [SendPing, CloseIdle]
        );
    }

    #[test]
    fn our_close_is_answered_within_pong_timeout() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_close_sent(clock.at(10));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(60)));
        assert_eq!(actions(&mut timers, clock.at(59), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(60), &policy), [CloseTimedOut]);
        assert_eq!(timers.poll_timeout(&policy), None);
        assert_eq!(actions(&mut timers, clock.at(10_000), &policy), []);
    }

    #[test]
    fn our_close_is_answered_within_shutdown_timeout_during_shutdown() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_shutdown();
        assert!(timers.shutdown_seen());
        timers.handle_close_sent(clock.at(10));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(40)));
        assert_eq!(actions(&mut timers, clock.at(39), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(40), &policy), [CloseTimedOut]);

        // A shutdown that comes while our Close is out switches it to shutdown_timeout.
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_close_sent(clock.at(10));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(60)));
        timers.handle_shutdown();
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(40)));
        // A second Close (the shutdown's) does not restart the clock.
        timers.handle_close_sent(clock.at(20));
        assert_eq!(actions(&mut timers, clock.at(40), &policy), [CloseTimedOut]);
    }

    #[test]
    fn no_ping_or_idle_close_while_closing() {
        let clock = Clock::new();
        let policy = policy(100, 1000, Some(150), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        timers.handle_close_sent(clock.at(10));
        timers.handle_message(clock.at(20));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(1010)));
        for ms in [100, 150, 200, 500, 1009] {
            assert_eq!(
                actions(&mut timers, clock.at(ms), &policy),
                [],
                "at {ms} ms"
            );
        }
        assert_eq!(
            actions(&mut timers, clock.at(1010), &policy),
            [CloseTimedOut]
        );
    }

    #[test]
    fn a_ping_outstanding_when_closing_still_times_out() {
        let clock = Clock::new();
        let policy = policy(100, 50, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        timers.handle_close_sent(clock.at(120));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(150)));
        assert_eq!(actions(&mut timers, clock.at(150), &policy), [PongTimedOut]);
    }

    #[test]
    fn poll_timeout_is_the_earliest_pending_deadline() {
        let clock = Clock::new();
        let policy = policy(100, 40, Some(130), 500);
        let mut timers = ConnTimers::new(clock.at(0));
        // Ping at 100, idle at 130.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(100)));
        timers.handle_bytes_received(clock.at(50));
        // Ping at 150, idle at 130.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(130)));
        timers.handle_message(clock.at(60));
        // Ping at 150, idle at 190.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(150)));
        assert_eq!(actions(&mut timers, clock.at(150), &policy), [SendPing]);
        // Pong at 190, idle at 190.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(190)));
        timers.handle_message(clock.at(170));
        // Pong at 190, idle at 300.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(190)));
        timers.handle_bytes_received(clock.at(180));
        // Ping at 280, idle at 300.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(280)));
        timers.handle_close_sent(clock.at(200));
        // Only the close: pong_timeout after it.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(240)));
        timers.handle_shutdown();
        // Then shutdown_timeout after it.
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(700)));
    }

    #[test]
    fn a_rule_that_fired_is_rearmed_ahead_never_in_the_past() {
        let clock = Clock::new();
        // An idle close that could not be sent is asked for again 1 ms later.
        let policy = policy(1000, 1000, Some(100), 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(actions(&mut timers, clock.at(105), &policy), [CloseIdle]);
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(106)));
        assert_eq!(actions(&mut timers, clock.at_us(105_999), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(106), &policy), [CloseIdle]);
        timers.handle_close_sent(clock.at(106));
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(1106)));

        // A ping is given at least 1 ms, whatever pong_timeout says.
        let policy = self::policy(100, 0, None, 30);
        let mut timers = ConnTimers::new(clock.at(0));
        assert_eq!(actions(&mut timers, clock.at(100), &policy), [SendPing]);
        assert_eq!(timers.poll_timeout(&policy), Some(clock.at(101)));
        assert_eq!(actions(&mut timers, clock.at_us(100_999), &policy), []);
        assert_eq!(actions(&mut timers, clock.at(101), &policy), [PongTimedOut]);
    }

    #[test]
    fn actions_iterate_in_the_order_to_take_them() {
        assert_eq!(TimerActions::default().next(), None);
        let mut all = TimerActions::default();
        for action in [CloseIdle, SendPing, PongTimedOut, CloseTimedOut] {
            all.push(action);
        }
        assert!(all.contains(SendPing) && all.contains(CloseIdle));
        assert_eq!(
            all.collect::<Vec<_>>(),
            [CloseTimedOut, PongTimedOut, SendPing, CloseIdle]
        );
    }

    /// An input, `dt` after the one before.
    #[derive(Debug, Clone)]
    enum Input {
        Bytes,
        Message,
        CloseSent,
        Shutdown,
        /// The timer fires; `close_ok`: whether an idle close is sent.
        Timeout {
            close_ok: bool,
        },
    }

    fn inputs(dt: std::ops::Range<u64>) -> impl Strategy<Value = Vec<(u64, Input)>> {
        let input = prop_oneof![
            3 => Just(Input::Bytes),
            2 => Just(Input::Message),
            1 => Just(Input::CloseSent),
            1 => Just(Input::Shutdown),
            6 => any::<bool>().prop_map(|close_ok| Input::Timeout { close_ok }),
        ];
        proptest::collection::vec((dt, input), 0..80)
    }

    /// The rules as the connection driver applied them before this module, on its own
    /// fields (`last_rx`, `last_message`, `ping_sent`, `closing`, `shutdown_seen`).
    struct FormerDriver {
        last_rx: Instant,
        last_message: Instant,
        ping_sent: Option<Instant>,
        closing_since: Option<Instant>,
        shutdown_seen: bool,
    }

    impl FormerDriver {
        fn new(now: Instant) -> Self {
            Self {
                last_rx: now,
                last_message: now,
                ping_sent: None,
                closing_since: None,
                shutdown_seen: false,
            }
        }

        fn on_timer(&mut self, now: Instant, policy: &TimerPolicy) -> Vec<TimerAction> {
            if let Some(since) = self.closing_since {
                let limit = if self.shutdown_seen {
                    policy.shutdown_timeout
                } else {
                    policy.pong_timeout
                };
                if now >= since + limit {
                    return vec![CloseTimedOut];
                }
            }
            let mut out = Vec::new();
            if let Some(sent) = self.ping_sent {
                if now >= sent + policy.pong_timeout {
                    return vec![PongTimedOut];
                }
            } else if now >= self.last_rx + policy.ping_interval && self.closing_since.is_none() {
                self.ping_sent = Some(now);
                out.push(SendPing);
            }
            if let Some(idle) = policy.idle_timeout {
                if now >= self.last_message + idle && self.closing_since.is_none() {
                    out.push(CloseIdle);
                }
            }
            out
        }
    }

    fn arbitrary_policy() -> impl Strategy<Value = TimerPolicy> {
        let us = |max: u64| (0..max).prop_map(Duration::from_micros);
        (
            us(300_000),
            us(300_000),
            proptest::option::of(us(300_000)),
            us(300_000),
        )
            .prop_map(
                |(ping_interval, pong_timeout, idle_timeout, shutdown_timeout)| TimerPolicy {
                    ping_interval,
                    pong_timeout,
                    idle_timeout,
                    shutdown_timeout,
                },
            )
    }

    /// What `Config::validate` allows, in whole milliseconds: positive ping interval
    /// and pong timeout.
    fn config_policy() -> impl Strategy<Value = TimerPolicy> {
        (
            1..300u64,
            1..300u64,
            proptest::option::of(1..300u64),
            0..300u64,
        )
            .prop_map(|(ping, pong, idle, shutdown)| policy(ping, pong, idle, shutdown))
    }

    proptest! {
        /// `handle_timeout` acts exactly when `poll_timeout` has come, leaves the next
        /// one later than `now`, and ends for good after a timeout that ends the
        /// connection.
        #[test]
        fn timers_act_exactly_when_poll_timeout_says(
            policy in arbitrary_policy(),
            inputs in inputs(0..60_000),
        ) {
            let clock = Clock::new();
            let mut now = 0;
            let mut timers = ConnTimers::new(clock.at_us(now));
            let mut closed = false;
            let mut ended = false;
            for (dt, input) in inputs {
                now += dt;
                let t = clock.at_us(now);
                match input {
                    Input::Bytes => timers.handle_bytes_received(t),
                    Input::Message => timers.handle_message(t),
                    Input::CloseSent => {
                        timers.handle_close_sent(t);
                        closed = true;
                    }
                    Input::Shutdown => timers.handle_shutdown(),
                    Input::Timeout { close_ok } => {
                        let due = timers.poll_timeout(&policy).is_some_and(|d| d <= t);
                        let list: Vec<_> = timers.handle_timeout(t, &policy).collect();
                        prop_assert_eq!(!list.is_empty(), due, "{:?} at {} us", list, now);
                        if ended {
                            prop_assert!(list.is_empty());
                            prop_assert_eq!(timers.poll_timeout(&policy), None);
                            continue;
                        }
                        if list.contains(&CloseTimedOut) || list.contains(&PongTimedOut) {
                            prop_assert_eq!(list.len(), 1, "{:?}", list);
                            prop_assert_eq!(timers.poll_timeout(&policy), None);
                            ended = true;
                        } else {
                            let next = timers.poll_timeout(&policy);
                            prop_assert!(next.is_some_and(|d| d > t), "re-armed at {:?}", next);
                        }
                        if closed {
                            prop_assert!(!list.contains(&SendPing) && !list.contains(&CloseIdle));
                        }
                        if list.contains(&CloseIdle) && close_ok {
                            timers.handle_close_sent(t);
                            closed = true;
                        }
                    }
                }
            }
        }

        /// With the durations `Config::validate` allows and the timer firing at least
        /// 1 ms apart (the driver re-arms at least that far ahead), the rules act as the
        /// driver's own did before they moved here.
        #[test]
        fn timers_act_as_the_former_driver_rules(
            policy in config_policy(),
            inputs in inputs(0..50),
        ) {
            let clock = Clock::new();
            let mut now = 0;
            let mut timers = ConnTimers::new(clock.at(now));
            let mut former = FormerDriver::new(clock.at(now));
            for (dt, input) in inputs {
                now += dt;
                if matches!(input, Input::Timeout { .. }) {
                    now += 1;
                }
                let t = clock.at(now);
                match input {
                    Input::Bytes => {
                        timers.handle_bytes_received(t);
                        former.last_rx = t;
                        former.ping_sent = None;
                    }
                    Input::Message => {
                        timers.handle_message(t);
                        former.last_message = t;
                    }
                    Input::CloseSent => {
                        timers.handle_close_sent(t);
                        former.closing_since.get_or_insert(t);
                    }
                    Input::Shutdown => {
                        timers.handle_shutdown();
                        former.shutdown_seen = true;
                    }
                    Input::Timeout { close_ok } => {
                        let ours: Vec<_> = timers.handle_timeout(t, &policy).collect();
                        let theirs = former.on_timer(t, &policy);
                        prop_assert_eq!(&ours, &theirs, "at {} ms", now);
                        if ours.contains(&CloseTimedOut) || ours.contains(&PongTimedOut) {
                            break;
                        }
                        if ours.contains(&CloseIdle) && close_ok {
                            timers.handle_close_sent(t);
                            former.closing_since.get_or_insert(t);
                        }
                    }
                }
            }
        }
    }
}
