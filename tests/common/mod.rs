//! Helpers shared by the loopback server tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod redis;

use std::sync::Arc;

use ringsocket::app::App;
use ringsocket::config::Config;
use ringsocket::runtime::{RunningServer, Server};

/// A server on an ephemeral loopback port with two workers, after `tweak`.
pub fn start(app: App, tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = Config::default();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 2;
    config.shutdown_timeout_secs = 2.0;
    tweak(&mut config);
    Server::start(config, Arc::new(app)).unwrap()
}
