#!/usr/bin/env bash
# The peers of the benchmark, in one run: builds the Extism no-op plug-in and the runner
# (their own workspace and target directory, so Extism's wasmtime never touches the
# project's build), then runs Switchyard's dispatch figures and Extism's side by side.
# Usage: bench/peers/run.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")"
rustup target add wasm32-unknown-unknown >/dev/null
cargo build --quiet --release --locked -p peer-noop --target wasm32-unknown-unknown
cargo build --quiet --release --locked -p peer-runner
exec target/release/peer-runner target/wasm32-unknown-unknown/release/peer_noop.wasm "$@"
