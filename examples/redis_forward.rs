//! Forwarding throughput of the Redis broker: 64-byte messages published on broker A,
//! received by broker B through a throwaway `redis-server`, with pipelining.
//!
//! ```sh
//! cargo build --release --example redis_forward
//! taskset -c 1 target/release/examples/redis_forward [messages] [runs]
//! ```
//!
//! `redis-server` is pinned to core 0 (`taskset -pc 0`); run the example itself on
//! another core. Prints messages/s per run and the median. The producer keeps the
//! publish queue below its capacity, so nothing is dropped: a run that lost messages
//! says so.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/redis.rs"]
mod redis_server;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringsocket::broker::redis::{RedisBroker, RedisConfig};
use ringsocket::broker::{Accepted, Broker, BrokerSink, Kind};

const PAYLOAD: usize = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let messages: u64 = args.next().map_or(500_000, |a| a.parse().unwrap());
    let runs: usize = args.next().map_or(5, |a| a.parse().unwrap());

    let server = redis_server::RedisServer::start();
    let pid = server.pid().unwrap().to_string();
    let pinned = Command::new("taskset")
        .args(["-pc", "0", &pid])
        .output()
        .is_ok_and(|o| o.status.success());
    println!(
        "redis-server pid {pid} {}",
        if pinned {
            "pinned to core 0"
        } else {
            "not pinned (taskset failed)"
        }
    );

    let received = Arc::new(AtomicU64::new(0));
    let sink: BrokerSink = {
        let received = received.clone();
        Arc::new(move |message| {
            debug_assert_eq!(message.payload.len(), PAYLOAD);
            received.fetch_add(1, Ordering::Relaxed);
            Accepted::Delivered
        })
    };
    let config = RedisConfig::new(server.url());
    let capacity = config.publish_queue;
    let a = RedisBroker::start(config.clone(), Arc::new(|_| Accepted::Delivered)).unwrap();
    let b = RedisBroker::start(config, sink).unwrap();
    b.subscribe("bench");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metrics().subscriptions.load(Ordering::Relaxed) != 1
        || a.metrics().connected.load(Ordering::Relaxed) != 1
    {
        assert!(Instant::now() < deadline, "brokers did not connect");
        std::thread::sleep(Duration::from_millis(1));
    }

    let payload = Bytes::from(vec![0xA5; PAYLOAD]);
    // The cost on the caller (an I/O core): publishes into a queue with room, timed
    // without waiting for delivery.
    let burst = (capacity / 2) as u64;
    let wait_received = |count: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.load(Ordering::Relaxed) < count {
            assert!(Instant::now() < deadline, "messages were lost");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut costs = Vec::new();
    for run in 0..runs as u64 {
        wait_received(run * burst);
        let started = Instant::now();
        for _ in 0..burst {
            a.publish("bench", Kind::Binary, payload.clone()).unwrap();
        }
        costs.push(started.elapsed().as_nanos() as f64 / burst as f64);
    }
    wait_received(runs as u64 * burst);
    costs.sort_by(f64::total_cmp);
    println!(
        "publish() on the caller: median {:.0} ns per call \
         ({burst} calls into a queue with room, {runs} runs)",
        costs[costs.len() / 2]
    );

    let mut rates = Vec::new();
    for run in 0..runs {
        let before = received.load(Ordering::Relaxed);
        let failed_before = a.metrics().publish_failed.load(Ordering::Relaxed);
        let started = Instant::now();
        for _ in 0..messages {
            // Sleep rather than spin: the broker's threads share this core.
            while a.queued() >= capacity - 1 {
                std::thread::sleep(Duration::from_micros(100));
            }
            // A refusal (backlog full) is counted in publish_failed, printed below.
            let _ = a.publish("bench", Kind::Binary, payload.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.load(Ordering::Relaxed) - before < messages {
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        let got = received.load(Ordering::Relaxed) - before;
        let failed = a.metrics().publish_failed.load(Ordering::Relaxed) - failed_before;
        let rate = got as f64 / elapsed.as_secs_f64();
        println!(
            "run {run}: {got}/{messages} messages in {:.3} s = {:.0} msg/s ({failed} failed)",
            elapsed.as_secs_f64(),
            rate
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median {:.0} msg/s of {PAYLOAD}-byte messages A -> Redis -> B over {runs} runs",
        rates[rates.len() / 2]
    );
    a.shutdown();
    b.shutdown();
}
