#!/usr/bin/env bash
# Installs what building and testing Switchyard needs beyond a Rust toolchain:
# the wasm32-wasip2 target (plugins are built for it), rustfmt/clippy, and nats-server
# for the distributed-mode tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rustup >/dev/null 2>&1; then
    echo "setup: rustup is required (https://rustup.rs)" >&2
    exit 1
fi
# rust-toolchain.toml pins the toolchain; these act on it.
rustup component add rustfmt clippy >/dev/null
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

# The distributed-mode tests start their own `nats-server -js` (JetStream); Debian's
# package is enough (2.9 or later).
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && apt-get install -y -qq nats-server >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo apt-get install -y -qq nats-server >/dev/null
    else
        echo "setup: install the nats-server package (Debian: apt-get install nats-server)" >&2
        exit 1
    fi
fi
