//! The `ringsocket` binary as a user runs it: `serve`'s shutdown, `config`, and what a
//! bad setting gets.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ringsocket() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringsocket"));
    // No setting leaks in from the environment of whoever runs the tests.
    for (key, _) in std::env::vars() {
        if key.starts_with("RINGSOCKET_") {
            command.env_remove(key);
        }
    }
    // Nor a ringsocket.toml in the working directory.
    command.current_dir(std::env::temp_dir());
    command
}

/// `ringsocket serve 2>&1 | head -1`: once `head` has its line, stderr is a closed
/// pipe. SIGTERM must still stop the server gracefully (exit 0), although every log
/// line fails to be written; it used to be ignored for good.
#[test]
fn sigterm_stops_the_server_when_stderr_is_a_closed_pipe() {
    let mut child = ringsocket()
        .args(["serve", "--bind", "127.0.0.1:0", "--workers", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // `head -1` takes the first log line, then closes the read end of the pipe: every
    // write to stderr fails with EPIPE from then on.
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut first = String::new();
    BufReader::new(stderr)
        .read_line(&mut first)
        .expect("the first log line");
    assert!(first.contains("listening"), "{first:?}");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the listening line");
    assert!(line.contains("listening on 127.0.0.1:"), "{line:?}");
    // The signal handlers are installed before the listening line is printed.
    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM was ignored: the server still runs 15 s later");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A graceful exit, not the default action of SIGTERM (which leaves no code).
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// `ringsocket config` prints the effective configuration as TOML, each value with
/// its source, the secrets masked, and the warnings.
#[test]
fn config_prints_each_value_with_its_source_and_masks_secrets() {
    let output = ringsocket()
        .args([
            "config",
            "--workers",
            "64",
            "--set",
            "slow_consumer_policy=close1008",
            "--set",
            "conflate_topics=[\"cursors:*\", \"prices\"]",
        ])
        .env("RINGSOCKET_REDIS_URL", "redis://app:hunter2@127.0.0.1:6379")
        .env("RINGSOCKET_PING_INTERVAL_SECS", "30")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for line in [
        "workers = 64  # flag --workers",
        "slow_consumer_policy = \"close-1008\"  # flag --set slow_consumer_policy",
        "conflate_topics = [\"cursors:*\", \"prices\"]  # flag --set conflate_topics",
        "ping_interval_secs = 30.0  # env RINGSOCKET_PING_INTERVAL_SECS",
        "redis_url = \"redis://app:***@127.0.0.1:6379\"  # env RINGSOCKET_REDIS_URL; password masked",
        "bind = \"127.0.0.1:9001\"  # default",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("# WARNING: workers = 64"),
        "the surprising value is pointed out:\n{stdout}"
    );
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    // `serve --print-config` says the same.
    let again = ringsocket()
        .args(["serve", "--print-config", "--workers", "64"])
        .output()
        .expect("the binary runs");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("workers = 64  # flag --workers"));
}

/// A value out of range stops `serve` with one line naming the field and the range,
/// instead of being clamped without a word.
#[test]
fn an_out_of_range_value_is_refused_naming_the_range() {
    let output = ringsocket()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--set",
            "max_head_bytes=1000000",
        ])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("max_head_bytes must be between 512 and 65535, got 1000000"),
        "{stderr}"
    );
    let output = ringsocket()
        .args(["serve", "--set", "conflate_topics=[\"a*\""])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--set conflate_topics: not a list"),
        "{stderr}"
    );
}

/// A second `serve` on the port of a running one exits 1 with one line naming the
/// address, instead of silently taking half of its connections (`SO_REUSEPORT`).
#[test]
fn a_second_serve_on_a_taken_port_exits_1_naming_it() {
    // A port that is free now: the first server binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bind = format!("127.0.0.1:{port}");
    let mut first = ringsocket()
        .args(["serve", "--bind", &bind, "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(first.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("the listening line");
    assert!(line.contains(&format!("listening on {bind}")), "{line:?}");
    let second = ringsocket()
        .args(["serve", "--bind", &bind, "--workers", "2"])
        .output()
        .expect("the binary runs");
    let _ = first.kill();
    let _ = first.wait();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on {bind}: another process is already listening on it"
        )),
        "{stderr}"
    );
    assert!(second.stdout.is_empty(), "the second server never listened");
}

/// With `metrics_bind`, `serve` prints the metrics listener's URL on its startup line,
/// and that URL answers with the metrics (a plain HTTP GET, as a scraper does).
#[test]
fn serve_prints_the_metrics_url_of_metrics_bind() {
    use std::io::{Read, Write};
    let mut child = ringsocket()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--set",
            "metrics_bind=127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("the listening line");
    // "…, http://127.0.0.1:PORT/metrics (metrics_bind) (io_uring backend)"
    let addr = line
        .split_once("/metrics (metrics_bind)")
        .and_then(|(before, _)| before.rsplit_once("http://"))
        .map(|(_, addr)| addr.to_owned())
        .unwrap_or_else(|| panic!("no metrics URL in {line:?}"));
    assert!(!line.starts_with(&format!("ringsocket listening on {addr}:")));
    let mut stream = std::net::TcpStream::connect(&addr).expect("the metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("a timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("the response");
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("ringsocket_connections_open"),
        "{response}"
    );
}
