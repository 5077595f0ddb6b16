//! # ringsocket
//!
//! A WebSocket server for Linux on io_uring, one runtime per CPU core: a library with
//! a FastAPI-like API, and a ready server binary (`ringsocket serve`).
//!
//! The crate is built in layers, data flowing from the top down (the project's
//! `docs/architecture.md` has the picture and the rules):
//!
//! - [`app`]: routes with typed path parameters, the WebSocket handle (`accept`,
//!   `recv`, `send`, `close`, `subscribe`, `publish`), HTTP routes, `/healthz`,
//!   `/metrics`, and the default app of `ringsocket serve` (rooms, `POST /publish`).
//! - [`pubsub`]: topics (rooms): per-core registries, encode-once fan-out through
//!   per-core feeds, cross-core inboxes, conflation, [`pubsub::Publisher`].
//! - [`broker`]: what carries publishes between processes: in-process by default,
//!   Redis Pub/Sub with `--redis`.
//! - [`runtime`]: thread-per-core workers, each pinned to a core with its own io_uring
//!   (driven by the runtime itself, under a tokio current-thread runtime) and its own
//!   `SO_REUSEPORT` listener; the connection driver (HTTP, then WebSocket),
//!   batched writes, heartbeats, timeouts, limits and graceful shutdown.
//! - [`tasks`]: background jobs on dedicated executor threads, fed by a bounded queue;
//!   HTTP handlers' jobs start after the response is written.
//! - [`proto`]: the sans-IO core. The RFC 6455 opening handshake, the frame codec,
//!   masking, UTF-8 validation, close codes and the connection state machine, for both
//!   the server and the client role. No sockets, no runtime, no clock.
//! - [`config`] and [`metrics`]: settings with documented defaults and one parser per
//!   field; per-core counters and their OpenMetrics exposition (`prometheus-client`
//!   collectors that sum them at scrape time).
//! - `bench` (feature `cli`, on by default): the load generator of `ringsocket bench`.
//!
//! The library logs through `tracing`; install a subscriber to see it (the README
//! shows the one line). Build with `default-features = false` to leave out the CLI's
//! dependencies.
#![deny(clippy::undocumented_unsafe_blocks)]
// Tests unwrap values they built themselves; library code may not (Cargo.toml lints).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
#[cfg(feature = "cli")]
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
