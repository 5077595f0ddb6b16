//! `ringsocket`: the server (`serve`) and, later, the load generator (`bench`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ringsocket::app::App;
use ringsocket::broker::Broker;
use ringsocket::broker::redis::{RedisBroker, RedisConfig};
use ringsocket::config::Config;
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
    /// Load generator: `bench echo` (messages/s, latency), `bench broadcast` (deliveries/s, loss, latency) or `bench connect` (handshakes/s, memory); `--compare`, `--json`, `--plot`.
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
    /// Background executor threads [default: 1; env RINGSOCKET_TASK_THREADS].
    #[arg(long)]
    task_threads: Option<usize>,
    /// Redis server joining this process's rooms with other processes, e.g.
    /// redis://127.0.0.1:6379 [default: none, the embedded broker; env RINGSOCKET_REDIS_URL].
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Configuration file [default: ./ringsocket.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// A setting as KEY=VALUE, as named in the file (repeatable), e.g. --set ping_interval_secs=5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
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

fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => {
            let default = PathBuf::from("ringsocket.toml");
            if default.exists() {
                Config::from_file(&default).map_err(|e| e.to_string())?
            } else {
                Config::default()
            }
        }
    };
    config
        .apply_env(std::env::vars())
        .map_err(|e| e.to_string())?;
    if let Some(bind) = &args.bind {
        config
            .set("bind", bind)
            .map_err(|e| format!("--bind: {e}"))?;
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    if let Some(url) = &args.redis {
        config.redis_url = url.trim().to_owned();
    }
    if let Some(threads) = args.task_threads {
        config.task_threads = threads;
    }
    for item in &args.set {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("--set {item:?}: expected KEY=VALUE"))?;
        config
            .set(key.trim(), value)
            .map_err(|e| format!("--set {item:?}: {e}"))?;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let config = load_config(&args)?;
    let mut app = App::standard();
    for pattern in &config.conflate_topics {
        app = app.conflate(pattern, config.conflate_window());
    }
    let broker = match RedisConfig::from_config(&config) {
        Some(redis) => {
            let broker = RedisBroker::start(redis, app.publisher().broker_sink())
                .map_err(|e| format!("redis: {e}"))?;
            app.hub().set_broker(broker.clone())?;
            Some(broker)
        }
        None => None,
    };
    let server = Server::start(config, Arc::new(app)).map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    println!(
        "ringsocket listening on {addr}: ws://{addr}/echo, ws://{addr}/ws/{{room}}, \
         POST http://{addr}/publish/{{topic}}, http://{addr}/metrics"
    );
    let signal = server.shutdown_signal();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("ringsocket-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "shutting down: closing connections with 1001");
                signal.trigger();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let result = server.join().map_err(|e| e.to_string());
    handle.close();
    if let Some(broker) = broker {
        broker.shutdown();
    }
    tracing::info!("stopped");
    result
}
