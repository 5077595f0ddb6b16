//! `ringsocket bench recover` as a library and as a command, against a ringsocket
//! server started in this process on port 0: every client reconnects at once and
//! recovers every missed publication exactly; a history too short to hold the misses
//! is reported as clients that did not recover, and fails the command.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringsocket::app::App;
use ringsocket::bench::{self, Progress, RecoverOptions, Summary};
use ringsocket::config::Config;
use ringsocket::runtime::{RunningServer, Server};

fn start(configure: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = Config::default();
    if let Ok(backend) = std::env::var("RINGSOCKET_IO_BACKEND") {
        config.io_backend = backend.parse().expect("RINGSOCKET_IO_BACKEND");
    }
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 1;
    configure(&mut config);
    Server::start(config, Arc::new(App::standard())).unwrap()
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

fn small(server: &RunningServer, topic: &str) -> RecoverOptions {
    let mut options = RecoverOptions::new(format!("ws://{}", server.local_addr()));
    options.clients = 20;
    options.missed = 10;
    options.rounds = 2;
    options.topic = topic.to_owned();
    options.common.timeout = 5.0;
    options
}

/// 20 clients on two load generator threads against two server cores (so that a
/// reconnecting client may land on another core than before), 10 missed, two rounds:
/// every client recovers every publication exactly, in both rounds, and the report's
/// figures hang together.
#[test]
fn every_client_recovers_exactly() {
    let server = start(|c| {
        c.workers = 2;
        c.history_size = 1000;
    });
    let mut options = small(&server, "recover-exact");
    options.size = 200;
    options.common.threads = 2;
    options.common.server_pid = Some(std::process::id());
    let report = bench::recover(&options, &Progress::hidden()).unwrap();
    assert!(report.exact, "{report}");
    assert_eq!(report.failure(), None);
    assert_eq!(report.not_exact(), 0);
    assert_eq!(report.v1_url, format!("ws://{}/v1", server.local_addr()));
    assert_eq!(report.rounds.len(), 2);
    let mut last_offset = 0;
    for round in &report.rounds {
        assert_eq!(round.subscribed, 20, "{report}");
        assert_eq!(round.recovered_exactly, 20, "{report}");
        assert!(round.failures.is_empty(), "{report}");
        assert_eq!(round.first_failure, None);
        // Baseline, 10 missed and 1 live per round.
        assert!(round.baseline_offset > last_offset, "{report}");
        last_offset = round.baseline_offset + 11;
        let r = &round.recovery_us;
        assert_eq!(r.samples, 20);
        assert_eq!(round.handshake_us.samples, 20);
        assert!(0.0 < r.p50 && r.p50 <= r.p99 && r.p99 <= r.max, "{report}");
        assert!((round.all_live_secs - r.max / 1e6).abs() < 1e-3, "{report}");
        assert!(round.wave_secs > 0.0 && round.wave_secs <= round.all_live_secs + 1e-3);
        assert!(round.live_secs > 0.0);
        assert!(round.cpu.server_secs.is_some(), "{report}");
        assert!(round.cpu_per_message.server_us.is_some(), "{report}");
        // This process's threads over the wave: the server's cores and the generator's
        // (read, not compared with zero: a wave of a few milliseconds may fall between
        // two updates of the kernel's counters).
        assert!(
            round.server_schedstat_secs.is_some_and(|s| s >= 0.0),
            "{report}"
        );
        assert!(round.server_schedstat_per_message_us.is_some(), "{report}");
    }
    assert!(report.median.all_live_ms > 0.0);
    assert!(report.median.server_cpu_ms.is_some());
    assert!(report.median.server_schedstat_ms.is_some());
    assert!(!report.recovery_curve.is_empty());
    let text = report.to_string();
    assert!(text.contains("recovered exactly: every client"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["exact"], true);
    assert_eq!(json["close"], "clean");
    assert_eq!(json["rounds"][1]["recovered_exactly"], 20);
    wait_for_no_connections(&server);
}

/// `history_size` 5 and 10 missed: the server says `recovered: false`, and every
/// client is counted as not recovered, by that cause.
#[test]
fn a_history_too_short_is_reported() {
    let server = start(|c| c.history_size = 5);
    let mut options = small(&server, "recover-short");
    options.rounds = 1;
    let report = bench::recover(&options, &Progress::hidden()).unwrap();
    assert!(!report.exact, "{report}");
    let round = &report.rounds[0];
    assert_eq!(round.recovered_exactly, 0, "{report}");
    assert_eq!(
        round.failures.get("recovered: false"),
        Some(&20),
        "{report}"
    );
    assert!(
        report.failure().unwrap().contains("20 × recovered: false"),
        "{report}"
    );
    assert!(
        report.to_string().contains("NOT recovered exactly"),
        "{report}"
    );
    wait_for_no_connections(&server);
}

fn ringsocket_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringsocket"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// The command: --json prints the report; a run where clients did not recover fails
/// with the cause on stderr; a URL with a path is refused.
#[test]
fn recover_from_the_command_line() {
    let server = start(|c| c.history_size = 1000);
    let url = format!("ws://{}", server.local_addr());
    let args = [
        "recover",
        "--url",
        url.as_str(),
        "--clients",
        "8",
        "--missed",
        "5",
        "--rounds",
        "1",
        "--topic",
        "recover-cli",
        "--json",
    ];
    let out = ringsocket_bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["exact"], true);
    assert_eq!(json["clients"], 8);
    assert_eq!(json["missed"], 5);
    assert_eq!(json["rounds"][0]["recovered_exactly"], 8);

    let short = start(|c| c.history_size = 2);
    let url = format!("ws://{}", short.local_addr());
    let mut failing = args;
    failing[2] = url.as_str();
    let out = ringsocket_bench(&failing[..failing.len() - 1]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not recover exactly"), "{stderr}");
    assert!(stderr.contains("recovered: false"), "{stderr}");

    let echo = format!("ws://{}/echo", server.local_addr());
    let out = ringsocket_bench(&["recover", "--url", echo.as_str()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("base URL"), "{stderr}");
    wait_for_no_connections(&server);
    wait_for_no_connections(&short);
}
