//! `ringsocket bench` as a library, against a ringsocket server started in this
//! process on port 0: the echo and connect scenarios count every message and
//! connection, and each way a run can fail is reported with its cause.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringsocket::app::App;
use ringsocket::bench::{self, BenchError, ConnectOptions, EchoOptions, Progress};
use ringsocket::config::Config;
use ringsocket::runtime::{RunningServer, Server};

fn start(configure: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = Config::default();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 1;
    configure(&mut config);
    Server::start(config, Arc::new(App::echo())).unwrap()
}

fn echo_url(server: &RunningServer) -> String {
    format!("ws://{}/echo", server.local_addr())
}

fn wait_for_no_connections(server: &RunningServer) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metrics().open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections still open",
            server.metrics().open_connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Text and binary, several threads, pipelined: every echo is counted, checked and
/// timed, and the connections close cleanly.
#[test]
fn echo_counts_and_checks_every_message() {
    let server = start(|_| {});
    for binary in [false, true] {
        let mut options = EchoOptions::new(echo_url(&server));
        options.conns = 8;
        options.inflight = 4;
        options.size = 100;
        options.binary = binary;
        options.warmup = 0.2;
        options.duration = 0.5;
        options.threads = 2;
        options.server_pid = Some(std::process::id());
        let report = bench::echo(&options, &Progress::hidden()).unwrap();
        assert!(report.messages > 0, "{report}");
        assert_eq!(report.mismatches, 0, "{report}");
        assert_eq!(report.errors, 0, "{report}");
        assert_eq!(report.unanswered, 0, "{report}");
        assert_eq!(report.close_failures, 0, "{report}");
        assert!(report.is_clean());
        let latency = report.latency_us;
        assert_eq!(latency.samples, report.messages);
        assert!(0.0 < latency.p50 && latency.p50 <= latency.p99 && latency.p99 <= latency.max);
        assert!((report.messages_per_sec - report.messages as f64 / 0.5).abs() < 1e-6);
        assert!((report.bytes_per_sec - report.messages_per_sec * 100.0).abs() < 1e-3);
        assert!(report.cpu.server_percent.is_some() && report.cpu.client_percent.is_some());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["messages"], report.messages);
        assert_eq!(json["latency_us"]["samples"], report.messages);
    }
    wait_for_no_connections(&server);
}

/// Connections open, live through a hold in which the server pings them every 100 ms
/// (so the client must answer, or be closed after 200 ms), then close; the memory
/// figures come from the given pid (this process).
#[test]
fn connect_opens_holds_and_closes_every_connection() {
    let server = start(|c| {
        c.ping_interval_secs = 0.1;
        c.pong_timeout_secs = 0.2;
    });
    let mut options = ConnectOptions::new(echo_url(&server));
    options.conns = 200;
    options.concurrency = 32;
    options.hold = 0.6;
    options.threads = 2;
    options.server_pid = Some(std::process::id());
    let report = bench::connect(&options, &Progress::hidden()).unwrap();
    assert_eq!(report.opened, 200, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.dropped, 0, "{report}");
    assert_eq!(report.close_failures, 0, "{report}");
    assert!(report.is_clean());
    assert!(report.handshakes_per_sec > 0.0, "{report}");
    assert_eq!(report.handshake_latency_us.samples, 200);
    let memory = report.memory.unwrap();
    assert!(memory.rss_before_kib > 0 && memory.rss_open_kib > 0);
    let metrics = server.metrics().render();
    let pings = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringsocket_pings_sent_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(
        pings.is_some_and(|n| n > 0),
        "the server never pinged:\n{metrics}"
    );
    wait_for_no_connections(&server);
}

/// Nothing listens on the port: both scenarios fail with the OS's reason.
#[test]
fn unreachable_server_is_named() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/echo");
    let mut echo = EchoOptions::new(&url);
    echo.conns = 3;
    let err = bench::echo(&echo, &Progress::hidden()).unwrap_err();
    let BenchError::Setup { failed, causes, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*failed, 3);
    assert!(causes.keys().all(|c| c.contains("refused")), "{causes:?}");
    assert!(err.to_string().contains("3 of 3 connections"), "{err}");
    let mut connect = ConnectOptions::new(&url);
    connect.conns = 3;
    let err = bench::connect(&connect, &Progress::hidden()).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

/// A path the server does not route: the handshake is refused with its HTTP status.
#[test]
fn refused_handshake_shows_the_status() {
    let server = start(|_| {});
    let mut options = EchoOptions::new(format!("ws://{}/nowhere", server.local_addr()));
    options.conns = 2;
    let err = bench::echo(&options, &Progress::hidden()).unwrap_err();
    assert!(
        err.to_string().contains("handshake refused: HTTP 404"),
        "{err}"
    );
}

/// The server closes every connection with 1009 (messages over its limit): the run
/// reports each connection closed early, with the code.
#[test]
fn early_close_is_reported_with_its_code() {
    let server = start(|c| c.max_message_size = 64);
    let mut options = EchoOptions::new(echo_url(&server));
    options.conns = 3;
    options.size = 100;
    options.warmup = 0.0;
    options.duration = 0.3;
    let report = bench::echo(&options, &Progress::hidden()).unwrap();
    assert_eq!(report.errors, 3, "{report}");
    assert!(!report.is_clean());
    let (cause, n) = report.error_causes.iter().next().unwrap();
    assert_eq!(*n, 3);
    assert!(
        cause.contains("closed early by the server with 1009"),
        "{cause}"
    );
    assert!(report.to_string().contains("1009"));
    wait_for_no_connections(&server);
}
