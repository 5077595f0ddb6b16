//! The per-IP limits, process-wide (one client's connections land on different cores):
//! `max_connections_per_ip` (open connections) and `max_handshakes_per_ip_per_sec` (a
//! token bucket of new connections' first requests, with a burst of the rate).
//!
//! A client address is an IPv4 address or an IPv6 /64 (one host usually holds a whole
//! /64). The table is sharded (`Mutex<HashMap>` per shard, picked by the address's
//! hash). An entry lives while its address has a connection open or its bucket is not
//! full again; idle entries are swept when a shard grows (amortized) and removed when
//! the last connection closes with a full bucket. At most [`MAX_ENTRIES`] addresses are
//! tracked: beyond that a new address is admitted without a per-IP limit (a WARN says
//! so, once), as the global `max_connections` still bounds it; refusing it instead
//! would let anyone with many addresses lock every new client out.
//!
//! [`TokenBucket`] is the sans-IO bucket math, with the clock passed in.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::client_addr::Cidrs;
use crate::config::Config;

/// A token bucket: `rate` tokens a second, holding at most `burst`. Starts full.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.at = now.max(self.at);
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The bucket is full again at `now` (it can be forgotten).
    pub(crate) fn is_full(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, burst, now);
        b.tokens >= f64::from(burst)
    }
}

/// Addresses tracked at most, across all shards (about 64 bytes each).
pub(crate) const MAX_ENTRIES: usize = 1 << 18;
const SHARDS: usize = 64;
const PER_SHARD: usize = MAX_ENTRIES / SHARDS;

/// An IPv4 address, or the /64 of an IPv6 one, packed into a non-zero `u64` so that
/// a connection's place costs 8 bytes (it lives in every connection's guard): an IPv6
/// /64 as it is (the `::/64` of `::1`, which would be 0, as all ones), an IPv4 address
/// under `ffff:ffff::/32`. Both borrowed patterns are multicast space (and the IPv4
/// broadcast address), never a TCP peer, so no two real peers share a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct IpKey(NonZeroU64);

impl IpKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        let packed = match ip.to_canonical() {
            IpAddr::V4(ip) => 0xffff_ffff_0000_0000 | u64::from(u32::from(ip)),
            IpAddr::V6(ip) => (u128::from(ip) >> 64) as u64,
        };
        Self(NonZeroU64::new(packed).unwrap_or(NonZeroU64::MAX))
    }
}

#[derive(Debug)]
struct Entry {
    open: usize,
    bucket: TokenBucket,
}

#[derive(Default)]
struct Shard {
    map: HashMap<IpKey, Entry>,
    /// The size at which the shard is next swept for idle entries.
    sweep_at: usize,
}

/// Why a client is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections_per_ip` connections already open.
    Connections(usize),
    /// No handshake token left (`max_handshakes_per_ip_per_sec`).
    Handshakes(u32),
}

/// The per-IP limits, shared by the workers.
pub(crate) struct IpLimits {
    max_connections: usize,
    rate: u32,
    exempt: Cidrs,
    shards: Box<[Mutex<Shard>]>,
    warned_full: AtomicBool,
}

/// A connection's place in its address's count. It lives in the connection's
/// `ConnGuard`, which gives it back with [`IpLimits::release`] on every way out.
#[derive(Debug)]
pub(crate) struct IpSlot {
    key: IpKey,
}

impl IpLimits {
    pub(crate) fn new(config: &Config) -> Self {
        Self::with(
            config.max_connections_per_ip,
            config.max_handshakes_per_ip_per_sec,
            Cidrs::parse(&config.ip_limits_exempt),
        )
    }

    pub(crate) fn with(max_connections: usize, rate: u32, exempt: Cidrs) -> Self {
        Self {
            max_connections,
            rate,
            exempt,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            warned_full: AtomicBool::new(false),
        }
    }

    fn shard(&self, key: IpKey) -> &Mutex<Shard> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % SHARDS]
    }

    /// A new connection from `ip` sent its first request: takes a handshake token and
    /// a connection place, or says which limit refuses it. `Ok(None)`: not tracked
    /// (no limit set, an exempt address, or the table is full).
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Option<IpSlot>, Refusal> {
        if (self.max_connections == 0 && self.rate == 0) || self.exempt.contains(ip) {
            return Ok(None);
        }
        let key = IpKey::of(ip);
        let (rate, burst) = (self.rate, self.rate);
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !shard.map.contains_key(&key) && shard.map.len() >= shard.sweep_at {
            shard
                .map
                .retain(|_, e| e.open > 0 || !e.bucket.is_full(rate, burst, now));
            shard.sweep_at = (shard.map.len() * 2).clamp(64, PER_SHARD);
            if shard.map.len() >= PER_SHARD {
                if !self.warned_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        entries = MAX_ENTRIES,
                        "per-IP limits: too many client addresses tracked; new addresses are not limited per IP until some leave"
                    );
                }
                return Ok(None);
            }
        }
        let entry = shard.map.entry(key).or_insert_with(|| Entry {
            open: 0,
            bucket: TokenBucket::full(burst, now),
        });
        if rate > 0 && !entry.bucket.take(rate, burst, now) {
            return Err(Refusal::Handshakes(rate));
        }
        if self.max_connections > 0 && entry.open >= self.max_connections {
            return Err(Refusal::Connections(self.max_connections));
        }
        entry.open += 1;
        Ok(Some(IpSlot { key }))
    }

    /// Gives a connection's place back.
    pub(crate) fn release(&self, slot: IpSlot) {
        self.release_key(slot.key, Instant::now());
    }

    fn release_key(&self, key: IpKey, now: Instant) {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = shard.map.get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 && entry.bucket.is_full(self.rate, self.rate, now) {
                shard.map.remove(&key);
            }
        }
    }

    /// Addresses tracked now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!((0..3).all(|_| b.take(3, 3, t0)));
        assert!(!b.take(3, 3, t0));
        assert!(!b.is_full(3, 3, t0));
        // One token every third of a second.
        assert!(!b.take(3, 3, t0 + Duration::from_millis(300)));
        assert!(b.take(3, 3, t0 + Duration::from_millis(340)));
        assert!(!b.take(3, 3, t0 + Duration::from_millis(340)));
        // Never more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.is_full(3, 3, later));
        assert!((0..3).all(|_| b.take(3, 3, later)));
        assert!(!b.take(3, 3, later));
        // A clock that goes back takes nothing.
        assert!(!b.take(3, 3, t0));
    }

    #[test]
    fn connections_per_ip_are_counted_and_released() {
        let limits = Arc::new(IpLimits::with(2, 0, Cidrs::default()));
        let now = Instant::now();
        let a = limits.admit(ip("192.0.2.1"), now).unwrap().unwrap();
        let _b = limits.admit(ip("192.0.2.1"), now).unwrap().unwrap();
        assert_eq!(
            limits.admit(ip("192.0.2.1"), now).err(),
            Some(Refusal::Connections(2))
        );
        // Another address is not affected.
        let other = limits.admit(ip("192.0.2.2"), now).unwrap();
        assert!(other.is_some());
        limits.release(a);
        assert!(limits.admit(ip("192.0.2.1"), now).unwrap().is_some());
    }

    #[test]
    fn handshakes_per_ip_use_a_bucket_of_the_rate() {
        let limits = Arc::new(IpLimits::with(0, 2, Cidrs::default()));
        let t0 = Instant::now();
        let slots: Vec<_> = (0..2)
            .map(|_| limits.admit(ip("198.51.100.1"), t0).unwrap())
            .collect();
        assert_eq!(
            limits.admit(ip("198.51.100.1"), t0).err(),
            Some(Refusal::Handshakes(2))
        );
        assert!(limits.admit(ip("198.51.100.2"), t0).is_ok());
        for slot in slots.into_iter().flatten() {
            limits.release(slot);
        }
        assert!(
            limits
                .admit(ip("198.51.100.1"), t0 + Duration::from_millis(500))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let limits = Arc::new(IpLimits::with(1, 0, Cidrs::default()));
        let now = Instant::now();
        let _a = limits.admit(ip("2001:db8:1:2::1"), now).unwrap();
        assert!(limits.admit(ip("2001:db8:1:2:ffff::9"), now).is_err());
        assert!(limits.admit(ip("2001:db8:1:3::1"), now).is_ok());
        let _v4 = limits.admit(ip("192.0.2.9"), now).unwrap();
        assert!(limits.admit(ip("::ffff:192.0.2.9"), now).is_err());
    }

    #[test]
    fn exempt_addresses_and_zero_limits_are_not_tracked() {
        let exempt = Cidrs::parse(&["127.0.0.0/8".to_owned()]);
        let limits = Arc::new(IpLimits::with(1, 1, exempt));
        let now = Instant::now();
        for _ in 0..10 {
            assert!(limits.admit(ip("127.0.0.5"), now).unwrap().is_none());
        }
        let off = Arc::new(IpLimits::with(0, 0, Cidrs::default()));
        assert!(off.admit(ip("192.0.2.1"), now).unwrap().is_none());
        assert_eq!(off.len() + limits.len(), 0);
    }

    #[test]
    fn entries_go_when_idle_and_full_and_the_table_is_bounded() {
        let limits = Arc::new(IpLimits::with(5, 1000, Cidrs::default()));
        let t0 = Instant::now();
        // Closed before its bucket refilled: the entry stays until swept.
        if let Some(slot) = limits.admit(ip("192.0.2.1"), t0).unwrap() {
            limits.release(slot);
        }
        assert_eq!(limits.len(), 1);
        // Many addresses, each idle with a full bucket a second later: swept as the
        // shards grow, so the table stays far below what was seen.
        for i in 0..20_000u32 {
            let addr = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let now = t0 + Duration::from_secs(u64::from(i) + 1);
            if let Some(slot) = limits.admit(addr, now).unwrap() {
                limits.release(slot);
            }
        }
        assert!(limits.len() < 20_000 / 4, "{}", limits.len());
        // Addresses with connections open are kept, up to the cap; beyond it new ones
        // are admitted untracked.
        let small = Arc::new(IpLimits::with(1, 0, Cidrs::default()));
        let mut held = Vec::new();
        let mut untracked = 0;
        for i in 0..(MAX_ENTRIES as u32 + 1000) {
            match small.admit(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), t0) {
                Ok(Some(slot)) => held.push(slot),
                Ok(None) => untracked += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(small.len() <= MAX_ENTRIES);
        assert!(untracked >= 1000);
    }
}
