//! A throwaway `redis-server` for the unit tests of the scripts (the integration tests
//! have their own, in `tests/common/redis.rs`).
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on a free loopback port, killed on drop.
pub(super) struct TestRedis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl TestRedis {
    /// Starts one and waits until it answers.
    pub(super) fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own directory: a test may turn the append-only file on.
        let dir = std::env::temp_dir().join(format!("ringsocket-unit-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not on PATH (apt install redis-server)");
        let redis = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Its own pid in `INFO`: not a server of another test that took the port.
            let info = redis
                .client()
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut con| redis::cmd("INFO").arg("server").query::<String>(&mut con));
            let pid = format!("process_id:{}\r\n", redis.child.id());
            if info.is_ok_and(|info| info.contains(&pid)) {
                return redis;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(super) fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub(super) fn con(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
