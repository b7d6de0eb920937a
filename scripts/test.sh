#!/usr/bin/env bash
# Sets up the machine and runs every test of the workspace: unit tests, the
# integration tests in tests/ (which build the guest plugins) and the SDK's tests.
# Ends with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --quiet "$@" 2>&1 | tee "$log" || status=$?
echo
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
