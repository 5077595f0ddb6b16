#!/usr/bin/env python3
"""Cross-node broadcast through a broker (issue #22): two ringsocket nodes share a
broker; publishers write to node A, subscribers are split over A and B (each
message reaches half of them through the broker), and `ringsocket bench broadcast
--ramp` finds the highest publish rate at which every message reaches every
subscriber of its room once, in order, within --max-p99-ms.

Brokers: `redis` (one redis-server), `cluster1`, `cluster2`, `cluster3` (Redis
Cluster with that many masters, slots split evenly, topics spread over them by their
hash tag), `nats` (nats-server -js). Each run starts its own broker and nodes on free
ports and stops them.

Pinning (2 cores): nodes and broker on CPU 0 (`--server-cpu`), the load generator on
CPU 1 (`--client-cpu`). Besides the bench's own report, the script reads each
process's CPU time over the run (/proc/PID/stat) and gives the CPU per published
message of the broker and of each node: where the time goes, and the model for more
cores.

    cargo build --release
    python3 benches/cross_node.py --reps 3 --brokers redis cluster3 nats
    python3 benches/cross_node.py --reps 3 --brokers cluster1 cluster2 cluster3 \\
        --subs 96 --rooms 48 --pubs 48      # broker-bound: shard scaling

Runs alternate over the brokers within each repetition; the summary gives medians.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(bus=False):
    """A free port; with `bus`, one whose cluster bus port (+10000) is free too."""
    if not bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    while True:
        port = random.randrange(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def cpu_secs(pid):
    """utime + stime of a process and its threads, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class NotListening(Exception):
    pass


def wait_tcp(port, what, timeout=15.0):
    """Waits until something listens on `port`; raises NotListening if nothing does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def redis_cli(port, *args):
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip()


class Broker:
    """A broker's processes; `url` and `args` for `ringsocket serve`."""

    def __init__(self, kind, cpu, workdir):
        self.kind = kind
        self.procs = []
        self.workdir = workdir
        try:
            self.start(cpu)
        except BaseException:
            self.stop()
            raise

    def start(self, cpu):
        kind, workdir = self.kind, self.workdir
        pin = ["taskset", "-c", str(cpu)]
        if kind == "local":
            # One node, no broker: the baseline.
            self.args = ["--broker", "local"]
        elif kind == "redis":
            port = free_port()
            self.spawn(pin + ["redis-server", "--port", str(port), "--save", "",
                              "--appendonly", "no", "--dir", workdir])
            wait_tcp(port, "redis-server")
            self.args = ["--redis", f"redis://127.0.0.1:{port}"]
        elif kind.startswith("cluster"):
            shards = int(kind[len("cluster"):])
            ports = [free_port(bus=True) for _ in range(shards)]
            for p in ports:
                self.spawn(pin + ["redis-server", "--port", str(p), "--save", "",
                                  "--appendonly", "no", "--dir", workdir,
                                  "--cluster-enabled", "yes",
                                  "--cluster-config-file", f"nodes-{p}.conf"])
            for p in ports:
                wait_tcp(p, "redis-server (cluster)")
            per = 16384 // shards
            for i, p in enumerate(ports):
                last = 16383 if i == shards - 1 else (i + 1) * per - 1
                redis_cli(p, "CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
            for p in ports[1:]:
                redis_cli(ports[0], "CLUSTER", "MEET", "127.0.0.1", str(p))
            deadline = time.monotonic() + 20
            while True:
                infos = [redis_cli(p, "CLUSTER", "INFO") for p in ports]
                if all("cluster_state:ok" in i and f"cluster_known_nodes:{shards}" in i
                       for i in infos):
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"the {shards}-master cluster did not come up: {infos}")
                time.sleep(0.1)
            seeds = ",".join(f"redis://127.0.0.1:{p}" for p in ports)
            self.args = ["--redis", seeds, "--redis-cluster"]
        elif kind == "nats":
            port = free_port()
            store = os.path.join(workdir, "js")
            self.spawn(pin + ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port),
                              "-sd", store])
            wait_tcp(port, "nats-server")
            self.args = ["--broker", "nats", "--nats", f"nats://127.0.0.1:{port}"]
        else:
            sys.exit(f"unknown broker {kind!r}")

    def spawn(self, argv):
        log = open(os.path.join(self.workdir, f"broker-{len(self.procs)}.log"), "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def start_node(binary, broker, cpu, workdir, name):
    port = free_port()
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSOCKET_")}
    env["RUST_LOG"] = env.get("RUST_LOG", "warn")
    proc = subprocess.Popen(
        ["taskset", "-c", str(cpu), binary, "serve", "--bind", f"127.0.0.1:{port}",
         "--workers", "1", *broker.args],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_tcp(port, f"node {name}")
    # Ready means the broker is joined: ringsocket_broker_connected is 1.
    deadline = time.monotonic() + 20
    while broker.kind != "local" and metric(port, "ringsocket_broker_connected") != 1.0:
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit(f"node {name} ({broker.kind}) did not join its broker within 20 s; "
                     f"see {log.name}")
        time.sleep(0.1)
    return proc, port


def metric(port, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                total = (total or 0.0) + float(value)
    return total


def start_broker(kind, cpu):
    """Starts the broker, again with other ports if one would not listen (a port
    taken between the check and the bind); returns it and its folder."""
    for attempt in range(3):
        workdir = tempfile.mkdtemp(prefix=f"cross-{kind}-")
        try:
            broker = Broker(kind, cpu, workdir)
            return broker, workdir
        except NotListening as e:
            logs = ""
            for name in sorted(os.listdir(workdir)):
                if name.endswith(".log"):
                    with open(os.path.join(workdir, name)) as f:
                        logs += f"{name}: {f.read()[-500:]}\n"
            print(f"    {kind}: {e} (attempt {attempt + 1}); {logs}", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(f"{kind}: the broker would not start")


def run_once(args, kind):
    broker, workdir = start_broker(kind, args.server_cpu)
    nodes = []
    try:
        names = ("a",) if kind == "local" else ("a", "b")
        nodes = [start_node(args.binary, broker, args.server_cpu, workdir, n)
                 for n in names]
        (a, pa), (b, pb) = nodes[0], nodes[-1]
        room = "/ws/cross-{room}"
        url = f"ws://127.0.0.1:{pa}{room}"
        subs = f"ws://127.0.0.1:{pa}{room},ws://127.0.0.1:{pb}{room}"
        if kind == "local":
            subs = url
        pids = {"broker": broker.pids(), "node A": [a.pid],
                "node B": [b.pid] if kind != "local" else []}
        before = {k: sum(cpu_secs(p) for p in v) for k, v in pids.items()}
        t0 = time.monotonic()
        cmd = ["taskset", "-c", str(args.client_cpu), args.binary, "bench", "broadcast",
               url, "--sub-urls", subs, "--subs", str(args.subs), "--pubs", str(args.pubs),
               "--rooms", str(args.rooms), "--size", str(args.size),
               "--rate", str(args.fixed or args.rate), *([] if args.fixed else ["--ramp"]),
               "--duration", str(args.duration),
               "--warmup", str(args.warmup), "--grace", str(args.grace),
               "--max-steps", str(args.max_steps), "--max-p99-ms", str(args.max_p99_ms),
               "--threads", "1", "--server-pid", str(a.pid), "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        after = {k: sum(cpu_secs(p) for p in v) for k, v in pids.items()}
        if out.returncode not in (0, 1) or not out.stdout.strip():
            sys.exit(f"bench failed ({kind}): {out.stderr[-2000:]}")
        report = json.loads(out.stdout)
        for s in report["steps"]:
            print(f"    {kind:9} step {s['target_rate']:9,.0f} msg/s sent {s['publish_rate']:9,.0f}"
                  f" p50 {fmt(s['latency_us']['p50'])} p99 {fmt(s['latency_us']['p99'])} µs"
                  f" lost {s['lost']} verdict {s['verdict']}", flush=True)
        published = sum(s["published"] for s in report["steps"])
        cpu = {k: (after[k] - before[k]) for k in pids}
        best = None
        for s in report["steps"]:
            if (s["verdict"] == "pass" or args.fixed) and (best is None or s["target_rate"] > best["target_rate"]):
                best = s
        row = {
            "broker": kind,
            "max_rate": report.get("max_loss_free_rate"),
            "step": best,
            "cpu_us_per_publish": {k: (v * 1e6 / published if published else None)
                                   for k, v in cpu.items()},
            "cpu_percent": {k: 100.0 * v / elapsed for k, v in cpu.items()},
            "errors": report.get("error_causes"),
            "steps": report["steps"],
            "publish_failed_a": metric(pa, "ringsocket_broker_publish_failed_total"),
            "received_b": metric(pb, "ringsocket_broker_received_total"),
        }
        return row
    finally:
        for proc, _ in nodes:
            proc.send_signal(signal.SIGINT)
        for proc, _ in nodes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", nargs="+", default=["redis", "cluster3", "nats"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--subs", type=int, default=2000,
                   help="subscribers over both nodes (default 2000: 1k each)")
    p.add_argument("--pubs", type=int, default=16)
    p.add_argument("--rooms", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rate", type=float, default=500.0, help="the ramp's first step")
    p.add_argument("--fixed", type=float,
                   help="one step at this rate instead of the ramp: latency and CPU per "
                        "publish at the same load for every broker")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--grace", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--max-p99-ms", type=float, default=100.0)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/ringsocket"))
    p.add_argument("--json", help="write every run's row to this file")
    args = p.parse_args()

    rows = []
    for rep in range(args.reps):
        for kind in args.brokers:
            row = run_once(args, kind)
            row["rep"] = rep
            rows.append(row)
            s = row["step"] or {}
            lat = s.get("latency_us", {})
            by_url = s.get("latency_by_sub_url", [])
            remote = by_url[1]["latency_us"] if len(by_url) > 1 else {}
            cpu = row["cpu_us_per_publish"]
            print(f"rep {rep} {kind:9} max {fmt(row['max_rate'])} msg/s"
                  f" deliveries/s {fmt(s.get('deliveries_per_sec'))}"
                  f" p50 {fmt(lat.get('p50'))} p99 {fmt(lat.get('p99'))} µs"
                  f" (via broker p50 {fmt(remote.get('p50'))} p99 {fmt(remote.get('p99'))})"
                  f" cpu µs/publish broker {fmt(cpu['broker'], 1)}"
                  f" A {fmt(cpu['node A'], 1)} B {fmt(cpu['node B'], 1)}"
                  f" errors {row['errors'] or '-'}"
                  f" (A publish_failed {fmt(row['publish_failed_a'])},"
                  f" B received {fmt(row['received_b'])})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    print("\nmedians over", args.reps, "reps:")
    print(f"{'broker':9} {'max msg/s':>10} {'deliv/s':>10} {'p50 µs':>8} {'p99 µs':>8}"
          f" {'A p99':>8} {'B p99':>8} {'broker µs/pub':>13} {'A µs/pub':>9} {'B µs/pub':>9}"
          f" {'broker CPU %':>12}")
    for kind in args.brokers:
        mine = [r for r in rows if r["broker"] == kind]
        steps = [r["step"] or {} for r in mine]

        def url_p99(s, i):
            by = s.get("latency_by_sub_url", [])
            return by[i]["latency_us"]["p99"] if len(by) > i else None

        print(f"{kind:9} {fmt(med([r['max_rate'] for r in mine])):>10}"
              f" {fmt(med([s.get('deliveries_per_sec') for s in steps])):>10}"
              f" {fmt(med([s.get('latency_us', {}).get('p50') for s in steps])):>8}"
              f" {fmt(med([s.get('latency_us', {}).get('p99') for s in steps])):>8}"
              f" {fmt(med([url_p99(s, 0) for s in steps])):>8}"
              f" {fmt(med([url_p99(s, 1) for s in steps])):>8}"
              f" {fmt(med([r['cpu_us_per_publish']['broker'] for r in mine]), 1):>13}"
              f" {fmt(med([r['cpu_us_per_publish']['node A'] for r in mine]), 1):>9}"
              f" {fmt(med([r['cpu_us_per_publish']['node B'] for r in mine]), 1):>9}"
              f" {fmt(med([r['cpu_percent']['broker'] for r in mine]), 0):>12}")


if __name__ == "__main__":
    main()
