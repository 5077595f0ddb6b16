//! The server for the background-task benchmark (issue #5): `/echo` for
//! `ringsocket bench echo`, and `POST /job`, which schedules one CPU-heavy job (50 ms of
//! SHA-1 hashing, measured in the thread's CPU time) on the executor, or with
//! `?inline=1` runs it inline on the I/O core, the naive way, before answering.
//!
//! ```text
//! cargo run --release --example jobs_bench -- 127.0.0.1:9001 [--task-cpu N]
//! ```
//!
//! One worker (pinned to the first CPU the process may use) and one executor thread.
//! `--task-cpu N` pins the executor thread to CPU `N` (the job pins the thread it runs
//! on the first time), so the benchmark can say where it ran; `--task-nice N` sets
//! `task_nice` (default 0).

use std::sync::Arc;
use std::time::Duration;

use ringsocket::app::App;
use ringsocket::config::Config;
use ringsocket::runtime::{Response, Server};
use sha1::{Digest, Sha1};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU time each job spends hashing.
const JOB_CPU: Duration = Duration::from_millis(50);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut config = Config::default();
    config.workers = 1;
    config.task_threads = 1;
    let mut task_cpu: Option<usize> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--task-cpu" => task_cpu = Some(args.next().ok_or("--task-cpu N")?.parse()?),
            "--task-nice" => config.task_nice = args.next().ok_or("--task-nice N")?.parse()?,
            addr => config.bind = addr.parse()?,
        }
    }
    let app = App::echo().post("/job", move |req| async move {
        if req.head().query() == Some("inline=1") {
            let digest = hash_for(JOB_CPU);
            return Response::text(200, format!("{:02x}\n", digest[0]));
        }
        let queued = req.tasks().add("hash-50ms", move || {
            if let Some(cpu) = task_cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
            std::hint::black_box(hash_for(JOB_CPU));
        });
        match queued {
            Ok(()) => Response::text(202, "queued\n"),
            Err(e) => Response::error(503, &e.to_string()),
        }
    });
    let server = Server::start(config, Arc::new(app))?;
    println!(
        "jobs_bench on ws://{}/echo and POST /job",
        server.local_addr()
    );
    // Drains the background queue within `shutdown_timeout_secs` before returning.
    server.run_until_signalled()?;
    Ok(())
}

/// Hashes 4 KiB blocks until this thread has used `budget` of CPU time.
fn hash_for(budget: Duration) -> [u8; 20] {
    let start = thread_cpu_time();
    let block = [0x5au8; 4096];
    let mut digest = [0u8; 20];
    while thread_cpu_time().saturating_sub(start) < budget {
        for _ in 0..16 {
            let mut hasher = Sha1::new();
            hasher.update(digest);
            hasher.update(block);
            digest = hasher.finalize().into();
        }
    }
    digest
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always
    // available on Linux and the call writes only to `ts`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
