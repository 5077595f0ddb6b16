//! Server configuration: every field with its default and unit, defaults in one place.
//!
//! Precedence, lowest first: these defaults, the TOML file (`ringsocket.toml`), the
//! environment (`RINGSOCKET_<FIELD>`, e.g. `RINGSOCKET_BIND=0.0.0.0:9000`), then flags.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// What a connection that queues too many outbound bytes (a slow consumer) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Close with 1013 "try again later" (the default).
    Close1013,
    /// Close with 1008 "policy violation".
    Close1008,
}

/// The server's settings. Durations are in seconds in the file and the environment.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:9001`.
    pub bind: SocketAddr,
    /// Worker threads, one per core, each pinned. Default 0: one per available core.
    pub workers: usize,
    /// Open connections allowed in the process (WebSocket and HTTP). Beyond it new
    /// requests get 503 before any upgrade. Default 100,000.
    pub max_connections: usize,
    /// Time a client has to send a complete request head, and that an HTTP keep-alive
    /// connection may stay idle between requests, in seconds. Default 10.
    pub handshake_timeout_secs: f64,
    /// How long the kernel may hold a new connection whose client has sent nothing yet
    /// before handing it to a worker (`TCP_DEFER_ACCEPT`), in whole seconds. Deferred
    /// accepts arrive with their request head, which saves the core a turn per
    /// handshake; a silent client is handed over after this and then gets the
    /// handshake timeout. Default 1; 0: accept at once.
    pub defer_accept_secs: u32,
    /// A connection silent this long is pinged, in seconds. Default 25 (load balancers
    /// commonly drop idle TCP after 60 s).
    pub ping_interval_secs: f64,
    /// A pinged connection that sends nothing for this long is closed, in seconds.
    /// Default 20.
    pub pong_timeout_secs: f64,
    /// Close a WebSocket that has received no data message for this long, in seconds.
    /// Default 0: no idle timeout (heartbeats still run).
    pub idle_timeout_secs: f64,
    /// Largest incoming WebSocket message, in bytes. Default 1 MiB (close 1009 beyond).
    pub max_message_size: usize,
    /// Largest incoming WebSocket frame, in bytes. Default 1 MiB (close 1009 beyond).
    pub max_frame_size: usize,
    /// Outbound bytes a connection may have queued before it is a slow consumer.
    /// Default 4 MiB.
    pub max_outbound_bytes: usize,
    /// What a slow consumer gets. Default `close-1013`.
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Largest HTTP request body (`Content-Length`), in bytes. Default 1 MiB (413 beyond).
    pub max_body_bytes: usize,
    /// Largest HTTP request head, in bytes. Default 8 KiB (431 beyond).
    pub max_head_bytes: usize,
    /// Time allowed after SIGINT/SIGTERM for peers to answer Close 1001, in seconds.
    /// Default 5.
    pub shutdown_timeout_secs: f64,
    /// Conflated topics of the default app: exact names or prefixes ending in `*`
    /// (comma-separated in the environment and `--set`). Within the window only the
    /// latest message per key reaches each subscriber (see `ringsocket::pubsub`).
    /// Default: none.
    pub conflate_topics: Vec<String>,
    /// The conflation window, in milliseconds. Default 16 (about 60 Hz).
    pub conflate_window_ms: u64,
    /// Redis server that carries published messages between processes, as
    /// `redis://[user:password@]host[:port][/db]`. Default empty: no Redis, only the
    /// embedded in-process broker.
    pub redis_url: String,
    /// Prefix of the Redis channel of every topic. Default `ringsocket:`.
    pub redis_prefix: String,
    /// Background executor threads (never the I/O cores). Default 1.
    pub task_threads: usize,
    /// Background jobs the queue holds, queued or reserved by requests whose response
    /// is being written. Beyond it a job is refused (the app's queue-full policy: 503
    /// or drop, counted in `ringsocket_tasks_rejected_total`). Default 10,000.
    pub task_queue_capacity: usize,
    /// Nice value of the executor threads (absolute), -20 (most favoured) to 19. When
    /// an executor thread and an I/O core share a CPU and both are busy, the scheduler
    /// shares it by these weights; raise it to favour the I/O cores. Default 0.
    pub task_nice: i32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 9001)),
            workers: 0,
            max_connections: 100_000,
            handshake_timeout_secs: 10.0,
            defer_accept_secs: 1,
            ping_interval_secs: 25.0,
            pong_timeout_secs: 20.0,
            idle_timeout_secs: 0.0,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_outbound_bytes: 4 << 20,
            slow_consumer_policy: SlowConsumerPolicy::Close1013,
            max_body_bytes: 1 << 20,
            max_head_bytes: 8 << 10,
            shutdown_timeout_secs: 5.0,
            conflate_topics: Vec::new(),
            conflate_window_ms: 16,
            redis_url: String::new(),
            redis_prefix: "ringsocket:".to_owned(),
            task_threads: 1,
            task_queue_capacity: 10_000,
            task_nice: 0,
        }
    }
}

/// A configuration that could not be loaded, naming the source and the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads a TOML file over the defaults. Unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Applies `RINGSOCKET_<FIELD>` variables from `vars` over this configuration.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (key, value) in vars {
            let Some(field) = key.strip_prefix("RINGSOCKET_") else {
                continue;
            };
            let field = field.to_ascii_lowercase();
            self.set(&field, &value)
                .map_err(|e| ConfigError(format!("{key}={value:?}: {e}")))?;
        }
        Ok(())
    }

    /// Sets one field from its text form, by its name in the file.
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), String> {
        fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
            v.trim()
                .parse()
                .map_err(|_| format!("not a valid number: {v:?}"))
        }
        match field {
            "bind" => {
                self.bind = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("not an address: {value:?}"))?
            }
            "workers" => self.workers = num(value)?,
            "max_connections" => self.max_connections = num(value)?,
            "handshake_timeout_secs" => self.handshake_timeout_secs = num(value)?,
            "defer_accept_secs" => self.defer_accept_secs = num(value)?,
            "ping_interval_secs" => self.ping_interval_secs = num(value)?,
            "pong_timeout_secs" => self.pong_timeout_secs = num(value)?,
            "idle_timeout_secs" => self.idle_timeout_secs = num(value)?,
            "max_message_size" => self.max_message_size = num(value)?,
            "max_frame_size" => self.max_frame_size = num(value)?,
            "max_outbound_bytes" => self.max_outbound_bytes = num(value)?,
            "max_body_bytes" => self.max_body_bytes = num(value)?,
            "max_head_bytes" => self.max_head_bytes = num(value)?,
            "shutdown_timeout_secs" => self.shutdown_timeout_secs = num(value)?,
            "conflate_topics" => {
                self.conflate_topics = value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "conflate_window_ms" => self.conflate_window_ms = num(value)?,
            "redis_url" => self.redis_url = value.trim().to_owned(),
            "redis_prefix" => self.redis_prefix = value.to_owned(),
            "task_threads" => self.task_threads = num(value)?,
            "task_queue_capacity" => self.task_queue_capacity = num(value)?,
            "task_nice" => self.task_nice = num(value)?,
            "slow_consumer_policy" => {
                self.slow_consumer_policy = match value.trim() {
                    "close-1013" => SlowConsumerPolicy::Close1013,
                    "close-1008" => SlowConsumerPolicy::Close1008,
                    other => {
                        return Err(format!("expected close-1013 or close-1008, got {other:?}"));
                    }
                }
            }
            other => return Err(format!("unknown setting {other:?}")),
        }
        Ok(())
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secs = [
            ("handshake_timeout_secs", self.handshake_timeout_secs, false),
            ("ping_interval_secs", self.ping_interval_secs, false),
            ("pong_timeout_secs", self.pong_timeout_secs, false),
            ("idle_timeout_secs", self.idle_timeout_secs, true),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs, true),
        ];
        for (name, value, zero_ok) in secs {
            if !value.is_finite() || value < 0.0 || (!zero_ok && value == 0.0) || value > 1e9 {
                return Err(ConfigError(format!(
                    "{name} must be a positive number of seconds, got {value}"
                )));
            }
        }
        if self.max_message_size == 0 || self.max_frame_size == 0 {
            return Err(ConfigError(
                "max_message_size and max_frame_size must be above 0".into(),
            ));
        }
        if self.conflate_window_ms == 0 || self.conflate_window_ms > 60_000 {
            return Err(ConfigError(format!(
                "conflate_window_ms must be 1 to 60000, got {}",
                self.conflate_window_ms
            )));
        }
        if self.defer_accept_secs > 3600 {
            return Err(ConfigError(format!(
                "defer_accept_secs must be 0 to 3600, got {}",
                self.defer_accept_secs
            )));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("max_connections must be above 0".into()));
        }
        if !self.redis_url.is_empty() {
            crate::broker::redis::check_url(&self.redis_url)
                .map_err(|e| ConfigError(format!("redis_url: {e}")))?;
        }
        if !(-20..=19).contains(&self.task_nice) {
            return Err(ConfigError(format!(
                "task_nice must be between -20 and 19, got {}",
                self.task_nice
            )));
        }
        if self.task_threads == 0 || self.task_queue_capacity == 0 {
            return Err(ConfigError(
                "task_threads and task_queue_capacity must be above 0".into(),
            ));
        }
        Ok(())
    }

    /// [`Config::handshake_timeout_secs`] as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }

    /// [`Config::ping_interval_secs`] as a `Duration`.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs_f64(self.ping_interval_secs)
    }

    /// [`Config::pong_timeout_secs`] as a `Duration`.
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pong_timeout_secs)
    }

    /// [`Config::idle_timeout_secs`] as a `Duration`, `None` when 0.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0.0).then(|| Duration::from_secs_f64(self.idle_timeout_secs))
    }

    /// [`Config::shutdown_timeout_secs`] as a `Duration`.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout_secs)
    }

    /// [`Config::conflate_window_ms`] as a `Duration`.
    pub fn conflate_window(&self) -> Duration {
        Duration::from_millis(self.conflate_window_ms)
    }

    /// The number of workers to start: [`Config::workers`], or one per available core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let mut config: Config = toml::from_str("bind = \"0.0.0.0:8000\"\nworkers = 3\n").unwrap();
        assert_eq!(config.workers, 3);
        assert_eq!(config.ping_interval_secs, 25.0);
        config
            .apply_env([
                ("RINGSOCKET_WORKERS".to_owned(), "5".to_owned()),
                ("PATH".to_owned(), "/bin".to_owned()),
            ])
            .unwrap();
        assert_eq!(config.workers, 5);
        assert_eq!(config.bind.port(), 8000);
    }

    #[test]
    fn conflated_topics_are_a_list() {
        let mut config: Config = toml::from_str("conflate_topics = [\"cursor\"]\n").unwrap();
        assert_eq!(config.conflate_topics, ["cursor"]);
        config.set("conflate_topics", "a, prices:*,").unwrap();
        assert_eq!(config.conflate_topics, ["a", "prices:*"]);
        config.set("conflate_window_ms", "0").unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut config = Config::default();
        let err = config
            .apply_env([("RINGSOCKET_WORKERS".to_owned(), "many".to_owned())])
            .unwrap_err();
        assert!(err.0.contains("RINGSOCKET_WORKERS"), "{err}");
        let err = toml::from_str::<Config>("colour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        config.pong_timeout_secs = 0.0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("pong_timeout_secs")
        );
    }

    #[test]
    fn redis_settings_from_file_env_and_set() {
        let config = Config::default();
        assert_eq!(config.redis_url, "");
        assert_eq!(config.redis_prefix, "ringsocket:");
        let mut config: Config =
            toml::from_str("redis_url = \"redis://10.0.0.1:6380/2\"\nredis_prefix = \"app:\"\n")
                .unwrap();
        assert_eq!(config.redis_url, "redis://10.0.0.1:6380/2");
        assert_eq!(config.redis_prefix, "app:");
        config.validate().unwrap();
        config
            .apply_env([(
                "RINGSOCKET_REDIS_URL".to_owned(),
                " redis://127.0.0.1:7000 ".to_owned(),
            )])
            .unwrap();
        assert_eq!(config.redis_url, "redis://127.0.0.1:7000");
        config.set("redis_prefix", "other:").unwrap();
        assert_eq!(config.redis_prefix, "other:");
        config.set("redis_url", "http://nope").unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.0.contains("redis_url"), "{err}");
    }

    #[test]
    fn task_settings_are_checked() {
        let mut config = Config::default();
        config.set("task_threads", "3").unwrap();
        config.set("task_nice", "-5").unwrap();
        assert_eq!((config.task_threads, config.task_nice), (3, -5));
        config.task_nice = 25;
        assert!(config.validate().unwrap_err().0.contains("task_nice"));
        config.task_nice = 0;
        config.task_queue_capacity = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("task_queue_capacity")
        );
    }
}
