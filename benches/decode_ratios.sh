#!/usr/bin/env bash
# Runs one decode group of benches/proto.rs RUNS times, pinned to one CPU, and prints
# per run the throughput ratio of ringsocket's variants to tungstenite and
# fastwebsockets (from criterion's median time per iteration; every variant of a group
# decodes the same frames, so the ratio of times is the ratio of frames/s), then the
# median of each ratio over the runs. All variants of a run share its machine state.
#
#   benches/decode_ratios.sh [RUNS=5] [GROUP=decode_small_frames] [CPU=1]
#
# BENCH_BIN names the bench executable to run (default: built by
# `cargo bench --bench proto --no-run`); criterion's data goes to a temporary directory.
set -euo pipefail
runs=${1:-5}
group=${2:-decode_small_frames}
cpu=${3:-1}
bin=${BENCH_BIN:-$(cargo bench --bench proto --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.executable != null and .target.name == "proto") | .executable')}
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
ours=(ringsocket ringsocket_owned ringsocket_8KiB_reads ringsocket_owned_8KiB_reads)
median_ns() { jq '.median.point_estimate' "$home/$group/$1/new/estimates.json"; }
results=()
for run in $(seq "$runs"); do
    CRITERION_HOME=$home taskset -c "$cpu" "$bin" --bench "^$group/" >/dev/null 2>&1
    tung=$(median_ns tungstenite)
    fast=$(median_ns fastwebsockets)
    line="run $run:"
    for v in "${ours[@]}"; do
        t=$(median_ns "$v")
        line+=$(awk -v t="$t" -v a="$tung" -v b="$fast" -v v="$v" \
            'BEGIN { printf "  %s %.2fx tung %.2fx fws", v, a / t, b / t }')
        results+=("$v $(awk -v t="$t" -v a="$tung" -v b="$fast" 'BEGIN { print a / t, b / t }')")
    done
    echo "$line"
done
echo "medians over $runs runs:"
for v in "${ours[@]}"; do
    printf '%s\n' "${results[@]}" | awk -v v="$v" '$1 == v { print $2, $3 }' |
        sort -n -k1,1 | awk -v v="$v" '{ a[NR] = $1 } END { printf "  %s vs tungstenite %.2fx", v, a[int((NR + 1) / 2)] }'
    printf '%s\n' "${results[@]}" | awk -v v="$v" '$1 == v { print $3 }' |
        sort -n | awk '{ a[NR] = $1 } END { printf ", vs fastwebsockets %.2fx\n", a[int((NR + 1) / 2)] }'
done
