//! A throwaway `nats-server -js` on a free loopback port with its own JetStream store
//! directory: stopped on Drop (the directory removed), and stoppable and restartable
//! on the same port and store mid-test (JetStream keeps what it stored).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server has to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server` child process. Ready means it answers with an `INFO` naming it
/// (`server_name`, unique per server) with JetStream on.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    name: String,
    store: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it answers. Panics with how to
    /// install `nats-server` if it is not on PATH.
    pub fn start() -> Self {
        let mut last_error = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let name = format!("rs-test-{}-{port}-{attempt}", std::process::id());
            let store = std::env::temp_dir().join(format!("ringsocket-{name}"));
            let mut server = Self {
                port,
                name,
                store,
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start: {last_error}");
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port, the same across [`NatsServer::stop`] and [`NatsServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits for it to exit: its clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store directory (what JetStream
    /// stored is still there), and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("nats-server did not restart on port {}: {e}", self.port);
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let spawned = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-sd", &self.store.to_string_lossy()])
            .args(["-n", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "nats-server is not on PATH; install it (Debian/Ubuntu: `apt install nats-server`)"
            ),
            Err(e) => panic!("cannot run nats-server: {e}"),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status} (port {} taken?)", self.port));
            }
            if self.info().is_some_and(|info| {
                info.contains(&format!("\"server_name\":\"{}\"", self.name))
                    && info.contains("\"jetstream\":true")
            }) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no INFO with JetStream within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's `INFO` line, if it answers.
    fn info(&self) -> Option<String> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        line.starts_with("INFO ").then_some(line)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
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
