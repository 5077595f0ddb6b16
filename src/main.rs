//! `ringsocket`: the server (`serve`), its effective configuration (`config`) and the
//! load generator (`bench`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::io::Write as _;

use clap::{Parser, Subcommand};
use ringsocket::app::App;
use ringsocket::broker::Broker;
use ringsocket::broker::nats::{NatsBroker, NatsConfig};
use ringsocket::broker::redis::{RedisBroker, RedisConfig};
use ringsocket::config::BrokerKind;
use ringsocket::config::{Config, Loader, Sources};
use ringsocket::runtime::Server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "ringsocket",
    version,
    about = "A thread-per-core io_uring WebSocket server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: /echo echoes every message; /healthz and /metrics beside it.
    Serve(ServeArgs),
    /// Print the effective configuration (as TOML, secrets masked) and where each value came from, then exit.
    Config(ServeArgs),
    /// Load generator: `bench echo` (messages/s, latency), `bench broadcast` (deliveries/s, loss, latency), `bench connect` (handshakes/s, memory) or `bench recover` (reconnect and recover missed publications); `--compare`, `--json`, `--plot`.
    Bench(ringsocket::bench::BenchArgs),
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:9001; env RINGSOCKET_BIND].
    #[arg(long)]
    bind: Option<String>,
    /// Worker threads, one per core [default: one per available core; env RINGSOCKET_WORKERS].
    #[arg(long)]
    workers: Option<usize>,
    /// I/O backend: auto (io_uring when it can be set up, else epoll), io_uring or epoll
    /// [default: auto; env RINGSOCKET_IO_BACKEND].
    #[arg(long, value_name = "BACKEND")]
    io_backend: Option<String>,
    /// Background executor threads [default: 1; env RINGSOCKET_TASK_THREADS].
    #[arg(long)]
    task_threads: Option<usize>,
    /// Redis server joining this process's rooms with other processes, e.g.
    /// redis://127.0.0.1:6379 [default: none, the embedded broker; env RINGSOCKET_REDIS_URL].
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// --redis lists Redis Cluster seed nodes, comma-separated; topics are sharded
    /// over its masters [default: false; env RINGSOCKET_REDIS_CLUSTER].
    #[arg(long)]
    redis_cluster: bool,
    /// NATS server (JetStream enabled) joining this process's rooms with other
    /// processes, e.g. nats://127.0.0.1:4222; with --broker nats [default: none; env
    /// RINGSOCKET_NATS_URL].
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// The broker between processes: local, redis or nats [default: redis with
    /// --redis, else local; env RINGSOCKET_BROKER].
    #[arg(long, value_name = "KIND")]
    broker: Option<String>,
    /// TLS certificate chain, PEM; with --tls-key, every listener speaks TLS (wss://,
    /// https://); reloaded on SIGHUP [default: none; env RINGSOCKET_TLS_CERT].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// TLS private key, PEM: PKCS#8, RSA or EC [default: none; env RINGSOCKET_TLS_KEY].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// A plain (no TLS) listener beside the TLS one, e.g. for health checks inside a
    /// cluster [default: none; env RINGSOCKET_PLAIN_BIND].
    #[arg(long, value_name = "IP:PORT")]
    plain_bind: Option<String>,
    /// Configuration file [default: ./ringsocket.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// A setting as KEY=VALUE, as named in the file (repeatable), e.g. --set ping_interval_secs=5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration and where each value came from, then exit
    /// (the same as `ringsocket config`).
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a closed pipe) is dropped, not
        // reported with `eprintln!`, which panics on that same closed pipe.
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) if args.print_config => print_config(&args),
        Command::Serve(args) => serve(args),
        Command::Config(args) => print_config(&args),
        Command::Bench(args) => ringsocket::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration from its sources, lowest first: defaults, the file, the
/// environment, the flags; validated.
fn load_config(args: &ServeArgs) -> Result<(Config, Sources), String> {
    let mut loader = Loader::new();
    match &args.config {
        Some(path) => loader.file(path).map_err(|e| e.to_string())?,
        None => {
            let default = PathBuf::from("ringsocket.toml");
            if default.exists() {
                loader.file(&default).map_err(|e| e.to_string())?;
            }
        }
    }
    loader.env(std::env::vars()).map_err(|e| e.to_string())?;
    let flags = [
        ("--bind", "bind", args.bind.clone()),
        ("--workers", "workers", args.workers.map(|w| w.to_string())),
        ("--redis", "redis_url", args.redis.clone()),
        (
            "--redis-cluster",
            "redis_cluster",
            args.redis_cluster.then(|| "true".to_owned()),
        ),
        ("--nats", "nats_url", args.nats.clone()),
        ("--broker", "broker", args.broker.clone()),
        ("--io-backend", "io_backend", args.io_backend.clone()),
        ("--tls-cert", "tls_cert", args.tls_cert.clone()),
        ("--tls-key", "tls_key", args.tls_key.clone()),
        ("--plain-bind", "plain_bind", args.plain_bind.clone()),
        (
            "--task-threads",
            "task_threads",
            args.task_threads.map(|t| t.to_string()),
        ),
    ];
    for (flag, field, value) in flags {
        if let Some(value) = value {
            loader
                .flag(flag, field, &value)
                .map_err(|e| e.to_string())?;
        }
    }
    for item in &args.set {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("--set {item:?}: expected KEY=VALUE"))?;
        loader
            .flag(&format!("--set {}", key.trim()), key.trim(), value)
            .map_err(|e| e.to_string())?;
    }
    loader.finish().map_err(|e| e.to_string())
}

/// SIGHUP: reads the TLS certificate and key again; a file that does not load keeps
/// the certificate served now.
fn reload_tls(tls: Option<&ringsocket::runtime::tls::TlsAcceptor>) {
    match tls {
        None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
        Some(tls) => match tls.reload() {
            Ok(()) => tracing::info!(
                cert = %tls.files().cert.display(),
                "SIGHUP: TLS certificate reloaded; new handshakes use it"
            ),
            Err(e) => {
                tracing::error!("SIGHUP: TLS certificate not reloaded, keeping the old one: {e}")
            }
        },
    }
}

fn print_config(args: &ServeArgs) -> Result<(), String> {
    let (config, sources) = load_config(args)?;
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(config.describe(&sources).as_bytes());
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let (config, _) = load_config(&args)?;
    let mut app = App::standard();
    for pattern in &config.conflate_topics {
        app = app.conflate(pattern, config.conflate_window());
    }
    let sink = app.publisher().broker_sink();
    let broker: Option<Arc<dyn Broker>> = match config.broker_kind() {
        BrokerKind::Redis => match RedisConfig::from_config(&config) {
            Some(redis) => {
                Some(RedisBroker::start(redis, sink).map_err(|e| format!("redis: {e}"))?)
            }
            None => return Err("broker = redis needs redis_url".into()),
        },
        BrokerKind::Nats => {
            let nats = NatsConfig::from_config(&config);
            Some(NatsBroker::start(nats, sink).map_err(|e| format!("nats: {e}"))?)
        }
        _ => None,
    };
    if let Some(broker) = &broker {
        app.hub().set_broker(broker.clone())?;
    }
    // Installed before the server starts, so that a SIGTERM that comes as soon as
    // the listening line is out (or during the start) is not the default action.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let server = Server::start(config, Arc::new(app)).map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    let backend = server.backend().name();
    let signal = server.shutdown_signal();
    let tls = server.tls();
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("ringsocket-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload_tls(tls.as_deref());
                    continue;
                }
                // The shutdown first: it must never depend on a log line being written.
                signal.trigger();
                tracing::info!(signal = sig, "shutting down: closing connections with 1001");
                break;
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let (ws, http) = if server.tls().is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let plain = match server.plain_addr() {
        Some(plain) => format!(", without TLS on http://{plain}"),
        None => String::new(),
    };
    // With `metrics_bind`, the metrics are there (plain HTTP) and not on `bind`.
    let metrics = match server.metrics_addr() {
        Some(metrics) => format!("http://{metrics}/metrics (metrics_bind)"),
        None => format!("{http}://{addr}/metrics"),
    };
    // Not `println!`: it panics when stdout is a closed pipe.
    let _ = writeln!(
        std::io::stdout(),
        "ringsocket listening on {addr}: the demo page {http}://{addr}/, {ws}://{addr}/v1 \
         (ringsocket.v1), {ws}://{addr}/echo, {ws}://{addr}/ws/{{room}}, \
         POST {http}://{addr}/publish/{{topic}}, {metrics}{plain} \
         ({backend} backend)"
    );
    let result = server.join().map_err(|e| e.to_string());
    handle.close();
    if let Some(broker) = broker {
        broker.shutdown();
    }
    tracing::info!("stopped");
    result
}
