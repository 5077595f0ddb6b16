//! The connection core: what a connection decides, kept apart from the I/O that carries
//! it out. Each part is sans-IO in the manner of `proto::conn`: it is handed inputs and
//! the time, and says what to do; the driver (`ws.rs`) does it.
//!
//! - [`timers`]: heartbeat, pong, idle and close timeouts.

pub(crate) mod timers;
