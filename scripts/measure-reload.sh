#!/usr/bin/env bash
# Quick measurement of hot reload with the release binary (the full benchmark suite is
# separate work): start-up time with three example plugins and a cold or a warm compile
# cache, and the time from an atomic file replace to the new version serving.
# Run scripts/build-plugins.sh and `cargo build --release -p switchyard-host` first.
set -eu
cd "$(dirname "$0")/.."
bin=target/release/switchyard
guests=target/guests/wasm32-wasip2/guest
work=$(mktemp -d)
trap 'kill -TERM "$(cat "$work/pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/plugins"
cp "$guests/audit_trail.wasm" "$work/plugins/audit-trail.wasm"
cp "$guests/ticketing.wasm" "$guests/notifier.wasm" "$work/plugins/"

start() {
    : > "$work/out"
    "$bin" serve --listen 127.0.0.1:0 --plugins "$work/plugins" --data "$work/data" > "$work/out" 2>/dev/null &
    echo $! > "$work/pid"
    while ! grep -q listening "$work/out"; do sleep 0.002; done
}
stop() {
    kill -TERM "$(cat "$work/pid")"
    while kill -0 "$(cat "$work/pid")" 2>/dev/null; do sleep 0.01; done
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

for run in 1 2 3; do
    rm -rf "$work/data"
    t=$(date +%s%N); start; cold=$(ms_since "$t"); stop
    t=$(date +%s%N); start; warm=$(ms_since "$t"); stop
    echo "start-up with 3 plugins: cold cache ${cold} ms, warm cache ${warm} ms"
done

start
url=$(sed 's/switchyard listening on //' "$work/out")
swap_to() { # FILE LABEL
    local want t
    want=$(sha256sum "$1" | cut -d' ' -f1)
    t=$(date +%s%N)
    mv "$1" "$work/plugins/audit-trail.wasm"
    until curl -s "$url/v1/plugins/audit-trail" | grep -q "$want"; do sleep 0.005; done
    echo "$2: $(ms_since "$t") ms"
}
for i in 1 2 3 4 5; do
    # New bytes every time (a custom section with a fresh label): compiled on load.
    { cat "$guests/audit_trail.wasm"; printf '\x00\x08\x03abc%04d' "$i"; } > "$work/new.wasm"
    swap_to "$work/new.wasm" "swap $i, new bytes (compiles)"
done
for i in 1 2 3; do
    cp "$guests/audit_trail.wasm" "$work/new.wasm"
    swap_to "$work/new.wasm" "swap $i, bytes seen before (compile cache hit)"
    { cat "$guests/audit_trail.wasm"; printf '\x00\x08\x03abc%04d' 1; } > "$work/new.wasm"
    swap_to "$work/new.wasm" "swap $i back, bytes seen before (compile cache hit)"
done
