#!/usr/bin/env python3
"""Runs the side-by-side echo benchmarks of benches/README.md and prints the table.

Each server runs pinned to CPU 0 (`taskset -c 0`), the load generator to CPU 1
(`taskset -c 1 ringsocket bench ... --threads 1`). For every repetition each server is
started fresh for each scenario, so that memory figures start from an idle process and
no scenario inherits another's state; servers take turns within a repetition, so that
drift on a shared machine hits all of them alike. Every report is kept as JSON in the
output folder; the table holds medians and the ratios ringsocket / peer.

    python3 benches/compare.py --reps 3 --out target/bench-results
    python3 benches/compare.py --reps 3 --scenarios e_1k_100 f_1k_ramp e_10k_100 f_10k_ramp \
        --out target/bench-results-broadcast
    python3 benches/compare.py --reps 3 --only ringsocket --serve-set conflate_topics= \
        --scenarios e_10k_40_json e_10k_40_json_v1 --out target/bench-v1
    cargo run --release --example test_cert -- target/certs
    python3 benches/compare.py --reps 3 --tls target/certs --only ringsocket ringsocket-epoll bun \
        --out target/bench-results-tls

With --tls DIR (cert.pem, key.pem, ca.pem as examples/test_cert.rs writes them) the
servers that can serve TLS are given the certificate (ringsocket: --tls-cert/--tls-key;
Bun: TLS_CERT/TLS_KEY, its `tls` option) and the load generator connects with wss://
and --ca; each handshake is a full one (the bench does not resume sessions).
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benches" / "peers"
SERVER_CPU = "0"
CLIENT_CPU = "1"


def servers(ringsocket_server):
    """Echo servers: name -> (argv taking the port, URL path)."""
    return {
        "ringsocket": (
            lambda port: [ringsocket_server, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            "/echo",
        ),
        "ringsocket-epoll": (
            lambda port: [ringsocket_server, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                          "--io-backend", "epoll"],
            "/echo",
        ),
        "tt-echo": (lambda port: [str(PEERS / "target/release/tt-echo"), str(port)], "/"),
        "fws-echo": (lambda port: [str(PEERS / "target/release/fws-echo"), str(port)], "/"),
        "bun": (
            lambda port: [str(PEERS / "bun/node_modules/.bin/bun"), str(PEERS / "bun/echo.js"), str(port)],
            "/",
        ),
    }


def room_servers(ringsocket_server):
    """Room servers for `bench broadcast`: name -> (argv taking the port, URL path)."""
    return {
        "ringsocket": (
            lambda port: [ringsocket_server, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            "/broadcast",
        ),
        "ringsocket-epoll": (
            lambda port: [ringsocket_server, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                          "--io-backend", "epoll"],
            "/broadcast",
        ),
        "tt-broadcast": (lambda port: [str(PEERS / "target/release/tt-broadcast"), str(port)], "/room"),
        "bun": (
            lambda port: [str(PEERS / "bun/node_modules/.bin/bun"), str(PEERS / "bun/broadcast.js"), str(port)],
            "/room",
        ),
    }


SCENARIOS = {
    # name: bench arguments after the URL
    "a_throughput": ["echo", "--conns", "100", "--inflight", "16", "--size", "64",
                     "--duration", "10", "--warmup", "2", "--threads", "1"],
    "b_latency": ["echo", "--conns", "100", "--inflight", "1", "--size", "64",
                  "--duration", "10", "--warmup", "2", "--threads", "1"],
    "c_connect": ["connect", "--conns", "10000", "--hold", "5", "--threads", "1"],
    # Not in the default set: one connection, one message in flight, the round trip
    # without queueing behind 99 other connections.
    "d_latency_1x1": ["echo", "--conns", "1", "--inflight", "1", "--size", "64",
                      "--duration", "10", "--warmup", "2", "--threads", "1"],
    # Broadcast (issue #4's table): one publisher, 64 B, at a fixed 100 msg/s and ramped
    # to the highest rate without loss, to 1,000 and 10,000 subscribers. Not in the
    # default set; run with --scenarios e_1k_100 f_1k_ramp e_10k_100 f_10k_ramp.
    "e_1k_100": ["broadcast", "--subs", "1000", "--rate", "100", "--size", "64",
                 "--duration", "10", "--warmup", "2", "--threads", "1"],
    "f_1k_ramp": ["broadcast", "--subs", "1000", "--rate", "100", "--size", "64", "--ramp",
                  "--duration", "3", "--warmup", "1", "--threads", "1"],
    "e_10k_100": ["broadcast", "--subs", "10000", "--rate", "100", "--size", "64",
                  "--duration", "10", "--warmup", "2", "--grace", "5", "--timeout", "30",
                  "--threads", "1"],
    "f_10k_ramp": ["broadcast", "--subs", "10000", "--rate", "10", "--size", "64", "--ramp",
                   "--duration", "3", "--warmup", "1", "--grace", "5", "--timeout", "30",
                   "--threads", "1"],
    # Compression (issue #19's table; run with --deflate): 1 KiB JSON to 10,000
    # subscribers ramped, and 16 KiB JSON echoes.
    "g_10k_ramp_json": ["broadcast", "--subs", "10000", "--rate", "10", "--size", "1024",
                        "--payload", "json", "--ramp", "--duration", "3", "--warmup", "1",
                        "--grace", "5", "--timeout", "30", "--threads", "1"],
    "e_10k_40_json": ["broadcast", "--subs", "10000", "--rate", "40", "--size", "1024",
                      "--payload", "json", "--duration", "10", "--warmup", "2", "--grace", "5",
                      "--timeout", "30", "--threads", "1"],
    # ringsocket.v1 (issue #4's follow-up): the same two with every subscriber on /v1,
    # subscribed to topic `broadcast` (`bench broadcast --v1`); the publisher stays raw
    # on /broadcast. Alternate them with their raw twins:
    # --only ringsocket --scenarios e_10k_40_json e_10k_40_json_v1 --serve-set conflate_topics=
    "e_10k_40_json_v1": ["broadcast", "--subs", "10000", "--rate", "40", "--size", "1024",
                         "--payload", "json", "--duration", "10", "--warmup", "2", "--grace", "5",
                         "--timeout", "30", "--threads", "1", "--v1"],
    "g_10k_ramp_json_v1": ["broadcast", "--subs", "10000", "--rate", "10", "--size", "1024",
                           "--payload", "json", "--ramp", "--duration", "3", "--warmup", "1",
                           "--grace", "5", "--timeout", "30", "--threads", "1", "--v1"],
    "h_echo_16k_json": ["echo", "--conns", "10", "--inflight", "4", "--size", "16384",
                        "--payload", "json", "--duration", "10", "--warmup", "2", "--threads", "1"],
}
DEFAULT_SCENARIOS = ["a_throughput", "b_latency", "c_connect"]


def is_broadcast(scenario):
    return SCENARIOS[scenario][0] == "broadcast"


def cpu_times():
    """Per-CPU (busy, total) jiffies from /proc/stat, for cpu0 and cpu1."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name in ("cpu0", "cpu1"):
                v = [int(x) for x in vals]
                idle = v[3] + v[4]  # idle + iowait
                out[name] = (sum(v) - idle, sum(v))
    return out


def process_cpu_secs(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_secs():
    """Busy time of the whole machine (user, nice, system, irq, softirq), in seconds.
    Softirq time spent in a process's context is charged to that process too, so it
    belongs on this side of the comparison with the processes' times."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def busy_percent(before, after):
    return {
        cpu: round(100.0 * (after[cpu][0] - before[cpu][0]) / max(1, after[cpu][1] - before[cpu][1]), 1)
        for cpu in before
    }


def wait_for_port(port, proc, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def wait_quiet(limit=1800.0):
    """Waits until no fuzzer runs and both cores are under 15 % busy over a second:
    the machine is shared, and a benchmark next to a compiler or fuzzer measures that."""
    start = time.time()
    while True:
        fuzzing = subprocess.run(["pgrep", "-f", "fuzz"], capture_output=True, text=True).stdout.strip()
        before = cpu_times()
        time.sleep(1.0)
        busy = busy_percent(before, cpu_times())
        if not fuzzing and max(busy.values()) < 15.0:
            return time.time() - start
        if time.time() - start > limit:
            raise RuntimeError(f"the machine stayed busy for {limit} s: {busy}, fuzzers: {fuzzing!r}")
        print(f"  waiting for a quiet machine: busy {busy}, fuzzers {fuzzing.split()[:1]}",
              file=sys.stderr, flush=True)
        time.sleep(10.0)


TLS_SERVERS = ("ringsocket", "ringsocket-epoll", "baseline", "bun")


def run_one(bench, name, argv_for, path, scenario, port, outdir, rep, quiet=True, tls=None,
            deflate=False):
    waited = wait_quiet() if quiet else 0.0
    argv, env, scheme, tls_args = argv_for(port), dict(os.environ), "ws", []
    if deflate:
        # ringsocket negotiates it by default; Bun's scripts turn it on with DEFLATE=1.
        env["DEFLATE"] = "1"
        tls_args.append("--deflate")
    if tls:
        if name not in TLS_SERVERS:
            raise RuntimeError(f"{name} does not serve TLS")
        if name == "bun":
            env["TLS_CERT"], env["TLS_KEY"] = f"{tls}/cert.pem", f"{tls}/key.pem"
        else:
            argv += ["--tls-cert", f"{tls}/cert.pem", "--tls-key", f"{tls}/key.pem"]
        scheme = "wss"
        tls_args += ["--ca", f"{tls}/ca.pem"]
    server = subprocess.Popen(["taskset", "-c", SERVER_CPU, *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        time.sleep(0.5)  # let the server settle before reading its RSS
        args = SCENARIOS[scenario]
        cmd = ["taskset", "-c", CLIENT_CPU, bench, "bench", args[0], f"{scheme}://127.0.0.1:{port}{path}",
               *args[1:], *tls_args, "--server-pid", str(server.pid), "--json"]
        before = cpu_times()
        t0, machine0 = time.time(), busy_secs()
        server0 = process_cpu_secs(server.pid)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server1 = process_cpu_secs(server.pid)
        wall, machine1 = time.time() - t0, busy_secs()
        after = cpu_times()
        client_secs = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        # CPU that neither the server nor the load generator used: other processes
        # sharing the machine. Above ~10 % of a core the run is not trusted.
        other = (machine1 - machine0 - (server1 - server0) - client_secs) / wall * 100.0
        if not done.stdout.strip():
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        report = json.loads(done.stdout)
        report["_command"] = " ".join(cmd)
        report["_exit_code"] = done.returncode
        report["_cpu_busy_percent"] = busy_percent(before, after)
        report["_waited_for_quiet_secs"] = round(waited, 1)
        report["_other_processes_cpu_percent"] = round(other, 1)
        (outdir / f"{name}.{scenario}.{rep}.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def broadcast_result(r):
    """The step a broadcast report's headline comes from (as `Summary::figures`)."""
    steps = r["steps"]
    if r["ramp"]:
        passed = [x for x in steps if x["verdict"] == "pass"]
        return max(passed, key=lambda x: x["target_rate"]) if passed else steps[-1]
    return steps[0]


def headline(scenario, r):
    h = headline_of(scenario, r)
    cpu = broadcast_result(r)["cpu"] if is_broadcast(scenario) else r["cpu"]
    cores = cpu.get("cores_busy_percent") or []
    for cpu in (0, 1):
        h[f"cpu{cpu} busy %"] = cores[cpu] if cpu < len(cores) else None
    return h


def headline_of(scenario, r):
    if is_broadcast(scenario):
        s = broadcast_result(r)
        return {"max loss-free msg/s": r["max_loss_free_rate"], "deliveries/s": s["deliveries_per_sec"],
                "p50 µs": s["latency_us"]["p50"], "p99 µs": s["latency_us"]["p99"],
                "lost": s["lost"], "server cpu %": s["cpu"]["server_percent"],
                "client cpu %": s["cpu"]["client_percent"],
                "client µs/delivery": s["cpu_per_delivery"]["client_us"],
                "server µs/delivery": s["cpu_per_delivery"]["server_us"],
                "errors": sum(r["error_causes"].values())}
    if scenario == "a_throughput" or scenario.startswith("h_echo"):
        return {"msg/s": r["messages_per_sec"], "MB/s": r.get("bytes_per_sec", 0) / 1e6,
                "server µs/msg": r["cpu"]["server_percent"] / 100.0 * 1e6 / max(1, r["messages_per_sec"]),
                "wire/payload": (r.get("wire_bytes_read") or 0) / max(1, r.get("payload_bytes") or 1), "server cpu %": r["cpu"]["server_percent"],
                "client cpu %": r["cpu"]["client_percent"], "errors": r["errors"] + r["mismatches"]}
    if "latency" in scenario:
        return {"p50 µs": r["latency_us"]["p50"], "p99 µs": r["latency_us"]["p99"],
                "msg/s": r["messages_per_sec"], "server cpu %": r["cpu"]["server_percent"],
                "client cpu %": r["cpu"]["client_percent"], "errors": r["errors"] + r["mismatches"]}
    mem = r.get("memory") or {}
    per_handshake = None
    if r["handshakes_per_sec"]:
        # The server's CPU over the run, per handshake completed in it.
        per_handshake = r["cpu"]["server_percent"] / 100.0 * 1e6 / r["handshakes_per_sec"]
    return {"handshakes/s": r["handshakes_per_sec"], "server µs/handshake": per_handshake,
            "B/conn": mem.get("bytes_per_conn"),
            "B/conn held": mem.get("bytes_per_conn_held"), "server cpu %": r["cpu"]["server_percent"],
            "client cpu %": r["cpu"]["client_percent"], "errors": r["failed"] + r["dropped"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "target" / "bench-results"))
    p.add_argument("--bench", default=str(ROOT / "target/release/ringsocket"),
                   help="the ringsocket binary that runs `bench`")
    p.add_argument("--server", default=None,
                   help="the ringsocket binary that serves (default: --bench)")
    p.add_argument("--only", nargs="*", help="servers to run (default: all)")
    p.add_argument("--baseline", default=None,
                   help="an older ringsocket binary, served as `baseline` beside `ringsocket` "
                        "(a before/after table of a change, in the same run)")
    p.add_argument("--scenarios", nargs="*", default=DEFAULT_SCENARIOS, choices=list(SCENARIOS))
    p.add_argument("--port", type=int, default=9301)
    p.add_argument("--tls", default=None, metavar="DIR",
                   help="serve and connect over TLS with DIR/cert.pem, key.pem, ca.pem")
    p.add_argument("--deflate", action="store_true",
                   help="offer permessage-deflate (`bench --deflate`); Bun is started with DEFLATE=1")
    p.add_argument("--serve-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings for the ringsocket servers (and --baseline), each passed as "
                        "`serve --set KEY=VALUE`, e.g. conflate_topics=")
    p.add_argument("--deadline", default=None, metavar="HH:MM",
                   help="start no run after this time of day (UTC), e.g. when the machine is "
                        "booked; the summary holds the runs done")
    p.add_argument("--others-limit", type=float, default=10.0, metavar="PCT",
                   help="repeat a run (up to 3 attempts) when other processes used more than this "
                        "share of a core during it (default 10; with 10k subscribers the undisturbed "
                        "runs of 2026-12-07 showed 12-23 %% there, presumably the kernel's)")
    p.add_argument("--no-quiet-wait", action="store_true",
                   help="do not wait for a quiet machine, nor repeat runs disturbed by other processes "
                        "(to try the script out; the numbers are then not to be quoted)")
    a = p.parse_args()

    # Every connection is a file descriptor in the server and one in the load generator.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 100_000 if hard == resource.RLIM_INFINITY else min(100_000, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    print(f"open-file limit: {want} (hard {hard})", file=sys.stderr)

    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    echo_table = servers(a.server or a.bench)
    room_table = room_servers(a.server or a.bench)
    if a.baseline:
        echo_table["baseline"] = servers(a.baseline)["ringsocket"]
        room_table["baseline"] = room_servers(a.baseline)["ringsocket"]
    if a.serve_set:
        extra = [arg for kv in a.serve_set for arg in ("--set", kv)]
        for table in (echo_table, room_table):
            for name in [n for n in table if n.startswith("ringsocket") or n == "baseline"]:
                argv_of, path = table[name]
                table[name] = ((lambda f: lambda port: [*f(port), *extra])(argv_of), path)

    def past_deadline():
        if not a.deadline:
            return False
        now = time.gmtime()
        hour, minute = (int(x) for x in a.deadline.split(":"))
        return (now.tm_hour, now.tm_min) >= (hour, minute)

    results = {}
    port = a.port
    stopped = False
    for rep in range(1, a.reps + 1):
        if stopped:
            break
        for scenario in a.scenarios:
            if stopped:
                break
            table = room_table if is_broadcast(scenario) else echo_table
            names = [n for n in table if not a.only or n in a.only]
            # Forward in odd repetitions, reversed in even ones: neither server always
            # runs right after the other.
            for name in names if rep % 2 else names[::-1]:
                if past_deadline():
                    print(f"  past the deadline {a.deadline} UTC: no more runs", file=sys.stderr, flush=True)
                    stopped = True
                    break
                argv_for, path = table[name]
                port += 1  # a fresh port: no TIME_WAIT from the previous server
                for attempt in range(1, 4):
                    r = run_one(a.bench, name, argv_for, path, scenario, port, outdir, rep,
                                quiet=not a.no_quiet_wait, tls=a.tls, deflate=a.deflate)
                    if a.no_quiet_wait or r["_other_processes_cpu_percent"] < a.others_limit:
                        break
                    if past_deadline():
                        break
                    print(f"  other processes used {r['_other_processes_cpu_percent']} % of a core "
                          f"during the run: repeating it (attempt {attempt})", file=sys.stderr, flush=True)
                    port += 1
                h = headline(scenario, r)
                results.setdefault((scenario, name), []).append(h)
                print(f"rep {rep} {scenario:13} {name:10} "
                      + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items())
                      + f", others {r['_other_processes_cpu_percent']} %", file=sys.stderr, flush=True)

    summary = {}
    for (scenario, name), runs in results.items():
        med = {}
        for key in runs[0]:
            vals = [r[key] for r in runs if r[key] is not None]
            med[key] = statistics.median(vals) if vals else None
        summary.setdefault(scenario, {})[name] = {"median": med, "runs": runs}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
