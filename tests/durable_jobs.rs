//! Durable background jobs (`App::job`, `tasks().enqueue`) on a real `redis-server`
//! started per test: a job answered 202 survives a SIGKILL of the server and runs
//! after a restart; it survives a shutdown whose deadline is too short (where an
//! in-memory job is lost); failures retry, then go to the dead-letter stream with the
//! error; a second process takes over the jobs of a killed one; Redis down → 503.
//!
//! The kill tests run the server in a child process: this test binary itself, running
//! the ignored test `child_server` with `DURABLE_JOBS_REDIS` set. Jobs report to Redis
//! lists (`test:started`, `test:ran`: `name pid attempt`), and gated jobs wait for the
//! key `test:release`, so that the test decides when they may end.
#![allow(clippy::unwrap_used)]

mod common;
use common::redis::RedisServer;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringsocket::app::App;
use ringsocket::runtime::{Response, RunningServer, Server};
use ringsocket::tasks::QueueFullPolicy;

/// The longest the tests wait for anything.
const PATIENCE: Duration = Duration::from_secs(20);

/// What a test job's payload says.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Work {
    name: String,
    /// Wait for `test:release` before finishing.
    #[serde(default)]
    gate: bool,
    /// Fail every run before this attempt number.
    #[serde(default)]
    fail_until: u32,
}

/// The test app: `POST /enqueue/{job}` enqueues the body as job `{job}` and answers
/// 202 with the id; `POST /memory` schedules the same gated work as an in-memory job.
fn app(redis_url: &str) -> App {
    let url = redis_url.to_owned();
    let memory_url = url.clone();
    App::new()
        .job("send_email", move |job| {
            let url = url.clone();
            async move {
                let work: Work = job.json().map_err(|e| e.to_string())?;
                perform(&url, &work, job.attempt()).await
            }
        })
        .job("explodes", |_job| async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            Ok::<(), String>(())
        })
        .post("/enqueue/{job}", |req| async move {
            let job: String = req.param("job").unwrap_or_default();
            match req.tasks().enqueue_bytes(&job, req.body().clone()).await {
                Ok(id) => Response::text(202, format!("{id}\n")),
                Err(e) => Response::error(503, &e.to_string()),
            }
        })
        // Fire and forget: the enqueue is not awaited, the handler answers 202 at once.
        .post("/fire/{job}", |req| async move {
            let job: String = req.param("job").unwrap_or_default();
            drop(req.tasks().enqueue_bytes(&job, req.body().clone()));
            Response::text(202, "queued\n")
        })
        // The same through a `TaskHandle`, as code that only has the handle does.
        .post("/fire-handle/{job}", |req| async move {
            let job: String = req.param("job").unwrap_or_default();
            let handle = req.tasks().handle();
            drop(handle.enqueue_bytes(&job, req.body().clone()));
            Response::text(202, "queued\n")
        })
        .post("/memory", move |req| {
            let url = memory_url.clone();
            async move {
                let work: Work = serde_json::from_slice(req.body()).unwrap_or_default();
                let queued = req.tasks().add_async("memory", async move {
                    let _ = perform(&url, &work, 1).await;
                });
                match queued {
                    Ok(()) => Response::text(202, "queued\n"),
                    Err(e) => Response::error(503, &e.to_string()),
                }
            }
        })
}

/// The work of a test job: say it started, wait for the gate, fail while asked to,
/// then say it ran.
async fn perform(url: &str, work: &Work, attempt: u32) -> Result<(), String> {
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let me = format!("{} {} {attempt}", work.name, std::process::id());
    let _: () = redis::cmd("RPUSH")
        .arg("test:started")
        .arg(&me)
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    if work.gate {
        let deadline = Instant::now() + 2 * PATIENCE;
        while !redis::cmd("EXISTS")
            .arg("test:release")
            .query::<bool>(&mut con)
            .map_err(|e| e.to_string())?
        {
            if Instant::now() > deadline {
                return Err("the gate never opened".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if attempt < work.fail_until {
        return Err(format!("smtp refused: 550 (attempt {attempt})"));
    }
    redis::cmd("RPUSH")
        .arg("test:ran")
        .arg(&me)
        .query::<()>(&mut con)
        .map_err(|e| e.to_string())
}

// ---- the tests -------------------------------------------------------------------------

/// Five jobs answered 202, two of them running and three waiting, when the server is
/// killed with SIGKILL: after a restart all five run, the two cut short counted as
/// their second attempt (the stream's delivery count), taken over after the
/// visibility timeout.
#[test]
fn a_job_answered_202_runs_after_the_server_is_killed_and_restarted() {
    let redis = RedisServer::start();
    let mut first = Child::start(&redis, 2);
    for i in 0..5 {
        let response = enqueue(first.addr, "send_email", &gated(&format!("job{i}")));
        assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    }
    wait_for("two jobs to start", || {
        (list(&redis, "test:started").len() == 2).then_some(())
    });
    first.kill();
    assert!(list(&redis, "test:ran").is_empty());
    open_gate(&redis);
    let second = Child::start(&redis, 2);
    let ran = wait_for("the five jobs to run", || {
        let ran = list(&redis, "test:ran");
        (ran.len() >= 5).then_some(ran)
    });
    let mut names: Vec<&str> = ran.iter().map(|r| r.split(' ').next().unwrap()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names, ["job0", "job1", "job2", "job3", "job4"], "{ran:?}");
    let pid = second.pid().to_string();
    assert!(
        ran.iter().all(|r| r.split(' ').nth(1) == Some(&pid)),
        "{ran:?}"
    );
    let second_attempts = ran.iter().filter(|r| r.ends_with(" 2")).count();
    assert_eq!(second_attempts, 2, "{ran:?}");
    assert_eq!(
        metric(second.addr, "ringsocket_jobs_reclaimed_total", "send_email"),
        2
    );
}

/// Both processes run the app; the one that took the gated job is killed; the other
/// takes it over and runs it (attempt 2).
#[test]
fn a_second_process_takes_over_the_jobs_of_a_killed_one() {
    let redis = RedisServer::start();
    let mut a = Child::start(&redis, 4);
    let mut b = Child::start(&redis, 4);
    let response = enqueue(a.addr, "send_email", &gated("takeover"));
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    let started = wait_for("the job to start", || list(&redis, "test:started").pop());
    let runner: u32 = started.split(' ').nth(1).unwrap().parse().unwrap();
    let survivor = if runner == a.pid() {
        a.kill();
        &b
    } else {
        assert_eq!(runner, b.pid(), "{started}");
        b.kill();
        &a
    };
    open_gate(&redis);
    let ran = wait_for("the job to run again", || list(&redis, "test:ran").pop());
    assert_eq!(ran, format!("takeover {} 2", survivor.pid()));
    assert_eq!(
        metric(
            survivor.addr,
            "ringsocket_jobs_reclaimed_total",
            "send_email"
        ),
        1
    );
    // Counted once the handler has returned, a moment after it said it ran.
    wait_for_metric(survivor.addr, "ringsocket_jobs_done_total", "send_email", 1);
}

/// A shutdown drain longer than the visibility timeout: the running job's claim is
/// renewed all along, so another process does not take it over (and run it a second
/// time); it finishes in the process that is shutting down, once.
#[test]
fn claims_are_renewed_while_a_shutdown_drains() {
    const VISIBILITY: u64 = 3;
    let redis = RedisServer::start();
    let first = start(&redis, |c| {
        c.shutdown_timeout_secs = 30.0;
        c.job_visibility_timeout_secs = VISIBILITY;
    });
    let response = enqueue(first.local_addr(), "send_email", &gated("drained"));
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    wait_for("the job to start", || {
        (list(&redis, "test:started").len() == 1).then_some(())
    });
    // Started after the job was taken: it can only get it by taking it over.
    let second = start(&redis, |c| c.job_visibility_timeout_secs = VISIBILITY);
    first.shutdown();
    let joined = std::thread::spawn(move || first.join());
    // Two and a half visibility timeouts of drain: without renewals the second
    // process takes the job over within one.
    std::thread::sleep(Duration::from_millis(VISIBILITY * 2500));
    assert_eq!(
        list(&redis, "test:started").len(),
        1,
        "taken over mid-drain"
    );
    assert_eq!(
        metric(
            second.local_addr(),
            "ringsocket_jobs_reclaimed_total",
            "send_email"
        ),
        0
    );
    open_gate(&redis);
    joined.join().unwrap().unwrap();
    let ran = list(&redis, "test:ran");
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].starts_with("drained "), "{ran:?}");
    wait_for_len(&redis, "ringsocket:jobs:{send_email}", 0);
    assert_eq!(list(&redis, "test:started").len(), 1);
}

/// A shutdown whose deadline passes while jobs still wait: the in-memory jobs are
/// lost (what happens without the durable queue), the durable ones stay in Redis,
/// released, and the next server runs every one of them, although the visibility
/// timeout (60 s) is far longer than the test waits.
#[test]
fn durable_jobs_survive_a_shutdown_whose_deadline_is_too_short() {
    const N: usize = 8;
    let redis = RedisServer::start();
    let server = start(&redis, |c| {
        c.shutdown_timeout_secs = 0.3;
        c.job_concurrency = 3;
        c.job_visibility_timeout_secs = 60;
    });
    for i in 0..N {
        let durable = enqueue(
            server.local_addr(),
            "send_email",
            &gated(&format!("durable{i}")),
        );
        assert!(durable.starts_with("HTTP/1.1 202"), "{durable}");
        let memory = post(
            server.local_addr(),
            "/memory",
            &gated(&format!("memory{i}")),
        );
        assert!(memory.starts_with("HTTP/1.1 202"), "{memory}");
    }
    wait_for("jobs to start", || {
        let started = list(&redis, "test:started");
        started
            .iter()
            .any(|s| s.starts_with("durable"))
            .then_some(())
    });
    let tasks = server.tasks();
    server.shutdown();
    server.join().unwrap();
    assert!(
        tasks.metrics().abandoned_total() > 0,
        "the deadline was met: nothing to show"
    );
    open_gate(&redis);
    let again = start(&redis, |c| c.job_visibility_timeout_secs = 60);
    let ran = wait_for("every durable job to run", || {
        let ran = list(&redis, "test:ran");
        let durable = ran.iter().filter(|r| r.starts_with("durable")).count();
        (durable >= N).then_some(ran)
    });
    let mut durable: Vec<&str> = ran
        .iter()
        .filter_map(|r| r.split(' ').next().filter(|n| n.starts_with("durable")))
        .collect();
    durable.sort_unstable();
    durable.dedup();
    assert_eq!(durable.len(), N, "{ran:?}");
    // Lost: the in-memory jobs were abandoned at the deadline and nothing remembers them.
    assert!(!ran.iter().any(|r| r.starts_with("memory")), "{ran:?}");
    let _ = again;
}

/// A job that fails every run is retried with backoff, then moved to the dead-letter
/// stream with its error, attempts and payload; one that fails once succeeds on its
/// second run; a panic is an error too.
#[test]
fn failures_retry_then_go_to_the_dead_letter_stream_with_the_error() {
    let redis = RedisServer::start();
    let server = start(&redis, |c| {
        c.job_max_attempts = 3;
        c.job_retry_backoff_ms = 20;
    });
    let addr = server.local_addr();
    let doomed = Work {
        name: "doomed".into(),
        fail_until: 99,
        ..Work::default()
    };
    let payload = serde_json::to_string(&doomed).unwrap();
    assert!(enqueue(addr, "send_email", &payload).starts_with("HTTP/1.1 202"));
    let recovers = serde_json::to_string(&Work {
        name: "recovers".into(),
        fail_until: 2,
        ..Work::default()
    })
    .unwrap();
    assert!(enqueue(addr, "send_email", &recovers).starts_with("HTTP/1.1 202"));
    assert!(enqueue(addr, "explodes", "{}").starts_with("HTTP/1.1 202"));
    let dead = wait_for("the doomed job's dead letter", || {
        dead_letters(&redis, "ringsocket:jobs:{send_email}:dead").pop()
    });
    assert_eq!(field(&dead, "job"), "send_email");
    assert_eq!(field(&dead, "attempts"), "3");
    assert_eq!(field(&dead, "error"), "smtp refused: 550 (attempt 3)");
    assert_eq!(field(&dead, "payload"), payload);
    let exploded = wait_for("the panicking job's dead letter", || {
        dead_letters(&redis, "ringsocket:jobs:{explodes}:dead").pop()
    });
    assert_eq!(field(&exploded, "error"), "panicked: boom");
    let ran = wait_for("the recovering job to run", || {
        list(&redis, "test:ran")
            .into_iter()
            .find(|r| r.starts_with("recovers"))
    });
    assert!(ran.ends_with(" 2"), "{ran}");
    // Counted as the writer's replies come back, a moment after Redis has them.
    wait_for_metric(addr, "ringsocket_jobs_done_total", "send_email", 1);
    wait_for_metric(addr, "ringsocket_jobs_enqueued_total", "send_email", 2);
    wait_for_metric(addr, "ringsocket_jobs_failed_total", "send_email", 4);
    wait_for_metric(addr, "ringsocket_jobs_retried_total", "send_email", 3);
    wait_for_metric(addr, "ringsocket_jobs_dead_lettered_total", "send_email", 1);
    wait_for_metric(addr, "ringsocket_jobs_dead_lettered_total", "explodes", 1);
    // Nothing is left in the job streams: settled entries are deleted (by the
    // writer's settle script, a moment after the counters).
    wait_for_len(&redis, "ringsocket:jobs:{send_email}", 0);
    wait_for_len(&redis, "ringsocket:jobs:{explodes}", 0);
}

/// Redis unreachable: the request is answered 503 with `Retry-After`, not 202, and
/// the refusal is counted; once Redis is back, jobs are taken again and run.
#[test]
fn redis_down_answers_503() {
    let mut redis = RedisServer::start();
    let server = start(&redis, |_| {});
    let addr = server.local_addr();
    redis.stop();
    let response = enqueue(addr, "send_email", &plain("lost"));
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("Retry-After: 1"), "{response}");
    assert!(
        response.contains("durable job queue unavailable"),
        "{response}"
    );
    assert_eq!(
        metric(addr, "ringsocket_jobs_enqueue_failed_total", "send_email"),
        1
    );
    redis.restart();
    wait_for("Redis to take jobs again", || {
        enqueue(addr, "send_email", &plain("back"))
            .starts_with("HTTP/1.1 202")
            .then_some(())
    });
    let ran = wait_for("the job to run", || list(&redis, "test:ran").pop());
    assert!(ran.starts_with("back "), "{ran}");
}

/// Under `QueueFullPolicy::Drop` too, an enqueue that failed is never answered with
/// the handler's 202, also when the handler did not await it, and when it enqueued
/// through a `TaskHandle`.
#[test]
fn a_failed_enqueue_is_never_answered_202() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let app = app(&url).queue_full_policy(QueueFullPolicy::Drop);
    let server = common::start(app, |c| c.jobs_redis_url = url.clone());
    let addr = server.local_addr();
    redis.stop();
    for path in ["/fire/send_email", "/fire-handle/send_email"] {
        let response = post(addr, path, &plain("lost"));
        assert!(response.starts_with("HTTP/1.1 503"), "{path}: {response}");
        assert!(response.contains("Retry-After: 1"), "{path}: {response}");
    }
    redis.restart();
    wait_for("Redis to take jobs again", || {
        post(addr, "/fire-handle/send_email", &plain("back"))
            .starts_with("HTTP/1.1 202")
            .then_some(())
    });
    let ran = wait_for("the job to run", || list(&redis, "test:ran").pop());
    assert!(ran.starts_with("back "), "{ran}");
}

/// `redis_url` is a Redis Cluster and `jobs_redis_url` is not set: the server does
/// not start, and says that jobs need a single Redis and what to set.
#[test]
fn jobs_on_a_redis_cluster_url_refuse_to_start_and_say_why() {
    let mut config = common::config();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.redis_url = "redis://127.0.0.1:1,redis://127.0.0.1:2".into();
    config.redis_cluster = true;
    let err = Server::start(config, Arc::new(app("redis://127.0.0.1:1")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("jobs_redis_url"), "{err}");
    assert!(err.contains("single Redis"), "{err}");
}

/// An unknown job name is a programmer's error: 500, not a 202 for nothing.
#[test]
fn an_unknown_job_is_refused() {
    let redis = RedisServer::start();
    let server = start(&redis, |_| {});
    let response = enqueue(server.local_addr(), "no_such_job", "{}");
    assert!(response.starts_with("HTTP/1.1 500"), "{response}");
    assert!(response.contains("no durable job named"), "{response}");
}

/// An app with jobs and no Redis does not start, and says what to set.
#[test]
fn jobs_without_redis_refuse_to_start() {
    let mut config = common::config();
    config.bind = "127.0.0.1:0".parse().unwrap();
    let err = Server::start(config, Arc::new(app("redis://127.0.0.1:1"))).unwrap_err();
    assert!(err.to_string().contains("jobs_redis_url"), "{err}");
}

/// The server process of the kill tests (see the module docs); does nothing when run
/// on its own.
#[test]
#[ignore = "the child process of the kill tests"]
fn child_server() {
    let Ok(url) = std::env::var("DURABLE_JOBS_REDIS") else {
        return;
    };
    let mut config = common::config();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 1;
    config.jobs_redis_url = url.clone();
    // Well above a renewal's round trip on a loaded machine (renewed every third).
    config.job_visibility_timeout_secs = 3;
    config.job_concurrency = std::env::var("DURABLE_JOBS_CONCURRENCY")
        .unwrap()
        .parse()
        .unwrap();
    let server = Server::start(config, Arc::new(app(&url))).unwrap();
    println!("LISTENING {}", server.local_addr());
    server.run_until_signalled().unwrap();
}

// ---- helpers ---------------------------------------------------------------------------

/// A server in this process on `redis` (the jobs' Redis only: no broker).
fn start(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut ringsocket::config::Config),
) -> RunningServer {
    let url = redis.url();
    common::start(app(&url), |c| {
        c.jobs_redis_url = url.clone();
        tweak(c);
    })
}

/// A server in a child process, killed on drop.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Child {
    fn start(redis: &RedisServer, concurrency: usize) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "child_server",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DURABLE_JOBS_REDIS", redis.url())
            .env("DURABLE_JOBS_CONCURRENCY", concurrency.to_string())
            .env_remove("RINGSOCKET_BIN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Read on a thread, so that a child that never listens fails the test instead
        // of hanging it; the thread goes on reading so that the child never blocks on
        // a full pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest writes the test's name before it, on the same line.
                if let Some((_, addr)) = line.split_once("LISTENING ") {
                    let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = rx
            .recv_timeout(PATIENCE)
            .expect("the child server did not listen");
        Self { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

fn gated(name: &str) -> String {
    serde_json::to_string(&Work {
        name: name.into(),
        gate: true,
        ..Work::default()
    })
    .unwrap()
}

fn plain(name: &str) -> String {
    serde_json::to_string(&Work {
        name: name.into(),
        ..Work::default()
    })
    .unwrap()
}

fn open_gate(redis: &RedisServer) {
    let mut con = redis.client();
    redis::cmd("SET")
        .arg("test:release")
        .arg(1)
        .query::<()>(&mut con)
        .unwrap();
}

fn enqueue(addr: SocketAddr, job: &str, body: &str) -> String {
    post(addr, &format!("/enqueue/{job}"), body)
}

/// One request with `Connection: close`; the whole response.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn post(addr: SocketAddr, path: &str, body: &str) -> String {
    request(addr, "POST", path, body)
}

/// The value of `series{job="…"}` in `/metrics`.
fn metric(addr: SocketAddr, series: &str, job: &str) -> u64 {
    let text = request(addr, "GET", "/metrics", "");
    let prefix = format!("{series}{{job=\"{job}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

fn list(redis: &RedisServer, key: &str) -> Vec<String> {
    let mut con = redis.client();
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap()
}

/// The entries of a dead-letter stream, as field-value pairs.
fn dead_letters(redis: &RedisServer, key: &str) -> Vec<Vec<(String, String)>> {
    let mut con = redis.client();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    entries.into_iter().map(|(_, fields)| fields).collect()
}

fn field<'a>(entry: &'a [(String, String)], name: &str) -> &'a str {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no field {name} in {entry:?}"))
}

/// Waits until `series{job="…"}` is `value`.
fn wait_for_metric(addr: SocketAddr, series: &str, job: &str, value: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = metric(addr, series, job);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series}{{job={job:?}}} is {now}, not {value}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until stream `key` holds `len` entries.
fn wait_for_len(redis: &RedisServer, key: &str, len: u64) {
    let deadline = Instant::now() + PATIENCE;
    let mut con = redis.client();
    loop {
        let now: u64 = redis::cmd("XLEN").arg(key).query(&mut con).unwrap();
        if now == len {
            return;
        }
        assert!(Instant::now() < deadline, "XLEN {key} is {now}, not {len}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `probe` until it returns `Some`, for at most `PATIENCE`.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
