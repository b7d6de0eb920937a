#!/usr/bin/env bash
# Sets up the machine and runs every test of the workspace: unit tests, the
# integration tests in tests/ (which build the guest plugins) and the SDK's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
