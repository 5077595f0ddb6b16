//! permessage-deflate for the server's connections: what `compression*` says, the
//! negotiation of each handshake, and the process's budget for clients' windows
//! (`compression_memory_limit`).
//!
//! The codec itself is `proto::deflate`. What costs memory per connection is only the
//! window of a client that keeps its compression context between messages: the server
//! keeps its last 2^`client_max_window_bits` bytes (32 KiB unless the client offered
//! less) to inflate what refers back into them. That much is reserved when the
//! handshake agrees to it, counted in one counter shared by all cores (the gauge
//! `ringsocket_compression_memory_bytes`), and given back when the connection ends
//! ([`ConnGuard`](super::ctx::ConnGuard)). Past the budget, the 101 asks the client for
//! `client_no_context_takeover`, and the connection holds nothing. Outgoing messages
//! never keep a context (`server_no_context_takeover`), so no connection holds a
//! compressor, and a broadcast is compressed once per core for all its subscribers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::config::{Compression, Config};
use crate::metrics::Metrics;
use crate::proto::deflate::{self, PerMessageDeflate};
use crate::proto::{Request, Role};

/// The compression settings and the window budget, shared by every core.
#[derive(Debug, Clone)]
pub(crate) struct CompressionPolicy {
    enabled: bool,
    level: u32,
    min_bytes: usize,
    limit: usize,
    /// Bytes reserved now (`Metrics::compression_memory`).
    used: Arc<AtomicUsize>,
}

/// What a handshake agreed to.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// The connection's codec.
    pub(crate) codec: PerMessageDeflate,
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub(crate) response: String,
    /// Window bytes reserved, to give back with [`CompressionPolicy::release`].
    pub(crate) reserved: usize,
}

impl CompressionPolicy {
    pub(crate) fn from_config(config: &Config, metrics: &Metrics) -> Self {
        Self {
            enabled: config.compression == Compression::On,
            level: config.compression_level,
            min_bytes: config.compression_min_bytes,
            limit: config.compression_memory_limit,
            used: metrics.compression_memory().clone(),
        }
    }

    /// The answer to `request`'s extension offers, if it offers permessage-deflate and
    /// compression is on: with the client keeping its context when the budget has room
    /// for its window (reserved here), without otherwise.
    pub(crate) fn negotiate(&self, request: &Request) -> Option<Negotiated> {
        if !self.enabled || request.header("sec-websocket-extensions").is_none() {
            return None;
        }
        let offers = request.extensions();
        let mut agreed = deflate::negotiate(&offers, true)?;
        let mut reserved = agreed.window_bytes();
        if reserved > 0 && !self.reserve(reserved) {
            agreed = deflate::negotiate(&offers, false)?;
            reserved = 0;
        }
        Some(Negotiated {
            codec: PerMessageDeflate::new(&agreed.params, Role::Server, self.level, self.min_bytes),
            response: agreed.response,
            reserved,
        })
    }

    /// Takes `bytes` from the budget, if it has them.
    fn reserve(&self, bytes: usize) -> bool {
        let before = self.used.fetch_add(bytes, Relaxed);
        if before.saturating_add(bytes) > self.limit {
            self.used.fetch_sub(bytes, Relaxed);
            return false;
        }
        true
    }

    /// Gives back what [`CompressionPolicy::negotiate`] reserved.
    pub(crate) fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::parse_request;

    fn request(extensions: &str) -> Request {
        let head = format!(
            "GET /echo HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {extensions}\r\n\r\n"
        );
        parse_request(head.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    fn policy(limit: usize) -> CompressionPolicy {
        let config = Config {
            compression_memory_limit: limit,
            ..Config::default()
        };
        CompressionPolicy::from_config(&config, &Metrics::new(1, "io_uring"))
    }

    /// The budget holds two 32 KiB windows: the third client is told to drop its
    /// context, and holds nothing; a release makes room again.
    #[test]
    fn past_the_budget_clients_get_no_context_takeover() {
        let policy = policy(64 * 1024);
        let browser = request("permessage-deflate; client_max_window_bits");
        let a = policy.negotiate(&browser).unwrap();
        let b = policy.negotiate(&browser).unwrap();
        assert_eq!((a.reserved, b.reserved), (32 * 1024, 32 * 1024));
        let c = policy.negotiate(&browser).unwrap();
        assert_eq!(c.reserved, 0);
        assert!(
            c.response.contains("client_no_context_takeover"),
            "{}",
            c.response
        );
        assert_eq!(policy.used.load(Relaxed), 64 * 1024);
        policy.release(a.reserved);
        let d = policy.negotiate(&browser).unwrap();
        assert_eq!(d.reserved, 32 * 1024);
        assert!(!d.response.contains("client_no_context_takeover"));
    }

    /// `compression = off`, or no offer: no extension.
    #[test]
    fn off_or_not_offered_means_no_extension() {
        let off = CompressionPolicy {
            enabled: false,
            ..policy(1 << 20)
        };
        assert!(off.negotiate(&request("permessage-deflate")).is_none());
        assert!(policy(1 << 20).negotiate(&request("x-other")).is_none());
    }
}
