//! `ringsocket bench` as a library and as a command, against a ringsocket server
//! started in this process on port 0 and against independent tokio-tungstenite
//! servers (an echo server and a naive room, which can drop or reorder a message): the
//! echo, broadcast and connect scenarios count every message and connection, each way
//! a run can fail is reported with its cause, and --compare, --json and --plot give a
//! table, JSON and SVG.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::bench::{
    self, BenchError, BroadcastOptions, ConnectOptions, EchoOptions, Payload, Progress, Summary,
    Verdict,
};
use ringsocket::config::Config;
use ringsocket::runtime::{RunningServer, Server};
use tokio::sync::mpsc::UnboundedSender;
use tungstenite::Message;

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
        options.common.threads = 2;
        options.common.server_pid = Some(std::process::id());
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

/// `--payload json`: JSON text (or binary) of the exact size, every echo checked; the
/// wire bytes cover the payload plus the frame headers (no compression without
/// --deflate).
#[test]
fn echo_checks_json_payloads() {
    let server = start(|_| {});
    for binary in [false, true] {
        let mut options = EchoOptions::new(echo_url(&server));
        options.conns = 4;
        options.inflight = 4;
        options.size = 300;
        options.binary = binary;
        options.payload = Payload::Json;
        options.warmup = 0.1;
        options.duration = 0.3;
        let report = bench::echo(&options, &Progress::hidden()).unwrap();
        assert!(report.messages > 0, "{report}");
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.payload, Payload::Json);
        assert!(!report.deflate);
        assert_eq!(report.payload_bytes, report.messages * 300, "{report}");
        // Each echo read is its 300 B plus a 4-byte header; reads and echoes are
        // counted at the same instants.
        assert!(report.wire_bytes_read >= report.payload_bytes, "{report}");
        assert!(report.wire_bytes_written > 0, "{report}");
        assert!(report.to_string().contains("(json payload)"), "{report}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["payload"], "json");
        assert_eq!(json["deflate"], false);
    }
    wait_for_no_connections(&server);
}

/// `--deflate` against a server without permessage-deflate (tokio-tungstenite 0.27
/// ignores the offer): every connection fails, and the error names the URL.
#[test]
fn deflate_refused_by_the_server_fails_the_run() {
    let url = format!("ws://{}/", tt_echo());
    let mut echo = EchoOptions::new(&url);
    echo.conns = 2;
    echo.common.deflate = true;
    let err = bench::echo(&echo, &Progress::hidden()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("2 of 2 connections"), "{text}");
    assert!(
        text.contains(&format!("{url}: server did not accept permessage-deflate")),
        "{text}"
    );
    let mut connect = ConnectOptions::new(&url);
    connect.conns = 2;
    connect.hold = 0.0;
    connect.common.deflate = true;
    let err = bench::connect(&connect, &Progress::hidden()).unwrap_err();
    assert!(
        err.to_string()
            .contains("server did not accept permessage-deflate"),
        "{err}"
    );
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
    options.common.threads = 2;
    options.common.server_pid = Some(std::process::id());
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

/// What the independent room server does wrong, to one message of step 1.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Message 10 of publisher 0 in step 1 reaches no one.
    Drop,
    /// Message 10 of publisher 0 in step 1 is held back and sent after message 11.
    Reorder,
}

/// The header `bench broadcast` puts in each message: (publisher, step, sequence).
fn header(data: &[u8]) -> Option<(u32, u32, u64)> {
    Some((
        u32::from_le_bytes(data.get(0..4)?.try_into().ok()?),
        u32::from_le_bytes(data.get(4..8)?.try_into().ok()?),
        u64::from_le_bytes(data.get(8..16)?.try_into().ok()?),
    ))
}

/// Runs `handle` for every connection accepted on a fresh loopback port, on a thread
/// of its own with a single-threaded tokio runtime; returns the address.
fn serve_on_thread<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                tokio::spawn(handle(stream, peer));
            }
        });
    });
    addr
}

/// A naive tokio-tungstenite room server: a shared map of senders, every message to
/// every other connection, with an optional fault.
fn tt_room(fault: Fault) -> SocketAddr {
    type Members = Arc<Mutex<HashMap<SocketAddr, UnboundedSender<Message>>>>;
    let members = Members::default();
    let held = Arc::new(Mutex::new(None::<Message>));
    serve_on_thread(move |stream, peer| {
        let (members, held) = (members.clone(), held.clone());
        async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            let (mut write, mut read) = ws.split();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            members.lock().unwrap().insert(peer, tx);
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if write.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(msg)) = read.next().await {
                if !msg.is_binary() {
                    continue;
                }
                let mut out = vec![msg.clone()];
                match (fault, header(&msg.clone().into_data())) {
                    (Fault::Drop, Some((0, 1, 10))) => out.clear(),
                    (Fault::Reorder, Some((0, 1, 10))) => {
                        *held.lock().unwrap() = Some(msg);
                        out.clear();
                    }
                    (Fault::Reorder, Some((0, 1, 11))) => {
                        out.extend(held.lock().unwrap().take());
                    }
                    _ => {}
                }
                for (addr, member) in members.lock().unwrap().iter() {
                    if *addr != peer {
                        for m in &out {
                            let _ = member.send(m.clone());
                        }
                    }
                }
            }
            members.lock().unwrap().remove(&peer);
        }
    })
}

/// A tokio-tungstenite echo server.
fn tt_echo() -> SocketAddr {
    serve_on_thread(|stream, _| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let (mut write, mut read) = ws.split();
        while let Some(Ok(msg)) = read.next().await {
            if (msg.is_text() || msg.is_binary()) && write.send(msg).await.is_err() {
                return;
            }
        }
    })
}

/// The small broadcast run against a fresh tokio-tungstenite room.
fn run_room(fault: Fault) -> bench::BroadcastReport {
    let url = format!("ws://{}/room", tt_room(fault));
    bench::broadcast(&small_broadcast(url), &Progress::hidden()).unwrap()
}

fn small_broadcast(url: String) -> BroadcastOptions {
    let mut options = BroadcastOptions::new(url);
    options.subs = 20;
    options.pubs = 2;
    options.rate = 200.0;
    options.warmup = 0.2;
    options.duration = 0.5;
    options.grace = 2.0;
    options.common.threads = 2;
    options.common.timeout = 5.0;
    options
}

/// Every message of every publisher reaches every subscriber once, in order, counted
/// and timed; the publishers are not counted as receivers.
fn assert_clean_broadcast(report: &bench::BroadcastReport) {
    assert_eq!(report.steps.len(), 1, "{report}");
    let step = &report.steps[0];
    // 200 msg/s for 0.7 s: 140 messages, each to 20 subscribers.
    assert_eq!(step.published, 140, "{report}");
    assert_eq!(step.expected, 140 * 20, "{report}");
    assert_eq!(step.delivered, step.expected, "{report}");
    assert_eq!(
        (step.lost, step.duplicated, step.reordered, step.malformed),
        (0, 0, 0, 0),
        "{report}"
    );
    assert!(step.window_deliveries > 0, "{report}");
    assert_eq!(step.latency_us.samples, step.window_deliveries, "{report}");
    assert!(step.latency_us.p50 > 0.0 && step.latency_us.p99 <= step.latency_us.max);
    // Each message due in the 0.5 s window (100 of them) has its publisher lag.
    let lag = &step.publish_lag_us;
    assert!((98..=102).contains(&lag.samples), "{report}");
    assert!(
        lag.p50 <= lag.p99 && lag.p99 <= lag.max && lag.max < 1e6,
        "{report}"
    );
    assert_eq!(step.verdict, Verdict::Pass, "{report}");
    assert!(report.is_clean() && report.failure().is_none(), "{report}");
    assert!(report.error_causes.is_empty(), "{report}");
}

/// ringsocket's `/broadcast` (on two workers, so that fan-out crosses cores).
#[test]
fn broadcast_through_ringsocket_rooms() {
    let server = start(|c| c.workers = 2);
    let mut options = small_broadcast(format!("ws://{}/broadcast", server.local_addr()));
    options.common.server_pid = Some(std::process::id());
    let report = bench::broadcast(&options, &Progress::hidden()).unwrap();
    assert_clean_broadcast(&report);
    assert!(
        report.steps[0].cpu_per_delivery.client_us.is_some(),
        "{report}"
    );
    wait_for_no_connections(&server);
}

/// `--rooms 2` on `/ws/bench-{room}` with `--sub-urls` naming the server twice (two
/// hosts): each subscriber gets its room's publishers' messages only, every one of
/// them, and each sub URL's latency is kept apart.
#[test]
fn broadcast_over_rooms_and_sub_urls() {
    let server = start(|c| c.workers = 2);
    let port = server.local_addr().port();
    let mut options = small_broadcast(format!("ws://127.0.0.1:{port}/ws/bench-{{room}}"));
    options.rooms = 2;
    options.pubs = 4;
    options.sub_urls = vec![
        format!("ws://127.0.0.1:{port}/ws/bench-{{room}}"),
        format!("ws://localhost:{port}/ws/bench-{{room}}"),
    ];
    let report = bench::broadcast(&options, &Progress::hidden()).unwrap();
    let step = &report.steps[0];
    // 200 msg/s over 4 publishers for 0.7 s: 35 each, 140 in all; each message goes
    // to the 10 subscribers of its room only.
    assert_eq!(step.published, 140, "{report}");
    assert_eq!(step.expected, 140 * 10, "{report}");
    assert_eq!(step.delivered, step.expected, "{report}");
    assert_eq!(
        (step.lost, step.duplicated, step.reordered, step.malformed),
        (0, 0, 0, 0),
        "{report}"
    );
    assert_eq!(step.latency_by_sub_url.len(), 2, "{report}");
    let by_url: u64 = step
        .latency_by_sub_url
        .iter()
        .map(|u| {
            assert!(u.latency_us.samples > 0, "{report}");
            u.latency_us.samples
        })
        .sum();
    assert_eq!(by_url, step.window_deliveries, "{report}");
    assert_eq!(step.verdict, Verdict::Pass, "{report}");
    let shown = report.to_string();
    assert!(
        shown.contains("2 rooms") && shown.contains("on ws://localhost:"),
        "{shown}"
    );
    wait_for_no_connections(&server);
}

/// `--payload json`: text messages with the header as hex digits, through ringsocket's
/// `/broadcast`, every one accounted for as with binary ones.
#[test]
fn broadcast_checks_json_payloads() {
    let server = start(|_| {});
    let mut options = small_broadcast(format!("ws://{}/broadcast", server.local_addr()));
    options.payload = Payload::Json;
    options.size = 256;
    let report = bench::broadcast(&options, &Progress::hidden()).unwrap();
    assert_clean_broadcast(&report);
    assert_eq!(report.payload, Payload::Json);
    assert!(
        report.to_string().contains("256 B JSON text messages"),
        "{report}"
    );
    wait_for_no_connections(&server);
}

/// `--v1`: subscribers on ringsocket's `/v1` (subprotocol `ringsocket.v1`, subscribed to
/// topic `broadcast`), publishers raw on `/broadcast` (on two workers, so that the
/// fan-out crosses cores); every publication's `data` is the bench's message, JSON as
/// sent and binary as base64, and every one is accounted for as with raw subscribers.
#[test]
fn broadcast_to_v1_subscribers() {
    let server = start(|c| c.workers = 2);
    for (payload, size) in [(Payload::Json, 256), (Payload::Pattern, 100)] {
        let mut options = small_broadcast(format!("ws://{}/broadcast", server.local_addr()));
        options.v1 = true;
        options.payload = payload;
        options.size = size;
        options.common.server_pid = Some(std::process::id());
        let report = bench::broadcast(&options, &Progress::hidden()).unwrap();
        assert_clean_broadcast(&report);
        let v1 = report.v1.as_ref().unwrap();
        assert_eq!(v1.url, format!("ws://{}/v1", server.local_addr()));
        assert_eq!(v1.topic, "broadcast");
        assert_eq!(report.steps[0].stale, 0, "{report}");
        assert!(
            report
                .to_string()
                .contains("subscribers: ringsocket.v1 on ws://"),
            "{report}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["v1"]["topic"], "broadcast");
    }
    wait_for_no_connections(&server);
}

/// `--v1` and `--topic` from the command line: a topic the room does not publish to
/// gets no message, and the bench names --topic; a raw room without `/v1` (the
/// tokio-tungstenite one, which chooses no subprotocol) fails every subscriber.
#[test]
fn v1_subscribers_from_the_command_line() {
    let server = start(|_| {});
    let room = format!("ws://{}/broadcast", server.local_addr());
    let small = [
        "--subs",
        "4",
        "--rate",
        "100",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--payload",
        "json",
        "--v1",
    ];
    let mut args = vec!["broadcast", room.as_str(), "--json"];
    args.extend(small);
    let out = ringsocket_bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["v1"]["url"],
        format!("ws://{}/v1", server.local_addr())
    );
    assert_eq!(json["steps"][0]["lost"], 0);
    assert_eq!(json["steps"][0]["malformed"], 0);
    assert!(json["steps"][0]["delivered"].as_u64().unwrap() > 0);

    let mut args = vec![
        "broadcast",
        room.as_str(),
        "--timeout",
        "0.5",
        "--topic",
        "elsewhere",
    ];
    args.extend(small);
    let out = ringsocket_bench(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("see --topic"), "{stderr}");

    let tt = format!("ws://{}/room", tt_room(Fault::None));
    let mut args = vec!["broadcast", tt.as_str()];
    args.extend(small);
    let out = ringsocket_bench(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not choose the subprotocol ringsocket.v1"),
        "{stderr}"
    );
    wait_for_no_connections(&server);
}

/// An independent server: a naive tokio-tungstenite room.
#[test]
fn broadcast_through_a_tokio_tungstenite_room() {
    let report = run_room(Fault::None);
    assert_clean_broadcast(&report);
}

/// A server that drops one message: every subscriber misses it, the run is not clean.
#[test]
fn dropped_message_is_reported_lost() {
    let report = run_room(Fault::Drop);
    let step = &report.steps[0];
    assert_eq!(step.lost, 20, "{report}");
    assert_eq!((step.duplicated, step.reordered), (0, 0), "{report}");
    assert_eq!(step.delivered, step.expected - 20, "{report}");
    assert_eq!(step.verdict, Verdict::Lost);
    assert!(!report.is_clean());
    assert!(report.failure().unwrap().contains("20 lost"), "{report}");
    assert!(report.to_string().contains("lost        20"), "{report}");
}

/// A server that swaps two messages: every subscriber sees one reordered, none lost.
#[test]
fn swapped_messages_are_reported_reordered() {
    let report = run_room(Fault::Reorder);
    let step = &report.steps[0];
    assert_eq!(step.reordered, 20, "{report}");
    assert_eq!((step.lost, step.duplicated), (0, 0), "{report}");
    assert_eq!(step.verdict, Verdict::Corrupted);
    assert!(!report.is_clean());
    assert!(
        report.failure().unwrap().contains("20 reordered"),
        "{report}"
    );
}

/// --ramp: steps double from --rate while they pass; the highest that passed is the
/// result. Bounded by --max-steps.
#[test]
fn ramp_doubles_while_steps_pass() {
    let addr = tt_room(Fault::None);
    let mut options = small_broadcast(format!("ws://{addr}/room"));
    options.ramp = true;
    options.rate = 50.0;
    options.warmup = 0.1;
    options.duration = 0.3;
    options.grace = 1.0;
    options.max_steps = 3;
    options.max_p99_ms = 2000.0;
    let report = bench::broadcast(&options, &Progress::hidden()).unwrap();
    let rates: Vec<f64> = report.steps.iter().map(|s| s.target_rate).collect();
    assert_eq!(rates, vec![50.0, 100.0, 200.0], "{report}");
    assert!(
        report.steps.iter().all(|s| s.verdict == Verdict::Pass),
        "{report}"
    );
    assert_eq!(report.max_loss_free_rate, Some(200.0), "{report}");
    assert!(report.is_clean());
    assert!(
        report
            .to_string()
            .contains("highest rate without loss: 200 msg/s")
    );
}

/// A URL that is not a room (an echo endpoint): the subscribers never hear the
/// publishers, and the bench says so instead of reporting everything lost.
#[test]
fn broadcast_to_a_non_room_is_refused() {
    let server = start(|_| {});
    let mut options = small_broadcast(echo_url(&server));
    options.common.timeout = 0.5;
    let err = bench::broadcast(&options, &Progress::hidden()).unwrap_err();
    assert!(matches!(err, BenchError::Scenario(_)), "{err}");
    assert!(err.to_string().contains("is it a room"), "{err}");
}

fn ringsocket_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringsocket"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// The command: `--compare` runs each server in turn and prints a table with ratios;
/// with `--json`, one JSON document with every report and the ratios; `--plot` writes
/// an SVG with one curve per server.
#[test]
fn compare_json_and_plot_from_the_command_line() {
    let server = start(|_| {});
    let ours = echo_url(&server);
    let theirs = format!("ws://{}/", tt_echo());
    let dir = std::env::temp_dir().join(format!("ringsocket-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("echo.svg");
    let small = [
        "--conns",
        "4",
        "--inflight",
        "2",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
    ];

    let mut args = vec!["echo", ours.as_str()];
    args.extend(small);
    args.extend(["--compare", theirs.as_str(), "--json", "--plot"]);
    args.push(svg.to_str().unwrap());
    let out = ringsocket_bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mode"], "echo");
    assert_eq!(json["runs"].as_array().unwrap().len(), 2);
    assert_eq!(json["runs"][1]["url"], theirs.as_str());
    assert!(json["runs"][1]["report"]["messages"].as_u64().unwrap() > 0);
    let rate = &json["figures"][0];
    assert_eq!(rate["name"], "messages/s");
    assert_eq!(rate["ratios"][0], 1.0);
    let (a, b) = (
        rate["values"][0].as_f64().unwrap(),
        rate["values"][1].as_f64().unwrap(),
    );
    assert!((rate["ratios"][1].as_f64().unwrap() - b / a).abs() < 1e-9);

    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let curves: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .collect();
    assert_eq!(curves.len(), 2);
    assert!(text.contains(&theirs));

    // The table, and a broadcast comparison (two rooms) in JSON.
    let mut args = vec!["echo", ours.as_str()];
    args.extend(small);
    args.extend(["--compare", theirs.as_str()]);
    let out = ringsocket_bench(&args);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("[2] ws://"), "{table}");
    assert!(table.contains("messages/s (higher better)"), "{table}");
    assert!(table.contains('×'), "{table}");

    let room = format!("ws://{}/broadcast", server.local_addr());
    let tt = format!("ws://{}/room", tt_room(Fault::None));
    let out = ringsocket_bench(&[
        "broadcast",
        &room,
        "--subs",
        "5",
        "--rate",
        "100",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--compare",
        &tt,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mode"], "broadcast");
    assert_eq!(json["runs"][1]["report"]["steps"][0]["lost"], 0);
    assert_eq!(json["figures"][0]["name"], "deliveries/s");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--payload json` from the command line, against `ringsocket serve`'s `/echo`, with
/// the report in JSON.
#[test]
fn json_payload_from_the_command_line() {
    let server = start(|_| {});
    let url = echo_url(&server);
    let out = ringsocket_bench(&[
        "echo",
        &url,
        "--conns",
        "2",
        "--inflight",
        "2",
        "--size",
        "500",
        "--payload",
        "json",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["payload"], "json");
    assert_eq!(json["deflate"], false);
    assert_eq!(json["mismatches"], 0);
    assert!(json["messages"].as_u64().unwrap() > 0);
    assert!(json["wire_bytes_read"].as_u64().unwrap() >= json["payload_bytes"].as_u64().unwrap());

    let out = ringsocket_bench(&["echo", &url, "--payload", "json", "--size", "22"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--size must be at least 23"), "{stderr}");
    wait_for_no_connections(&server);
}

/// A lossy room makes the command exit non-zero, after printing the report.
#[test]
fn lossy_room_fails_the_command() {
    let room = format!("ws://{}/room", tt_room(Fault::Drop));
    let out = ringsocket_bench(&[
        "broadcast",
        &room,
        "--subs",
        "3",
        "--rate",
        "100",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
    ]);
    assert!(!out.status.success());
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("lost        3"), "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 lost"), "{stderr}");
}

/// `--compare-pids` needs one pid per `--compare` URL; the bench says so before running.
#[test]
fn compare_pids_must_match_the_urls() {
    let out = ringsocket_bench(&[
        "echo",
        "ws://127.0.0.1:1/",
        "--compare",
        "ws://127.0.0.1:2/",
        "--compare-pids",
        "1",
        "2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--compare-pids: 2 pids for 1 --compare URLs"),
        "{stderr}"
    );
}
