//! The options every scenario shares: load generator threads, source addresses,
//! timeouts, the server's pid, TLS and permessage-deflate (flattened into each mode's
//! options), and the output options (`--json`, `--compare`, `--plot`).

use std::path::PathBuf;
use std::time::Duration;

use super::BenchError;

/// Options shared by `bench echo`, `bench broadcast` and `bench connect`.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct CommonOptions {
    /// Load generator threads, each with its own single-threaded runtime and every
    /// N-th connection.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// On loopback, spread connections over this many source addresses 127.0.0.2, …
    /// (0: let the kernel choose). One address has about 28,000 ephemeral ports.
    #[arg(long, default_value_t = 50)]
    pub source_addrs: u8,
    /// Time allowed for one connect and handshake, in echo for the last echoes to come
    /// back, and in broadcast for every subscriber to hear every publisher before the
    /// first step, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// The server's process id: its CPU use over the measured window is reported, and,
    /// in connect, its resident memory (VmRSS) per connection.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Speak TLS even to a ws:// URL (a wss:// URL always does; connect and echo only,
    /// not broadcast yet). Session resumption is off, so every TLS handshake is a full
    /// one: `bench connect` measures the server's cost of a new client, not of a
    /// returning one. Needs --ca or --insecure.
    #[arg(long)]
    pub tls: bool,
    /// With TLS: a PEM file of the CA certificate(s) to trust; the server's certificate
    /// must chain to one of them and name the URL's host.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// With TLS: accept any server certificate (self-signed, expired, another name).
    /// The handshake's signatures are still checked, so the key exchange is real; only
    /// who the server is goes unchecked.
    #[arg(long)]
    pub insecure: bool,
    /// Offer permessage-deflate (RFC 7692) as browsers do ("permessage-deflate;
    /// client_max_window_bits") and fail the run if the server does not accept it.
    /// Every message sent is then compressed (zlib level 1; one that does not shrink
    /// goes out plain) and every compressed message received is inflated.
    #[arg(long)]
    pub deflate: bool,
}

impl Default for CommonOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            source_addrs: 50,
            timeout: 10.0,
            server_pid: None,
            tls: false,
            ca: None,
            insecure: false,
            deflate: false,
        }
    }
}

impl CommonOptions {
    /// Checks the shared options.
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        if self.threads == 0 {
            return Err(BenchError::Options("--threads must be at least 1".into()));
        }
        seconds("--timeout", self.timeout)?;
        if self.ca.is_some() && self.insecure {
            return Err(BenchError::Options(
                "--ca and --insecure exclude each other: trust a CA or trust anything".into(),
            ));
        }
        Ok(())
    }

    /// `--timeout` as a duration.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// How the results are shown; shared by every mode.
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct OutputOptions {
    /// Run the same scenario against these servers too, one after the other, and print
    /// a side-by-side table with ratios against the first URL.
    #[arg(long, value_name = "URL", num_args = 1..)]
    pub compare: Vec<String>,
    /// With --compare: the process ids of the --compare servers, in the same order, for
    /// their CPU (and, in connect, memory) figures; --server-pid is the first URL's.
    #[arg(long, value_name = "PID", num_args = 1.., requires = "compare")]
    pub compare_pids: Vec<u32>,
    /// Print the report (with --compare: every report and the ratios) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the latency distribution to this SVG file: latency against percentile,
    /// the percentile on a log scale as in HdrHistogram plots; one curve per server.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Checks that a number of seconds is finite and not negative.
pub(crate) fn seconds(name: &str, secs: f64) -> Result<(), BenchError> {
    if secs.is_finite() && secs >= 0.0 {
        Ok(())
    } else {
        Err(BenchError::Options(format!(
            "{name} must be a number of seconds >= 0"
        )))
    }
}

/// Checks a warm-up and a measured window: seconds, the window more than 0.
pub(crate) fn window(warmup: f64, duration: f64) -> Result<(), BenchError> {
    seconds("--warmup", warmup)?;
    seconds("--duration", duration)?;
    if duration == 0.0 {
        return Err(BenchError::Options("--duration must be more than 0".into()));
    }
    Ok(())
}
