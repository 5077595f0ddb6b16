//! Operator safety: the metrics listener (`metrics_bind`), `/healthz` and `/metrics`
//! at `max_connections`, the bounded per-topic metric labels (`metrics_topics`), a port
//! already taken, and error answers that reach a client still sending (lingering
//! close).
//!
//! Real clients only: tokio-tungstenite, raw `TcpStream` writes and reads.
// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::{config, start};

use std::sync::Arc;

use ringsocket::app::App;
use ringsocket::runtime::{ServeError, Server};

/// A port another process listens on (here: a plain std listener) is refused with one
/// line naming the address, instead of being shared through `SO_REUSEPORT`.
#[test]
fn a_port_already_taken_is_refused_naming_it() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let mut taken = config();
    taken.bind = addr;
    taken.workers = 2;
    let err = Server::start(taken, Arc::new(App::echo())).unwrap_err();
    assert!(
        matches!(err, ServeError::AddrInUse(a) if a == addr),
        "{err:?}"
    );
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "cannot listen on {addr}: another process is already listening on it \
             (stop it or choose another address)"
        )
    );
    // Once it is free, the server starts on it.
    drop(other);
    let server = start(App::echo(), |c| c.bind = addr);
    assert_eq!(server.local_addr(), addr);
}
