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
//! - [`runtime`]: thread-per-core `tokio-uring` workers, each pinned to a core with its
//!   own `SO_REUSEPORT` listener; the connection driver (HTTP, then WebSocket), batched
//!   writes, heartbeats, timeouts, limits and graceful shutdown.
//! - [`app`]: the FastAPI-like API: routes with typed path parameters, the WebSocket
//!   handle (`accept`, `recv`, `send`, `close`), HTTP routes, `/healthz`, `/metrics`.
//! - [`config`] and [`metrics`]: settings with documented defaults; per-core counters
//!   and their OpenMetrics exposition (`prometheus-client` collectors).
//!
//! - [`tasks`]: background jobs on dedicated executor threads, fed by a bounded queue;
//!   HTTP handlers' jobs start after the response is written.
//!
//! Rooms and broadcast and brokers come next (see the README).
#![deny(clippy::undocumented_unsafe_blocks)]
// Tests unwrap values they built themselves; library code may not (Cargo.toml lints).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod bench;
pub mod broker;
pub mod config;
pub mod metrics;
pub mod proto;
pub mod pubsub;
pub mod runtime;
pub mod tasks;

/// The README's example is compiled and run as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
