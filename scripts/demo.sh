#!/usr/bin/env bash
# Sets up, builds the host and the example plugins, and starts `switchyard serve` on
# the embedded log with the plugins in plugins.d/ (data in ./data). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet --locked -p switchyard-host
scripts/build-plugins.sh plugins.d
exec target/debug/switchyard serve --plugins plugins.d --data data "$@"
