//! A throwaway 3-master Redis Cluster: three `redis-server --cluster-enabled yes` on
//! free loopback ports in a temporary directory, joined with `redis-cli --cluster
//! create`, no persistence, stopped (and the directory removed) on Drop. A master can
//! be stopped and restarted on its port (it rejoins from its cluster config file,
//! empty), and a slot can be moved from one master to another.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a starting cluster has to reach `cluster_state:ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Masters in the cluster.
pub const MASTERS: usize = 3;

/// The cluster. Nodes are numbered 0, 1, 2 in the order of [`RedisCluster::ports`].
#[derive(Debug)]
pub struct RedisCluster {
    dir: PathBuf,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl RedisCluster {
    /// Starts three masters and creates the cluster (slots split evenly, no replicas);
    /// returns once every node reports `cluster_state:ok`. Panics with how to install
    /// Redis if `redis-server` or `redis-cli` is not on PATH.
    pub fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringsocket-cluster-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self {
            dir,
            ports: Vec::new(),
            children: Vec::new(),
        };
        for _ in 0..MASTERS {
            let mut last_error = String::new();
            let started = (0..5).any(|_| {
                let port = free_port_pair();
                cluster.ports.push(port);
                cluster.children.push(None);
                let node = cluster.ports.len() - 1;
                match cluster.spawn(node) {
                    Ok(()) => true,
                    Err(e) => {
                        last_error = e;
                        cluster.ports.pop();
                        cluster.children.pop();
                        false
                    }
                }
            });
            assert!(started, "redis-server did not start: {last_error}");
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (apt install redis-tools): {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// The seed list for `redis_url`: every node, comma-separated.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis://{}", nodes.join(","))
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// A plain connection to node `node`, for commands the test sends itself.
    pub fn client(&self, node: usize) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[node]))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// The slot of `key`, as node 0 computes it.
    pub fn slot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.client(0))
            .unwrap()
    }

    /// The node serving `slot`, in a running node's slot map.
    pub fn owner(&self, slot: u16) -> usize {
        let asked = self.children.iter().position(Option::is_some).unwrap();
        self.owner_seen_by(asked, slot)
            .unwrap_or_else(|| panic!("slot {slot} is not served"))
    }

    /// Moves `slot` (with its keys) from the node serving it to node `to`, the way
    /// `redis-cli --cluster reshard` does: `IMPORTING` / `MIGRATING`, `MIGRATE` of
    /// every key, then `SETSLOT NODE` on every node.
    pub fn move_slot(&self, slot: u16, to: usize) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is on node {to} already");
        let id = |node: usize| -> String {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut self.client(node))
                .unwrap()
        };
        let (from_id, to_id) = (id(from), id(to));
        let (mut source, mut target) = (self.client(from), self.client(to));
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .exec(&mut target)
            .unwrap();
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .exec(&mut source)
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut source)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.ports[to])
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut source)
                .unwrap();
        }
        for node in [to, from]
            .into_iter()
            .chain((0..MASTERS).filter(|&n| n != to && n != from))
        {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .exec(&mut self.client(node))
                .unwrap();
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        while (0..MASTERS).any(|n| self.owner_seen_by(n, slot) != Some(to)) {
            assert!(
                Instant::now() < deadline,
                "slot {slot} not moved everywhere"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node serving `slot` in node `node`'s slot map.
    fn owner_seen_by(&self, node: usize, slot: u16) -> Option<usize> {
        let reply: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.client(node))
            .ok()?;
        reply.into_iter().find_map(|range| {
            let redis::Value::Array(parts) = range else {
                return None;
            };
            let (redis::Value::Int(first), redis::Value::Int(last)) = (&parts[0], &parts[1]) else {
                return None;
            };
            let redis::Value::Array(master) = &parts[2] else {
                return None;
            };
            let redis::Value::Int(port) = master[1] else {
                return None;
            };
            ((*first..=*last).contains(&i64::from(slot)))
                .then(|| self.ports.iter().position(|&p| i64::from(p) == port))
                .flatten()
        })
    }

    /// Kills node `node` and waits for it to exit: its clients see the connection drop.
    pub fn stop(&mut self, node: usize) {
        if let Some(mut child) = self.children[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `node` again on its port, empty; it rejoins from its cluster config
    /// file. Returns once every node reports `cluster_state:ok`.
    pub fn restart(&mut self, node: usize) {
        self.stop(node);
        if let Err(e) = self.spawn(node) {
            panic!(
                "redis-server did not restart on port {}: {e}",
                self.ports[node]
            );
        }
        self.wait_ok();
    }

    /// Kills every node: the whole cluster is away.
    pub fn stop_all(&mut self) {
        for node in 0..self.ports.len() {
            self.stop(node);
        }
    }

    /// Starts every node again on its port, empty (each rejoins from its cluster
    /// config file), and returns once all report `cluster_state:ok`.
    pub fn restart_all(&mut self) {
        self.stop_all();
        for node in 0..self.ports.len() {
            if let Err(e) = self.spawn(node) {
                panic!(
                    "redis-server did not restart on port {}: {e}",
                    self.ports[node]
                );
            }
        }
        self.wait_ok();
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in 0..self.ports.len() {
            if self.children[node].is_none() {
                continue;
            }
            loop {
                let info: Result<String, _> = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut self.client(node));
                if info.is_ok_and(|i| i.contains("cluster_state:ok")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {node} did not reach cluster_state:ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn spawn(&mut self, node: usize) -> Result<(), String> {
        let port = self.ports[node].to_string();
        let child = super::redis::spawn_quiet(
            Command::new("redis-server")
                .args(["--cluster-enabled", "yes"])
                .args(["--port", &port])
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                // Long enough that a node restarted by a test is never marked failed.
                .args(["--cluster-node-timeout", "15000"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir),
        );
        self.children[node] = Some(super::redis::await_ready(
            child,
            self.ports[node],
            READY_TIMEOUT,
        )?);
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in 0..self.children.len() {
            self.stop(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on right now, whose cluster bus port (+10000) is
/// free too.
fn free_port_pair() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}
