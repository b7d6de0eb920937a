#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for a bounded time (default 20 s,
# so about a minute for the three), starting from the committed corpus. Prints the number
# of executions per target and fails if any target crashes, hangs or runs out of memory.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Runs on the pinned stable toolchain, no nightly needed: with `-s none` (no sanitizer,
# which would take nightly's -Zsanitizer) cargo fuzz passes only stable rustc flags. The
# targets are built with debug assertions and overflow checks, so the fuzzers catch
# panics, overflows, failed assertions, hangs and memory blow-ups.
# New inputs found here go to a temporary directory, so a run leaves the tree clean; to
# refresh the committed corpus, see "Fuzzing" in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

# -s none: no sanitizer. --codegen-units 16: cargo-fuzz's default of 1 would make the
# wasmtime build that comes with the host crate several times slower.
fuzz=(--fuzz-dir fuzz -s none --codegen-units 16)

# cargo fuzz has no --locked: check fuzz/Cargo.lock is up to date (and fetch) first.
cargo fetch --locked --manifest-path fuzz/Cargo.toml
targets=$(cargo fuzz list --fuzz-dir fuzz)
cargo fuzz build "${fuzz[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=0
summary=()
for target in $targets; do
    case $target in
        cloudevents_http) dict=fuzz/dict/cloudevents_http.dict ;;
        *) dict=fuzz/dict/toml.dict ;;
    esac
    mkdir -p "$work/$target" fuzz/corpus/"$target"
    log=$work/$target.log
    echo "fuzz: $target for ${seconds}s"
    # The first corpus directory is the one libFuzzer writes new inputs to.
    if cargo fuzz run "${fuzz[@]}" "$target" "$work/$target" fuzz/corpus/"$target" \
        fuzz/seeds/"$target" -- -max_total_time="$seconds" -timeout=10 -dict="$dict" \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        # libFuzzer's last status line: "#RUNS DONE cov: EDGES ft: FEATURES corp: N/SIZE ..."
        last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
        cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
        corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
        summary+=("$target: ${runs:-?} executions in ${seconds}s, ${cov:-?} edges, corpus ${corp:-?} inputs")
    else
        status=1
        tail -n 60 "$log"
        summary+=("$target: FAILED (input saved under fuzz/artifacts/$target/)")
    fi
done

echo
for line in "${summary[@]}"; do
    echo "fuzz: $line"
done
exit "$status"
