#!/usr/bin/env bash
# The demo page in a real browser: tests/browser/demo.test.mjs drives headless Chromium
# (Debian's, through playwright-core) against `ringsocket serve`. Installs what it needs
# when it is missing (chromium and redis-server from apt, playwright-core with npm ci), so
# it runs on a clean clone. Screenshots and the servers' logs go to target/browser/ at the
# repo root.
#
#   bash tests/browser/run.sh                                  # builds target/release first if needed
#   RINGSOCKET_BIN=/path/to/ringsocket bash tests/browser/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

apt_install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
[ -x /usr/bin/chromium ] || apt_install chromium
command -v redis-server >/dev/null || apt_install redis-server
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm ci --no-audit --no-fund)

if [ -z "${RINGSOCKET_BIN:-}" ]; then
  RINGSOCKET_BIN="$root/target/release/ringsocket"
  [ -x "$RINGSOCKET_BIN" ] || (cd "$root" && cargo build --release --bin ringsocket)
fi
export RINGSOCKET_BIN
export SHOTS_DIR="${SHOTS_DIR:-$root/target/browser}"
mkdir -p "$SHOTS_DIR"
rm -f "$SHOTS_DIR"/*.png "$SHOTS_DIR/server.log"

echo "browser test: $(/usr/bin/chromium --version 2>/dev/null), node $(node --version), server $RINGSOCKET_BIN"
cd "$here"
exec node --test-reporter=spec demo.test.mjs
