//! # ringsocket
//!
//! A WebSocket server for Linux on io_uring, one runtime per CPU core.
//!
//! The crate is built in layers, data flowing from the top down:
//!
//! - [`proto`]: the sans-IO core. The RFC 6455 opening handshake, the frame codec,
//!   masking, UTF-8 validation, close codes and the connection state machine, for both
//!   the server and the client role. No sockets, no runtime, no clock.
//!
//! The runtime (thread-per-core io_uring workers), the app API, rooms and broadcast,
//! brokers and background tasks are built on top of it.
#![deny(clippy::undocumented_unsafe_blocks)]
// Tests unwrap values they built themselves; library code may not (Cargo.toml lints).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod proto;

/// The README's example is compiled and run as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
