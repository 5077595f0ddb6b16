#!/usr/bin/env bash
# What a JWT costs the server per WebSocket handshake: server CPU per handshake
# (benches/handshake_cpu.sh: 10,000 connections, server on CPU 0, `ringsocket bench
# connect` on CPU 1) without a token, with an HS256 token (`jwt_secret`) and with an
# ES256 token (`jwt_public_key`), one round of each in turn, ROUNDS times. The tokens
# are made by examples/jwt_token.rs; the ES256 key pair is made at run time.
#
#   cargo build --release --examples && benches/jwt_handshake.sh [ROUNDS]
#
# Prints one line per round, then the medians; quote the medians side by side.
set -euo pipefail
ROUNDS=${1:-3}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release/ringsocket"
TOKEN="$ROOT/target/release/examples/jwt_token"
for f in "$BIN" "$TOKEN"; do
    [ -x "$f" ] || { echo "jwt_handshake.sh: build first: cargo build --release --examples" >&2; exit 1; }
done
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
HS=$("$TOKEN" hs256 "$SECRET" bench 3600 lobby)
ES=$("$TOKEN" es256 "$DIR" bench 3600 lobby)
serve() { echo "$BIN" serve --bind "127.0.0.1:$1" --workers 1; }
declare -A all
for round in $(seq "$ROUNDS"); do
    none=$("$ROOT/benches/handshake_cpu.sh" 1 9470 /echo $(serve 9470) | awk '{print $1}')
    hs=$("$ROOT/benches/handshake_cpu.sh" 1 9471 "/echo?token=$HS" $(serve 9471) \
        --set "jwt_secret=$SECRET" | awk '{print $1}')
    es=$("$ROOT/benches/handshake_cpu.sh" 1 9472 "/echo?token=$ES" $(serve 9472) \
        --set "jwt_public_key=$DIR/jwt.pub.pem" | awk '{print $1}')
    echo "round $round: no token $none µs, HS256 $hs µs, ES256 $es µs per handshake"
    all[none]+="$none "; all[hs]+="$hs "; all[es]+="$es "
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
m_none=$(echo "${all[none]}" | median); m_hs=$(echo "${all[hs]}" | median); m_es=$(echo "${all[es]}" | median)
echo "median: no token $m_none µs, HS256 $m_hs µs ($(awk -v a="$m_hs" -v b="$m_none" 'BEGIN {printf "%.2f", a / b}')×), ES256 $m_es µs ($(awk -v a="$m_es" -v b="$m_none" 'BEGIN {printf "%.2f", a / b}')×)"
