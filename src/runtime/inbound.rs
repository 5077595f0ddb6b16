//! The process's budget for partly received messages (`max_inbound_memory`).
//!
//! Every connection's driver charges what its `proto::Connection` holds of a message
//! still arriving (`Connection::buffered_message_bytes`) to one counter shared by all
//! cores, the one `/metrics` shows as `ringsocket_inbound_buffered_bytes`, and gives it
//! back when the message completes or the connection ends. A peer that announces a
//! large frame and sends it slowly (or stalls half way) makes the server hold that
//! memory; many of them together could exhaust it. Past the budget, a connection whose
//! partial message is larger than [`CLOSE_ABOVE`] is closed with 1013; smaller
//! messages keep flowing. The counter is touched only when a connection's holding
//! changes, which single-frame messages read whole never do.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Over budget, connections holding more than this of a partial message are closed.
pub(crate) const CLOSE_ABOVE: usize = 64 * 1024;

/// The budget, shared by every core's connections.
#[derive(Debug, Clone)]
pub(crate) struct InboundBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl InboundBudget {
    /// A budget of `limit` bytes counted in `used` (`Metrics::inbound_buffered`).
    pub(crate) fn new(limit: usize, used: Arc<AtomicUsize>) -> Self {
        Self { limit, used }
    }

    /// Moves a connection's charge from `*charged` to `held` bytes (which `*charged`
    /// then is); returns whether the process holds more than the budget afterwards.
    pub(crate) fn recharge(&self, charged: &mut u32, held: u32) -> bool {
        let (before, after) = (*charged as usize, held as usize);
        *charged = held;
        let total = if after >= before {
            let grow = after - before;
            self.used.fetch_add(grow, Relaxed).wrapping_add(grow)
        } else {
            let shrink = before - after;
            self.used.fetch_sub(shrink, Relaxed).wrapping_sub(shrink)
        };
        total > self.limit
    }

    /// The budget in use, in bytes.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_move_with_what_a_connection_holds() {
        let budget = InboundBudget::new(1000, Arc::default());
        let (mut a, mut b) = (0, 0);
        assert!(!budget.recharge(&mut a, 600));
        assert_eq!((a, budget.in_use()), (600, 600));
        assert!(!budget.recharge(&mut b, 400));
        assert!(budget.recharge(&mut b, 401));
        assert_eq!(budget.in_use(), 1001);
        assert!(!budget.recharge(&mut a, 100));
        assert_eq!(budget.in_use(), 501);
        assert!(!budget.recharge(&mut a, 0));
        assert!(!budget.recharge(&mut b, 0));
        assert_eq!((a, b, budget.in_use()), (0, 0, 0));
    }

    #[test]
    fn clones_share_one_budget() {
        let budget = InboundBudget::new(100, Arc::default());
        let other = budget.clone();
        let (mut a, mut b) = (0, 0);
        assert!(!budget.recharge(&mut a, 60));
        assert!(other.recharge(&mut b, 60));
        assert_eq!(budget.in_use(), 120);
    }
}
