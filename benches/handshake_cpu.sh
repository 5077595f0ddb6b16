#!/usr/bin/env bash
# Server CPU per WebSocket handshake, in µs, from the kernel's per-thread run time
# (/proc/PID/task/*/schedstat, nanoseconds) rather than `/proc` ticks: ROUNDS times,
# 10,000 connections are opened (at most 256 handshakes at a time) by
# `ringsocket bench connect` on CPU 1 against the server on CPU 0, and the server's run
# time while they open is divided by 10,000. One server process serves every round.
#
#   benches/handshake_cpu.sh ROUNDS PORT URL_PATH SERVER_ARGV...
#   benches/handshake_cpu.sh 3 9460 /echo target/release/ringsocket serve --bind 127.0.0.1:9460 --workers 1
#   benches/handshake_cpu.sh 3 9461 / benches/peers/bun/node_modules/.bin/bun benches/peers/bun/echo.js 9461
#
# Alternate servers round by round (the machine drifts) and compare medians.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,12p "$0"; exit 2; }
ROUNDS=$1; PORT=$2; URL_PATH=$3; shift 3
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/target/release/ringsocket"
[ -x "$BENCH" ] || { echo "handshake_cpu.sh: build first: cargo build --release" >&2; exit 1; }
ulimit -n 20000
taskset -c 0 "$@" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
sleep 1
run_ns() { cat /proc/$SERVER/task/*/schedstat | awk '{s += $1} END {print s}'; }
for _ in $(seq "$ROUNDS"); do
    before=$(run_ns)
    taskset -c 1 "$BENCH" bench connect "ws://127.0.0.1:$PORT$URL_PATH" --conns 10000 \
        --hold 2.5 --threads 1 >/tmp/handshake_cpu.$$.out 2>&1 &
    LOAD=$!
    # Opening takes well under a second here; the hold that follows costs the server
    # nothing, and the closing starts only after it.
    sleep 1.8
    after=$(run_ns)
    wait $LOAD || true
    if ! grep -q "opened      10,000" /tmp/handshake_cpu.$$.out; then
        echo "handshake_cpu.sh: not every connection opened:" >&2
        cat /tmp/handshake_cpu.$$.out >&2
        exit 1
    fi
    awk -v ns=$((after - before)) 'BEGIN {printf "%.1f ", ns / 10000 / 1000}'
    sleep 1
done
rm -f /tmp/handshake_cpu.$$.out
echo "µs per handshake"
