//! The process-wide shutdown signal, set by SIGINT/SIGTERM or by the embedding program,
//! and seen by every worker.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Tells every worker to stop accepting and close its connections with 1001.
#[derive(Debug, Default)]
pub struct ShutdownSignal {
    set: AtomicBool,
    notify: Notify,
}

impl ShutdownSignal {
    /// Starts the shutdown. Idempotent.
    pub fn trigger(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether shutdown has started.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Waits for the shutdown to start.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}
