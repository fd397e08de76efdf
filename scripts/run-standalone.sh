#!/usr/bin/env bash
# Runs one gateway standalone on the example config, with the embedded SQLite site store
# under $DATA_DIR (default /tmp/concentrator). Extra arguments go to concentrator-gateway,
# e.g. `scripts/run-standalone.sh --log-format json`. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages build-essential pkg-config ca-certificates iproute2
ensure_rust

DATA_DIR="${DATA_DIR:-/tmp/concentrator}"
CONFIG_DIR="${CONFIG_DIR:-examples}"
echo "==> building concentrator-gateway (release)"
cargo build --release --locked -p concentrator-gateway
exec "$CARGO_TARGET_DIR/release/concentrator-gateway" --config-dir "$CONFIG_DIR" --data-dir "$DATA_DIR" "$@"
