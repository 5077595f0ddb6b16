#!/usr/bin/env bash
# Installs the devDependencies (npm ci, when node_modules is missing or was installed from
# another package-lock.json) and runs the client's tests against a real `ringsocket serve`:
# RINGSOCKET_BIN, default ../../target/release/ringsocket (built by CI before this runs).
set -euo pipefail
cd "$(dirname "$0")"

stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -d node_modules ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  npm ci --no-audit --no-fund
  echo "$want" > "$stamp"
fi

bin=${RINGSOCKET_BIN:-../../target/release/ringsocket}
if [ ! -x "$bin" ]; then
  echo "clients/js/test.sh: no ringsocket binary at $bin (cargo build --release, or set RINGSOCKET_BIN)" >&2
  exit 1
fi

npm test
