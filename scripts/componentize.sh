#!/usr/bin/env bash
# Builds a plugin written in Python (DIR/app.py) or JavaScript (DIR/app.js) into the
# component OUT, with the pinned toolchains that scripts/setup.sh installs into
# .tools/bin and the SDK and WIT in plugin-sdk/python or plugin-sdk/js. A JavaScript plugin imports
# the SDK as "./switchyard.js", which is put beside it for the build.
# Does nothing when OUT is newer than the plugin's and the SDK's files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ne 2 ]; then
    echo "usage: $0 PLUGIN_DIR OUT.wasm" >&2
    exit 2
fi
dir=$(cd "$1" && pwd)
out=$2
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

if [ -f "$dir/app.py" ]; then
    sdk="$root/plugin-sdk/python"
elif [ -f "$dir/app.js" ]; then
    sdk="$root/plugin-sdk/js"
else
    echo "$0: $dir has neither app.py nor app.js" >&2
    exit 2
fi
if [ -f "$out" ] && [ -z "$(find "$dir" "$sdk" -newer "$out" -type f | head -n 1)" ]; then
    exit 0
fi

tools="$root/.tools/bin"
if [ ! -x "$tools/componentize-py" ] || [ ! -x "$tools/componentize-js" ]; then
    echo "$0: the plugin toolchains are not installed; run scripts/setup.sh" >&2
    exit 1
fi
if [ -f "$dir/app.py" ]; then
    (cd "$dir" && "$tools/componentize-py" --quiet \
        -d "$sdk/wit" -w batch-plugin componentize app -p "$dir" -p "$sdk" -o "$out.tmp")
else
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    cp -r "$dir"/. "$stage"/
    cp "$sdk/switchyard.js" "$stage/switchyard.js"
    "$tools/componentize-js" "$stage/app.js" -w "$sdk/wit" -n batch-plugin -o "$out.tmp" >/dev/null
fi
mv "$out.tmp" "$out"
