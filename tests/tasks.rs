//! Background tasks: the executor on its own (exactly once, panics, a full queue,
//! shutdown drain) and through the server (jobs of an HTTP handler start only after the
//! response is on the socket, queue-full policies, WebSocket jobs, drain on shutdown).
//!
//! Jobs that must wait do so on channels the test controls; every wait is bounded by
//! `PATIENCE`. HTTP requests use `Connection: close` and a blocking `TcpStream`, so a
//! response is everything read until EOF.
#![allow(clippy::unwrap_used)]

mod common;
use common::start;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded, unbounded};
use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::proto::Message;
use ringsocket::runtime::{Response, RunningServer};
use ringsocket::tasks::{Executor, QueueFullPolicy, SpawnError, TaskHandle};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The longest any single wait may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

// ---- the executor on its own -----------------------------------------------------------

/// 10,000 jobs, half closures and half futures, over two threads: each runs once.
#[test]
fn ten_thousand_jobs_all_run_exactly_once() {
    const N: usize = 10_000;
    let executor = Executor::start(2, N).unwrap();
    let tasks = executor.handle();
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    for i in 0..N {
        let runs = runs.clone();
        let queued = if i % 2 == 0 {
            tasks.spawn("count", move || {
                runs[i].fetch_add(1, Ordering::Relaxed);
            })
        } else {
            tasks.spawn_async("count-async", async move {
                tokio::task::yield_now().await;
                runs[i].fetch_add(1, Ordering::Relaxed);
            })
        };
        assert_eq!(queued, Ok(()), "job {i}");
    }
    let report = executor.shutdown(PATIENCE);
    assert_eq!(report.abandoned, 0, "{report:?}");
    let wrong: Vec<_> = (0..N)
        .filter(|i| runs[*i].load(Ordering::Relaxed) != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} jobs not run exactly once, the first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(tasks.metrics().done(), N as u64);
    assert_eq!(tasks.metrics().queued(), 0);
    assert_eq!(tasks.metrics().running(), 0);
}

/// A job that panics (closure or future) is counted as failed; the thread runs the next.
#[test]
fn a_panicking_job_does_not_stop_the_ones_after_it() {
    let executor = Executor::start(1, 16).unwrap();
    let tasks = executor.handle();
    let (tx, rx) = unbounded();
    tasks.spawn("explodes", || panic!("boom")).unwrap();
    tasks
        .spawn_async("explodes-async", async { panic!("async boom") })
        .unwrap();
    let after = tx.clone();
    tasks
        .spawn("after", move || after.send("after").unwrap())
        .unwrap();
    tasks
        .spawn_async(
            "after-async",
            async move { tx.send("after-async").unwrap() },
        )
        .unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok("after"));
    assert_eq!(rx.recv_timeout(PATIENCE), Ok("after-async"));
    let report = executor.shutdown(PATIENCE);
    assert_eq!(report.abandoned, 0);
    assert_eq!(tasks.metrics().failed(), 2);
    assert_eq!(tasks.metrics().done(), 2);
}

/// With the thread busy and the queue at capacity, the next job is refused, counted,
/// and never runs; the queued ones still do.
#[test]
fn a_full_queue_refuses_the_job_and_counts_it() {
    let executor = Executor::start(1, 2).unwrap();
    let tasks = executor.handle();
    let (started, release) = blocker(&tasks);
    started.recv_timeout(PATIENCE).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let ran = ran.clone();
        let queued = tasks.spawn("queued", move || {
            ran.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(queued, Ok(()));
    }
    let refused_ran = ran.clone();
    let refused = tasks.spawn("one-too-many", move || {
        refused_ran.fetch_add(100, Ordering::SeqCst);
    });
    assert_eq!(refused, Err(SpawnError::QueueFull));
    assert_eq!(tasks.metrics().rejected_total(), 1);
    assert_eq!(tasks.metrics().queued(), 2);
    release.send(()).unwrap();
    let report = executor.shutdown(PATIENCE);
    assert_eq!(report.abandoned, 0);
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    // After shutdown nothing is taken.
    assert_eq!(tasks.spawn("late", || {}), Err(SpawnError::ShuttingDown));
}

/// Shutdown runs every queued job before it returns, and says how many finished.
#[test]
fn shutdown_drains_the_queue() {
    let executor = Executor::start(1, 100).unwrap();
    let tasks = executor.handle();
    let (started, release) = blocker(&tasks);
    started.recv_timeout(PATIENCE).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..50 {
        let ran = ran.clone();
        tasks
            .spawn_async("drained", async move {
                ran.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
    }
    let shutdown = std::thread::spawn(move || executor.shutdown(PATIENCE));
    // Shutdown has begun when new jobs are refused; only then let the blocker go.
    let deadline = Instant::now() + PATIENCE;
    while tasks.spawn("probe", || {}) != Err(SpawnError::ShuttingDown) {
        assert!(Instant::now() < deadline, "shutdown never started");
        std::thread::yield_now();
    }
    release.send(()).unwrap();
    let report = shutdown.join().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 50);
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(report.finished >= 51, "{report:?}");
}

/// Jobs that cannot finish by the deadline are abandoned and counted; shutdown returns
/// at the deadline, not when they end.
#[test]
fn shutdown_abandons_what_misses_the_deadline() {
    let executor = Executor::start(1, 100).unwrap();
    let tasks = executor.handle();
    let (started, release) = blocker(&tasks);
    started.recv_timeout(PATIENCE).unwrap();
    for _ in 0..5 {
        tasks.spawn("never-reached", || {}).unwrap();
    }
    let begun = Instant::now();
    let report = executor.shutdown(Duration::from_millis(200));
    let took = begun.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < PATIENCE,
        "{took:?}"
    );
    assert_eq!(report.finished, 0, "{report:?}");
    assert_eq!(report.abandoned, 6, "{report:?}");
    assert_eq!(tasks.metrics().abandoned_total(), 6);
    release.send(()).unwrap();
}

// ---- through the server ----------------------------------------------------------------

/// The client has the complete response before the job starts. The response (32 MiB)
/// is larger than the socket buffers can hold, so the server cannot finish writing it
/// until the client has read most of it: the job must not have started while the client
/// has read only the first bytes. It starts once the client has everything, then waits
/// on a signal the test gives.
#[test]
fn http_job_starts_only_after_the_response_is_written() {
    const BODY: usize = 32 << 20;
    let (started_tx, started) = unbounded::<()>();
    let (release, release_rx) = unbounded::<()>();
    let (done_tx, done) = unbounded::<()>();
    let app = App::new().post("/signup", move |req| {
        let (started_tx, release_rx, done_tx) =
            (started_tx.clone(), release_rx.clone(), done_tx.clone());
        async move {
            req.tasks()
                .add("welcome-email", move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv_timeout(PATIENCE).unwrap();
                    done_tx.send(()).unwrap();
                })
                .unwrap();
            Response::text(200, "x".repeat(BODY))
        }
    });
    let server = start(app, |_| {});
    let mut stream = send(&server, "POST", "/signup");
    let mut first = [0u8; 4096];
    let n = loop {
        match stream.read(&mut first) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => break read.unwrap(),
        }
    };
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    assert_eq!(
        started.try_recv(),
        Err(TryRecvError::Empty),
        "the job started before the response was written"
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let total = n + rest.len();
    assert!(total > BODY, "short response: {total} bytes");
    started.recv_timeout(PATIENCE).unwrap();
    assert_eq!(done.try_recv(), Err(TryRecvError::Empty));
    release.send(()).unwrap();
    done.recv_timeout(PATIENCE).unwrap();
}

/// A client that leaves before the response is written does not cancel the jobs: the
/// handler committed to them, so they run once the write has failed.
#[test]
fn http_job_runs_when_the_client_leaves_before_the_response_is_written() {
    let (ran_tx, ran) = unbounded::<()>();
    let app = App::new().post("/signup", move |req| {
        let ran_tx = ran_tx.clone();
        async move {
            req.tasks()
                .add("welcome-email", move || ran_tx.send(()).unwrap())
                .unwrap();
            Response::text(200, "x".repeat(32 << 20))
        }
    });
    let server = start(app, |_| {});
    let stream = send(&server, "POST", "/signup");
    drop(stream);
    ran.recv_timeout(PATIENCE).unwrap();
}

/// A handler that panics after adding a job gets 500 and its job never runs; the
/// dropped job is counted.
#[test]
fn jobs_of_a_panicking_handler_are_dropped_and_counted() {
    let (ran_tx, ran) = unbounded::<()>();
    let app = App::new().post("/boom", move |req| {
        let ran_tx = ran_tx.clone();
        async move {
            req.tasks()
                .add("never", move || ran_tx.send(()).unwrap())
                .unwrap();
            panic!("handler failed after scheduling");
        }
    });
    let server = start(app, |_| {});
    let response = http(&server, "POST", "/boom");
    assert!(response.starts_with("HTTP/1.1 500"), "{response}");
    assert_eq!(tasks_metric(&server, "ringsocket_tasks_rejected_total"), 1);
    server.shutdown();
    server.join().unwrap();
    assert_eq!(ran.try_recv(), Err(TryRecvError::Disconnected));
}

/// `Reject503` (the default): with the executor busy and the queue full, the request
/// gets 503 with `Retry-After` instead of the handler's 202, and its job never runs.
#[test]
fn full_queue_answers_503_under_the_reject_policy() {
    let response = third_job_request(QueueFullPolicy::Reject503);
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("Retry-After: 1"), "{response}");
}

/// `Drop`: the request keeps its 202; the refused job is counted and never runs.
#[test]
fn full_queue_drops_the_job_under_the_drop_policy() {
    let response = third_job_request(QueueFullPolicy::Drop);
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert!(response.ends_with("refused\n"), "{response}");
}

/// A WebSocket handler's job starts at once, while the connection is open, and can
/// report back to it through the handler.
#[tokio::test]
async fn websocket_job_starts_at_once() {
    let app = App::new().websocket("/ws", |ws| async move {
        ws.accept();
        while let Ok(message) = ws.recv().await {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let text = match &message {
                Message::Text(text) => text.as_str().to_uppercase(),
                _ => String::new(),
            };
            ws.tasks()
                .add("shout", move || {
                    let _ = tx.send(text);
                })
                .unwrap();
            if let Ok(reply) = rx.await {
                let _ = ws.send_text(reply);
            }
        }
    });
    let server = start(app, |_| {});
    let url = format!("ws://{}/ws", server.local_addr());
    let (mut client, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    client.send(WsMessage::text("hello")).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, WsMessage::text("HELLO"));
}

/// Shutting the server down runs the jobs its handlers scheduled before `join` returns.
#[test]
fn server_shutdown_drains_the_jobs() {
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let app = App::new().post("/job", move |req| {
        let ran = counter.clone();
        async move {
            req.tasks()
                .add("slow", move || {
                    // Work, not synchronisation: each job takes a while.
                    std::thread::sleep(Duration::from_millis(20));
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            Response::text(202, "queued\n")
        }
    });
    let server = start(app, |c| c.task_threads = 1);
    for _ in 0..20 {
        assert!(http(&server, "POST", "/job").starts_with("HTTP/1.1 202"));
    }
    server.shutdown();
    server.join().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 20);
}

/// `/metrics` has the executor's series.
#[test]
fn metrics_include_the_task_series() {
    let server = start(App::new(), |c| c.task_queue_capacity = 7);
    let text = http(&server, "GET", "/metrics");
    for series in [
        "ringsocket_tasks_queue_capacity 7",
        "ringsocket_tasks_queued 0",
        "ringsocket_tasks_running 0",
        "ringsocket_tasks_done_total 0",
        "ringsocket_tasks_failed_total 0",
        "ringsocket_tasks_rejected_total 0",
        "ringsocket_tasks_queue_wait_seconds_count 0",
    ] {
        assert!(text.contains(&format!("\n{series}\n")), "{series}: {text}");
    }
}

// ---- helpers ---------------------------------------------------------------------------

/// Queues a job that says it started, then waits for the returned sender (or
/// `PATIENCE`).
fn blocker(tasks: &TaskHandle) -> (Receiver<()>, Sender<()>) {
    let (started_tx, started) = bounded(1);
    let (release, release_rx) = bounded::<()>(1);
    tasks
        .spawn("blocker", move || {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(PATIENCE);
        })
        .unwrap();
    (started, release)
}

/// With one executor thread and a queue of one, makes three `POST /job` requests whose
/// jobs wait for a gate: the first job runs (and waits), the second fills the queue, the
/// third is refused under `policy`. Checks that the refusal was counted and that only
/// the first two jobs ever run, and returns the third response.
fn third_job_request(policy: QueueFullPolicy) -> String {
    let (release, release_rx) = unbounded::<()>();
    let (runs_tx, runs) = unbounded::<usize>();
    let (started_tx, started) = unbounded::<()>();
    let count = Arc::new(AtomicUsize::new(0));
    let app = App::new()
        .queue_full_policy(policy)
        .post("/job", move |req| {
            let (release_rx, runs_tx, started_tx) =
                (release_rx.clone(), runs_tx.clone(), started_tx.clone());
            let count = count.clone();
            async move {
                let queued = req.tasks().add("gated", move || {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = started_tx.send(());
                    let _ = release_rx.recv_timeout(PATIENCE);
                    runs_tx.send(n).unwrap();
                });
                Response::text(
                    202,
                    if queued.is_ok() {
                        "queued\n"
                    } else {
                        "refused\n"
                    },
                )
            }
        });
    let server = start(app, |c| {
        c.task_threads = 1;
        c.task_queue_capacity = 1;
    });
    let first = http(&server, "POST", "/job");
    assert!(first.starts_with("HTTP/1.1 202"), "{first}");
    started.recv_timeout(PATIENCE).unwrap();
    let second = http(&server, "POST", "/job");
    assert!(second.ends_with("queued\n"), "{second}");
    assert_eq!(server.tasks().metrics().queued(), 1);
    let third = http(&server, "POST", "/job");
    assert_eq!(tasks_metric(&server, "ringsocket_tasks_rejected_total"), 1);
    for _ in 0..3 {
        let _ = release.send(());
    }
    assert_eq!(runs.recv_timeout(PATIENCE), Ok(1));
    assert_eq!(runs.recv_timeout(PATIENCE), Ok(2));
    server.shutdown();
    server.join().unwrap();
    assert_eq!(runs.try_recv(), Err(TryRecvError::Disconnected));
    third
}

/// Sends a request with `Connection: close` and returns the stream to read from.
fn send(server: &RunningServer, method: &str, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

/// The whole response to one request, as text.
fn http(server: &RunningServer, method: &str, path: &str) -> String {
    let mut stream = send(server, method, path);
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// A `ringsocket_tasks_*` value from `/metrics`.
fn tasks_metric(server: &RunningServer, series: &str) -> u64 {
    let text = http(server, "GET", "/metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}
