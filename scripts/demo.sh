#!/usr/bin/env bash
# Sets up, builds the example plugins and runs a payment through the ticketing flow:
# `switchyard check` on each plugin, then `switchyard invoke` of a payment.completed
# event into `ticketing`, whose emitted tickets.generated event goes into `notifier`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet --release --locked -p switchyard-host
scripts/build-plugins.sh plugins.d
bin=target/release/switchyard

$bin check plugins.d/*.wasm

echo
echo "== payment.completed -> ticketing"
payment='{"order_id":"A-1001","amount_cents":9000,"email":"fan@example.com","quantity":2}'
outcome=$($bin invoke plugins.d/ticketing.wasm --type payment.completed --data "$payment")
echo "$outcome"

echo
echo "== tickets.generated -> notifier"
tickets=$(printf '%s' "$outcome" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["result"]["emits"][0]["data"]))')
$bin invoke plugins.d/notifier.wasm --type tickets.generated --data "$tickets"
