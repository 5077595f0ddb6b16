//! A throwaway `redis-server` on a free loopback port: no persistence, stopped on Drop,
//! and stoppable and restartable on the same port mid-test.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server has to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process. Ready means it answers `INFO` with its own pid (so a
/// server that already held the port is not mistaken for it).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`. Panics with
    /// how to install `redis-server` if it is not on PATH.
    pub fn start() -> Self {
        // Between probing a free port and redis binding it another process may take it:
        // then try another one.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self { port, child: None };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port, the same across [`RedisServer::stop`] and [`RedisServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs (e.g. to pin it to a core).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server and waits for it to exit: its clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// A plain client connection, for commands the test sends itself.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = spawn_quiet(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--dir", &std::env::temp_dir().to_string_lossy()]),
        );
        self.child = Some(await_ready(child, self.port, READY_TIMEOUT)?);
        Ok(())
    }
}

/// Waits until the `redis-server` `child` answers on `port` (`INFO` with its own pid,
/// so a server that already held the port is not mistaken for it); kills it on
/// failure.
/// Runs the `redis-server` command `command` with no input or output, failing the test
/// with what to install when it is not on `PATH`.
pub fn spawn_quiet(command: &mut Command) -> Child {
    let spawned = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not on PATH; install it (Debian/Ubuntu: `apt install redis-server`)"
        ),
        Err(e) => panic!("cannot run redis-server: {e}"),
    }
}

pub fn await_ready(mut child: Child, port: u16, timeout: Duration) -> Result<Child, String> {
    let deadline = Instant::now() + timeout;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} (port {port} taken?)"));
        }
        let info = client
            .get_connection_with_timeout(Duration::from_millis(200))
            .and_then(|mut con| redis::cmd("INFO").arg("server").query::<String>(&mut con));
        if info.is_ok_and(|info| info.contains(&format!("process_id:{}\r\n", child.id()))) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
