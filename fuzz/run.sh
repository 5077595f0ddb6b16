#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) on a temporary copy of its seed corpus
# in fuzz/corpus/<target>/, so the checked-in seeds stay as they are.
#
#   bash fuzz/run.sh [SECONDS]
#   FUZZ_TARGETS="handshake roundtrip"   only these targets (default: all)
#   FUZZ_CPU=1                           pin the fuzzer to this CPU (taskset -c)
#
# Prints one line per target with libFuzzer's execution count; each target's full log
# is in fuzz/target/fuzz-logs/<target>.log. Exits non-zero if any target crashed,
# naming the target and the input that crashed it (under fuzz/artifacts/<target>/).
# Needs a C++ compiler (libFuzzer is built from source by libfuzzer-sys).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly flags (-Z sanitizer, coverage options) to rustc.
export RUSTC_BOOTSTRAP=1

pin=()
if [[ -n "${FUZZ_CPU:-}" ]]; then
    pin=(taskset -c "$FUZZ_CPU")
fi
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"

logs="target/fuzz-logs"
mkdir -p "$logs"
echo "building ${targets[*]} (log: fuzz/$logs/build.log)"
if ! cargo fuzz build >"$logs/build.log" 2>&1; then
    tail -n 30 "$logs/build.log" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    corpus="$work/$target"
    mkdir -p "$corpus"
    if [[ -d "corpus/$target" ]]; then
        cp -R "corpus/$target/." "$corpus/"
    fi
    status=0
    "${pin[@]}" cargo fuzz run "$target" "$corpus" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs="$(grep -o 'number_of_executed_units: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)"
    if [[ $status -eq 0 ]]; then
        printf '%-14s ok     %12s executions in %s s\n' "$target" "${execs:-?}" "$secs"
    else
        artifact="$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | cut -d' ' -f5 || true)"
        why="$(grep -m 1 -A 1 -E 'panicked at|ERROR: ' "$log" | tr '\n' ' ' || true)"
        printf '%-14s CRASH  %12s executions (exit %s)\n' "$target" "${execs:-?}" "$status"
        printf '    artifact: %s\n    reason:   %s\n    log:      fuzz/%s\n' \
            "${artifact:-none}" "${why:-see the log}" "$log"
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "crashed: ${failed[*]}; reproduce with: cargo fuzz run <target> <artifact>" >&2
    exit 1
fi
