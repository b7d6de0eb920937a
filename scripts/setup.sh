#!/usr/bin/env bash
# Installs what building and testing Switchyard needs beyond a Rust toolchain:
# the wasm32-wasip2 target (plugins are built for it) and rustfmt/clippy.
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
