//! The connection core: what a connection decides, kept apart from the I/O that carries
//! it out. Each part is sans-IO in the manner of `proto::conn`: it is handed inputs and
//! the time, and says what to do; the driver (`ws.rs`) does it.
//!
//! - [`outbox`]: the write side: what goes to the socket, in which order, and who
//!   writes it (the one writer of a connection).
//! - [`transport`]: the seam between the core and a socket (non-blocking writes).
//! - [`limits`]: the rate limits on what a peer sends (messages, control frames).
//! - [`timers`]: heartbeat, pong, idle and close timeouts.
//! - [`tls`]: a TLS session (rustls, unbuffered): ciphertext in, plaintext and
//!   ciphertext out.

pub(crate) mod limits;
pub(crate) mod outbox;
pub(crate) mod timers;
pub(crate) mod tls;
pub(crate) mod transport;
