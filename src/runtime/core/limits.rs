//! A connection's rate limits as sans-IO policy: token buckets for the data messages
//! (`max_messages_per_sec`, `max_messages_burst`) and the control frames
//! (`max_control_frames_per_sec`) a peer sends.
//!
//! [`ConnLimits`] is told what arrived and when (`now` is handed in; nothing here reads
//! a clock or touches a socket) and answers whether it is within the limit. The rates
//! and the core's epoch come from a [`LimitPolicy`], one per core, passed in on every
//! call, so that a connection keeps 20 bytes: two buckets of a `u32` count (in 1/1000
//! tokens) and a `u32` millisecond stamp (relative to the epoch), and a byte of flags.

use std::time::Instant;

use crate::config::{Config, RateLimitPolicy};

/// A rate: `per_sec` tokens a second, at most `burst` held. `per_sec == 0`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub(crate) per_sec: u32,
    pub(crate) burst: u32,
}

impl Rate {
    fn is_off(self) -> bool {
        self.per_sec == 0
    }
}

/// The limits of a core's connections: built once from the [`Config`] when the core
/// starts (its `epoch`), passed to every [`ConnLimits`] call (connections keep no copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitPolicy {
    /// The instant the buckets' millisecond stamps count from.
    pub(crate) epoch: Instant,
    /// Data messages: `max_messages_per_sec`, burst `Config::messages_burst`.
    pub(crate) messages: Rate,
    /// What a message over `messages` gets.
    pub(crate) on_messages: RateLimitPolicy,
    /// Pings and pongs: `max_control_frames_per_sec`, burst the same.
    pub(crate) controls: Rate,
}

impl LimitPolicy {
    /// The policy `config` sets, counting from `epoch`.
    pub(crate) fn from_config(config: &Config, epoch: Instant) -> Self {
        Self {
            epoch,
            messages: Rate {
                per_sec: config.max_messages_per_sec,
                burst: config.messages_burst().max(1),
            },
            on_messages: config.rate_limit_policy,
            controls: Rate {
                per_sec: config.max_control_frames_per_sec,
                burst: config.max_control_frames_per_sec,
            },
        }
    }

    /// `now` as milliseconds since the epoch, wrapping every 49.7 days (the buckets
    /// take differences, which stay right across a wrap).
    fn millis(&self, now: Instant) -> u32 {
        // Truncation intended: see above.
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }
}

/// A bucket counts in thousandths of a token: a millisecond at `per_sec` tokens a
/// second earns exactly `per_sec` of them, nothing is rounded away.
const UNITS_PER_TOKEN: u32 = 1000;
/// The most tokens a bucket holds: a larger burst is cut to this (4,294,967).
const MAX_BURST: u32 = u32::MAX / UNITS_PER_TOKEN;

/// A token bucket in 8 bytes: `units` (1/1000 tokens) held as of `stamp`
/// (milliseconds since the policy's epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    units: u32,
    stamp: u32,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    fn full(rate: Rate, now_ms: u32) -> Self {
        Self {
            units: capacity(rate),
            stamp: now_ms,
        }
    }

    /// Takes a token at `now_ms`; `false` when there is no whole one (nothing is taken).
    fn try_take(&mut self, rate: Rate, now_ms: u32) -> bool {
        if rate.is_off() {
            return true;
        }
        self.refill(rate, now_ms);
        let token = UNITS_PER_TOKEN;
        if self.units < token {
            return false;
        }
        self.units -= token;
        true
    }

    /// Adds what the time since `stamp` earned, up to the burst.
    fn refill(&mut self, rate: Rate, now_ms: u32) {
        // `now` does not go back, so the difference is the time since the stamp (short
        // of 49.7 days; a connection silent for longer may earn less than a full bucket).
        let elapsed = u128::from(now_ms.wrapping_sub(self.stamp));
        let earned = elapsed * u128::from(rate.per_sec);
        let units = (u128::from(self.units) + earned).min(u128::from(capacity(rate)));
        // At most `capacity`, a u32.
        self.units = units as u32;
        self.stamp = now_ms;
    }
}

/// `rate`'s burst in units.
fn capacity(rate: Rate) -> u32 {
    rate.burst.min(MAX_BURST) * UNITS_PER_TOKEN
}

/// What [`ConnLimits::handle_message`] decided about one data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limit: deliver it.
    Deliver,
    /// Over the limit: apply the policy's `on_messages`. `first`: the first time on
    /// this connection (log it then, not for every message of a flood).
    OverLimit { first: bool },
}

/// A message was over the limit on this connection already.
const MESSAGES_HIT: u8 = 1;

/// One connection's rate limits.
///
/// # Call order
///
/// ```text
///   ConnLimits::new(now, &policy)          the connection is open: full buckets
///   handle_message(now, &policy)  ─┐ any   a data message arrived: deliver it?
///   handle_control(now, &policy)  ─┘ order a ping or pong arrived: within the limit?
/// ```
///
/// `now` never goes back between calls. A limit whose rate is 0 always allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnLimits {
    messages: TokenBucket,
    controls: TokenBucket,
    /// [`MESSAGES_HIT`].
    flags: u8,
}

impl ConnLimits {
    /// The limits of a connection opened at `now`: both buckets full.
    pub(crate) fn new(now: Instant, policy: &LimitPolicy) -> Self {
        let now_ms = policy.millis(now);
        Self {
            messages: TokenBucket::full(policy.messages, now_ms),
            controls: TokenBucket::full(policy.controls, now_ms),
            flags: 0,
        }
    }

    /// A data message arrived at `now`.
    pub(crate) fn handle_message(&mut self, now: Instant, policy: &LimitPolicy) -> Verdict {
        if self.messages.try_take(policy.messages, policy.millis(now)) {
            return Verdict::Deliver;
        }
        let first = self.flags & MESSAGES_HIT == 0;
        self.flags |= MESSAGES_HIT;
        Verdict::OverLimit { first }
    }

    /// A ping or pong arrived at `now`; `false`: over `max_control_frames_per_sec`.
    pub(crate) fn handle_control(&mut self, now: Instant, policy: &LimitPolicy) -> bool {
        self.controls.try_take(policy.controls, policy.millis(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    /// A virtual clock: instants `ms` milliseconds after a fixed base.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }

        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn policy(clock: &Clock, messages: (u32, u32), controls: u32) -> LimitPolicy {
        LimitPolicy {
            epoch: clock.0,
            messages: Rate {
                per_sec: messages.0,
                burst: messages.1,
            },
            on_messages: RateLimitPolicy::Close,
            controls: Rate {
                per_sec: controls,
                burst: controls,
            },
        }
    }

    /// How many of `n` messages at `ms` are delivered.
    fn delivered(limits: &mut ConnLimits, p: &LimitPolicy, clock: &Clock, ms: u64, n: u32) -> u32 {
        (0..n)
            .filter(|_| limits.handle_message(clock.at(ms), p) == Verdict::Deliver)
            .count() as u32
    }

    #[test]
    fn a_new_connection_may_send_its_burst_at_once_and_no_more() {
        let clock = Clock::new();
        let p = policy(&clock, (10, 20), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert_eq!(delivered(&mut limits, &p, &clock, 0, 25), 20);
    }

    #[test]
    fn tokens_come_back_at_the_rate() {
        let clock = Clock::new();
        let p = policy(&clock, (10, 20), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert_eq!(delivered(&mut limits, &p, &clock, 0, 20), 20);
        // 10 a second: one every 100 ms.
        assert_eq!(delivered(&mut limits, &p, &clock, 99, 5), 0);
        assert_eq!(delivered(&mut limits, &p, &clock, 100, 5), 1);
        assert_eq!(delivered(&mut limits, &p, &clock, 550, 5), 4);
        // Never more than the burst, however long the pause.
        assert_eq!(delivered(&mut limits, &p, &clock, 60_000, 50), 20);
    }

    #[test]
    fn the_part_of_a_token_not_yet_earned_is_kept() {
        let clock = Clock::new();
        // 3 a second: one per 333.3 ms.
        let p = policy(&clock, (3, 2), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert_eq!(delivered(&mut limits, &p, &clock, 0, 2), 2);
        assert_eq!(delivered(&mut limits, &p, &clock, 200, 1), 0);
        // 400 ms: one token and a fifth.
        assert_eq!(delivered(&mut limits, &p, &clock, 400, 1), 1);
        assert_eq!(delivered(&mut limits, &p, &clock, 666, 1), 0);
        assert_eq!(delivered(&mut limits, &p, &clock, 667, 1), 1);
        // 700 a second, a message per millisecond: 7 in 10 ms, not one per ms.
        let p = policy(&clock, (700, 2), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        let ok: u32 = (1..=1000)
            .map(|ms| delivered(&mut limits, &p, &clock, ms, 1))
            .sum();
        assert!((699..=701).contains(&ok), "{ok} delivered");
    }

    #[test]
    fn only_the_first_message_over_the_limit_is_first() {
        let clock = Clock::new();
        let p = policy(&clock, (1, 1), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert_eq!(limits.handle_message(clock.at(0), &p), Verdict::Deliver);
        assert_eq!(
            limits.handle_message(clock.at(0), &p),
            Verdict::OverLimit { first: true }
        );
        assert_eq!(
            limits.handle_message(clock.at(0), &p),
            Verdict::OverLimit { first: false }
        );
        assert_eq!(limits.handle_message(clock.at(1000), &p), Verdict::Deliver);
        assert_eq!(
            limits.handle_message(clock.at(1000), &p),
            Verdict::OverLimit { first: false }
        );
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let clock = Clock::new();
        let p = policy(&clock, (0, 0), 0);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert_eq!(delivered(&mut limits, &p, &clock, 0, 10_000), 10_000);
        assert!((0..10_000).all(|_| limits.handle_control(clock.at(0), &p)));
    }

    #[test]
    fn control_frames_have_a_burst_of_their_rate() {
        let clock = Clock::new();
        let p = policy(&clock, (0, 0), 50);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        // Autobahn sends up to 10 pings back to back; the default allows 50.
        let allowed = (0..200)
            .filter(|_| limits.handle_control(clock.at(0), &p))
            .count();
        assert_eq!(allowed, 50);
        // 50 a second: one per 20 ms.
        assert!(limits.handle_control(clock.at(20), &p));
        assert!(!limits.handle_control(clock.at(20), &p));
    }

    #[test]
    fn the_two_buckets_are_apart() {
        let clock = Clock::new();
        let p = policy(&clock, (1, 1), 1);
        let mut limits = ConnLimits::new(clock.at(0), &p);
        assert!(limits.handle_control(clock.at(0), &p));
        assert!(!limits.handle_control(clock.at(0), &p));
        assert_eq!(limits.handle_message(clock.at(0), &p), Verdict::Deliver);
    }

    #[test]
    fn the_stamps_survive_the_millisecond_wrap() {
        let clock = Clock::new();
        let p = policy(&clock, (10, 10), 0);
        let start = u64::from(u32::MAX) - 50;
        let mut limits = ConnLimits::new(clock.at(start), &p);
        assert_eq!(delivered(&mut limits, &p, &clock, start, 10), 10);
        // 200 ms later, across the wrap of the u32 stamp: two tokens.
        assert_eq!(delivered(&mut limits, &p, &clock, start + 200, 5), 2);
    }

    #[test]
    fn limits_are_small() {
        assert!(std::mem::size_of::<ConnLimits>() <= 20);
    }

    proptest! {
        /// Over any run of arrivals, what is delivered is at most the burst plus what
        /// the rate earned over the run's span, and a connection that keeps to the
        /// rate is never limited.
        #[test]
        fn delivered_never_exceeds_burst_plus_rate(
            per_sec in 1u32..2000,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50, 1..300),
        ) {
            let clock = Clock::new();
            let p = policy(&clock, (per_sec, burst), 0);
            let mut limits = ConnLimits::new(clock.at(0), &p);
            let mut now = 0;
            let mut ok = 0u64;
            for gap in &gaps {
                now += gap;
                if limits.handle_message(clock.at(now), &p) == Verdict::Deliver {
                    ok += 1;
                }
            }
            let earned = now * u64::from(per_sec) / 1000;
            prop_assert!(ok <= u64::from(burst) + earned, "{ok} delivered");
        }

        #[test]
        fn a_peer_within_the_rate_is_never_limited(per_sec in 1u32..1000, n in 1u64..200) {
            let clock = Clock::new();
            let p = policy(&clock, (per_sec, 1), 0);
            let mut limits = ConnLimits::new(clock.at(0), &p);
            // One message per 1/per_sec seconds, rounded up to the millisecond.
            let gap = 1000u64.div_ceil(u64::from(per_sec));
            for i in 0..n {
                prop_assert_eq!(limits.handle_message(clock.at(i * gap), &p), Verdict::Deliver);
            }
        }
    }
}
