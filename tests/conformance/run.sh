# Autobahn TestSuite conformance, sections 1-10 and 12-13 (517 cases: 12 and 13 are
# permessage-deflate), driven by kosoku (PyPI) against `ringsocket serve`'s /echo.
# Installs kosoku into a venv under target/ the first time. Fails on any case that is
# not OK or INFORMATIONAL, or that differs from tests/conformance/expected.txt.
#
#   bash tests/conformance/run.sh            # check
#   UPDATE_EXPECTED=1 bash tests/conformance/run.sh   # rewrite expected.txt
#   CONFORMANCE_TLS=1 bash tests/conformance/run.sh   # the same over TLS
#   CONFORMANCE_SKIP_SECTIONS="12 13" bash tests/conformance/run.sh   # leave sections out
#
# kosoku has no wss:// (it refuses the scheme). Over TLS, the server gets a throwaway
# certificate (examples/test_cert.rs, made by rcgen at run time) and kosoku talks to
# socat, which opens a TLS connection (OpenSSL, verifying the test CA) to the server
# for each of kosoku's connections: every byte the server reads and writes then goes
# through its TLS layer.
#
# Sections 12-13 run with compression_min_bytes=0 (every message compressed): kosoku
# 0.1.0 hands an uncompressed message on a deflate connection to its cases as a str,
# which they cannot hash, so a small or incompressible message sent plain (what the
# default of 256 does, and RFC 7692 allows: RSV1 is per message) fails the case.
set -euo pipefail
cd "$(dirname "$0")/../.."

KOSOKU_VERSION=0.1.0
VENV=target/kosoku-venv
if ! "$VENV/bin/kosoku" --help >/dev/null 2>&1; then
    echo "installing kosoku $KOSOKU_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
fi

cargo build --release --quiet --bin ringsocket

work=$(mktemp -d)
tls_flags=()
if [ "${CONFORMANCE_TLS:-0}" = 1 ]; then
    command -v socat >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat
    }
    cargo run --quiet --release --example test_cert -- "$work/certs" >/dev/null
    tls_flags=(--tls-cert "$work/certs/cert.pem" --tls-key "$work/certs/key.pem")
fi
# Sections 9.x send messages up to 16 MiB: the conformance server raises the message
# limit (default 1 MiB) and the outbound queue limit (default 4 MiB) for them.
./target/release/ringsocket serve --bind 127.0.0.1:0 --workers 2 \
    --set max_message_size=67108864 --set max_frame_size=67108864 \
    --set max_outbound_bytes=268435456 --set compression_min_bytes=0 \
    "${tls_flags[@]}" >"$work/server.log" 2>&1 &
server=$!
bridge=""
trap 'kill "$server" $bridge 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

url=""
for _ in $(seq 1 100); do
    url=$(grep -o 'wss\?://[^ ]*/echo' "$work/server.log" | head -n 1 || true)
    [ -n "$url" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; echo "server exited"; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { cat "$work/server.log"; echo "server did not start"; exit 1; }
if [ "${CONFORMANCE_TLS:-0}" = 1 ]; then
    port=${url#wss://127.0.0.1:}
    port=${port%%/*}
    bridge_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    socat "TCP-LISTEN:$bridge_port,bind=127.0.0.1,fork,reuseaddr,nodelay" \
        "OPENSSL:localhost:$port,cafile=$work/certs/ca.pem,nodelay" 2>"$work/socat.log" &
    bridge=$!
    sleep 0.3
    echo "over TLS: kosoku -> socat (127.0.0.1:$bridge_port) -> $url"
    url="ws://127.0.0.1:$bridge_port/echo"
fi
echo "kosoku against $url $(grep -o '([a-z_]* backend)' "$work/server.log" | head -n 1)"

skip=()
for section in ${CONFORMANCE_SKIP_SECTIONS:-}; do
    skip+=(-x "$section.*")
done
# Section 11 does not exist in the suite.
"$VENV/bin/kosoku" "$url" -p 4 "${skip[@]}" -o "$work/reports" >"$work/kosoku.log" 2>&1 || true
tail -n 1 "$work/kosoku.log"
python3 tests/conformance/check.py "$work/reports" tests/conformance/expected.txt
