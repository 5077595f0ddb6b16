//! What a core's connections share ([`WorkerCtx`]), the single way out of a
//! connection ([`ConnGuard`]) and the start of a read: used by both phases of a
//! connection, the HTTP one (`conn`) and the WebSocket one (`ws`), which import this
//! and not each other's internals.

use std::cell::{Cell, RefCell};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::buf::{BufPool, ReadBufs};
use super::client_addr::Cidrs;
use super::compression::CompressionPolicy;
use super::core::limits::LimitPolicy;
use super::core::timers::TimerPolicy;
use super::core::transport::Stream;
use super::inbound::InboundBudget;
use super::ip_limits::{IpLimits, IpSlot};
use super::registry::Registry;
use super::service::{Context, Service};
use crate::config::Config;
use crate::metrics::{CloseReason, WorkerMetrics};
use crate::proto::{HandshakeLimits, Limits};

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Door {
    /// `bind` (TLS when configured) or `plain_bind`: everything the service routes.
    #[default]
    Main,
    /// `metrics_bind`: `GET /metrics` and `GET /healthz` only, never TLS.
    Metrics,
}

/// Everything a core's connections share. Owned by the worker, `!Send`.
pub(crate) struct WorkerCtx {
    pub(crate) config: Arc<Config>,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) cx: Context,
    pub(crate) metrics: Arc<WorkerMetrics>,
    /// `metrics_bind` is set: the main listeners answer `GET /metrics` with 404.
    pub(crate) metrics_elsewhere: bool,
    /// Open connections in the whole process, for `max_connections`.
    pub(crate) open_global: Arc<AtomicUsize>,
    /// Open connections on this core.
    pub(crate) open_local: Cell<usize>,
    pub(crate) shutting_down: Cell<bool>,
    /// Wakes connections in the HTTP phase when shutdown starts (WebSocket sessions are
    /// reached through `sessions`).
    pub(crate) shutdown: Notify,
    /// This core's WebSocket sessions.
    pub(crate) sessions: RefCell<Registry>,
    /// Signalled when the last connection of this core ends.
    pub(crate) drained: Notify,
    pub(crate) pool: BufPool,
    pub(crate) limits: Limits,
    pub(crate) head_limits: HandshakeLimits,
    /// The WebSocket timeouts, for every session's `ConnTimers` (kept here, not per
    /// connection).
    pub(crate) timers: TimerPolicy,
    /// `trusted_proxies`, parsed.
    pub(crate) trusted_proxies: Cidrs,
    /// The per-IP limits, shared by every worker.
    pub(crate) ip_limits: Arc<IpLimits>,
    /// The rate limits of every session's `ConnLimits` (messages, control frames) and
    /// the epoch their stamps count from.
    pub(crate) conn_limits: LimitPolicy,
    /// The process's budget for partly received messages (`max_inbound_memory`).
    pub(crate) inbound: InboundBudget,
    /// permessage-deflate: the settings and the budget for clients' windows.
    pub(crate) compression: CompressionPolicy,
}

/// The single way out of a connection: counts it closed, releases its place in the
/// connection limits and closes the socket, on every path, including a panicking
/// handler (it runs on unwind too). Owned by the HTTP task, then by the session's
/// driver.
pub(crate) struct ConnGuard {
    pub(crate) ctx: Rc<WorkerCtx>,
    pub(crate) stream: Rc<Stream>,
    /// The client's address (see `client_addr`), once known; the TCP peer before.
    pub(crate) peer: SocketAddr,
    pub(crate) reason: CloseReason,
    /// The connection's place in its address's count (`max_connections_per_ip`),
    /// released with the guard.
    pub(crate) ip_slot: Option<IpSlot>,
    /// Bytes of `compression_memory_limit` reserved for the client's window, given
    /// back with the guard.
    pub(crate) compression_window: u32,
}

impl ConnGuard {
    pub(crate) fn new(ctx: Rc<WorkerCtx>, stream: Rc<Stream>, peer: SocketAddr) -> Self {
        ctx.metrics.accepted();
        ctx.open_local.set(ctx.open_local.get() + 1);
        Self {
            ctx,
            stream,
            peer,
            reason: CloseReason::IoError,
            ip_slot: None,
            compression_window: 0,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        tracing::debug!(peer = %self.peer, reason = self.reason.label(), "connection ended");
        // Wakes a read still in flight (it completes with 0), so the socket closes now.
        let _ = self.stream.shutdown(Shutdown::Both);
        ctx.metrics.closed(self.reason);
        ctx.open_global.fetch_sub(1, Ordering::Relaxed);
        if let Some(slot) = self.ip_slot.take() {
            ctx.ip_limits.release(slot);
        }
        ctx.compression.release(self.compression_window as usize);
        let left = ctx.open_local.get().saturating_sub(1);
        ctx.open_local.set(left);
        if left == 0 {
            ctx.drained.notify_waiters();
        }
    }
}

pub(crate) use super::core::transport::ReadFuture;

/// Starts a read of `stream` into the buffer `bufs` picks.
pub(crate) fn start_read(stream: &Rc<Stream>, bufs: &mut ReadBufs) -> ReadFuture {
    stream.read_boxed(bufs.next())
}
