#!/usr/bin/env bash
# Builds the peer echo and room (broadcast) servers that benches/README.md compares ringsocket with.
# Safe to run again: cargo and npm only redo what changed.
#
#   benches/peers/target/release/tt-echo PORT     tokio-tungstenite 0.27
#   benches/peers/target/release/fws-echo PORT    fastwebsockets 0.10 + hyper
#   benches/peers/target/release/tt-broadcast PORT    tokio-tungstenite 0.27, naive room
#   benches/peers/bun/node_modules/.bin/bun benches/peers/bun/echo.js PORT    Bun
#   benches/peers/bun/node_modules/.bin/bun benches/peers/bun/broadcast.js PORT    Bun rooms
set -euo pipefail
cd "$(dirname "$0")"

command -v cargo >/dev/null || { echo "build.sh: cargo is needed" >&2; exit 1; }
command -v npm >/dev/null || { echo "build.sh: npm is needed (apt-get install npm)" >&2; exit 1; }

echo "==> cargo build --release (tt-echo, fws-echo, tt-broadcast)"
cargo build --release --locked

echo "==> npm install (bun, from the npm package that ships its binary)"
(cd bun && npm install --no-audit --no-fund --loglevel=error)

echo "==> built:"
ls -1 "$PWD/target/release/tt-echo" "$PWD/target/release/fws-echo" "$PWD/target/release/tt-broadcast"
echo "$PWD/bun/node_modules/.bin/bun $(bun/node_modules/.bin/bun --version)"
