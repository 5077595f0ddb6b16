#!/usr/bin/env bash
# The background-task benchmark of issue #5: echo latency on the I/O core while nothing
# else runs (idle), while 20 jobs/s of 50 ms CPU each run on the executor (executor),
# and while the same jobs run inline on the I/O core (inline). Runs the three side by
# side, ROUNDS times, and prints one line per run; medians are left to the reader.
#
# Server: one worker pinned to CPU 0 (`taskset -c 0,1`: the worker pins itself to the
# first allowed CPU), the executor thread pinned to CPU TASK_CPU (default 1). Load
# (`ringsocket bench echo`, closed loop: CONNS connections, 1 message in flight each)
# and the job stream (benches/jobs_stream.py) on CPU 1. Everything at `nice -n -10`
# so that other builds on a shared machine disturb it less.
#
#   cargo build --release --example jobs_bench --bin ringsocket
#   benches/jobs_bench.sh [ROUNDS] [CONNS]
#   TASK_CPU=0 benches/jobs_bench.sh   # the executor on the I/O core's CPU
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
CONNS=${2:-4}
PORT=${PORT:-9311}
# Where the executor thread runs, and its nice value (-10: the same as the rest).
TASK_CPU=${TASK_CPU:-1}
TASK_NICE=${TASK_NICE:--10}
DURATION=10
WARMUP=2
server=target/release/examples/jobs_bench
bench=target/release/ringsocket

run() {
    local mode=$1
    nice -n -10 taskset -c 0,1 "$server" "127.0.0.1:$PORT" --task-cpu "$TASK_CPU" --task-nice "$TASK_NICE" >/dev/null 2>&1 &
    local pid=$!
    sleep 0.5
    local driver=
    if [ "$mode" != idle ]; then
        local flag=
        [ "$mode" = inline ] && flag=--inline
        nice -n -10 taskset -c 1 python3 benches/jobs_stream.py "127.0.0.1:$PORT" \
            --rate 20 --duration $((DURATION + WARMUP + 1)) $flag >"/tmp/jobs_stream.$mode" &
        driver=$!
    fi
    local json
    json=$(nice -n -10 taskset -c 1 "$bench" bench echo "ws://127.0.0.1:$PORT/echo" \
        --conns "$CONNS" --inflight 1 --duration $DURATION --warmup $WARMUP \
        --server-pid "$pid" --json 2>/dev/null)
    local jobs=-
    if [ -n "$driver" ]; then
        wait "$driver"
        jobs=$(cat "/tmp/jobs_stream.$mode")
    fi
    local task_cpu
    task_cpu=$(ps -L -o psr=,comm= -p "$pid" | awk '/ringsocket-task/ {print $1}')
    local done_jobs
    done_jobs=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^ringsocket_tasks_done_total/ {print $2}')
    kill -INT "$pid"
    wait "$pid" || true
    python3 - "$mode" "$json" "$task_cpu" "$done_jobs" "$jobs" <<'EOF'
import json, sys
mode, report, cpu, done, jobs = sys.argv[1:]
r = json.loads(report)
lat = r["latency_us"]
print(f"{mode:8} msgs/s {r['messages_per_sec']:9.0f}  p50 {lat['p50']:9.1f} us  p99 {lat['p99']:9.1f} us"
      f"  p999 {lat['p999']:9.1f} us  max {lat['max']:9.1f} us  server cpu {r['cpu']['server_percent']}%"
      f"  cores busy {r['cpu']['cores_busy_percent']}  executor on cpu {cpu}, executor jobs done {done}  [{jobs}]")
EOF
}

for round in $(seq "$ROUNDS"); do
    echo "# round $round"
    for mode in idle executor inline; do
        run "$mode"
    done
done
