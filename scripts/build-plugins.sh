#!/usr/bin/env bash
# Builds the example plugins in plugins/ and copies each one to DIR/NAME.wasm (default
# DIR: plugins.d), ready for `switchyard`, with its example sidecar
# plugins/NAME/sidecar.toml as DIR/NAME.toml when there is one. Rust plugins are built
# for wasm32-wasip2 with cargo; Python (app.py) and JavaScript (app.js) plugins with
# scripts/componentize.sh and the toolchains scripts/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-plugins.d}

names=()
for manifest in plugins/*/Cargo.toml; do
    names+=("$(basename "$(dirname "$manifest")")")
done
args=()
for name in "${names[@]}"; do args+=(-p "$name"); done

cargo build --quiet --target wasm32-wasip2 --profile guest --target-dir target/guests "${args[@]}"
mkdir -p "$out"
for name in "${names[@]}"; do
    cp "target/guests/wasm32-wasip2/guest/${name//-/_}.wasm" "$out/$name.wasm"
done
for app in plugins/*/app.py plugins/*/app.js; do
    [ -f "$app" ] || continue
    name=$(basename "$(dirname "$app")")
    scripts/componentize.sh "plugins/$name" "target/guests/polyglot/$name.wasm"
    cp "target/guests/polyglot/$name.wasm" "$out/$name.wasm"
    names+=("$name")
done
for name in "${names[@]}"; do
    if [ -f "plugins/$name/sidecar.toml" ]; then
        cp "plugins/$name/sidecar.toml" "$out/$name.toml"
    fi
done
echo "built ${#names[@]} plugins into $out/"
