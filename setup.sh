#!/usr/bin/env bash
# Set up voxc in ./.venv.  `./setup.sh` installs what transcription needs; `./setup.sh --test`
# adds the test oracle (CPU torch + transformers), the system tools the tests use, and test data.
# The web target (`voxc build --target webgpu`) also needs `apt-get install emscripten nodejs npm`
# (--test installs them); plain ./setup.sh says so when they are missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
if [ "${1:-}" = "--test" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q
    # espeak-ng + sox: deterministic speech clips; emscripten: the WebGPU wasm runtime; nodejs + npm:
    # the first webgpu build rolls up tvmjs (TVM's JS runtime) with npm; chromium: the browser test;
    # mesa-vulkan-drivers: lavapipe, a Vulkan driver for the wgpu and vulkan-target tests; g++: the
    # vulkan target's device plugin
    # (a Node.js that already brings npm, as NodeSource's does, conflicts with Debian's npm package: keep it)
    node_pkgs=""
    command -v node >/dev/null || node_pkgs="nodejs"
    command -v npm >/dev/null || node_pkgs="$node_pkgs npm"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng sox libsox-fmt-all emscripten $node_pkgs \
      chromium mesa-vulkan-drivers g++ >/dev/null
  fi
  .venv/bin/pip install -q -e '.[test]'
  # Only its speech clips are used; its own dependencies (an HTTP client, WER tools) are not needed.
  .venv/bin/pip install -q --no-deps pytest-audioeval==0.1.3
fi
echo "voxc is installed in $(pwd)/.venv: try .venv/bin/voxc demo"
if [ "${1:-}" != "--test" ]; then
  missing=$(for t in emcc node npm; do command -v "$t" >/dev/null || printf ' %s' "$t"; done)
  if [ -n "$missing" ]; then
    echo "The web target (voxc build --target webgpu) also needs Emscripten, Node.js and npm (missing:$missing):"
    echo "  apt-get install emscripten nodejs npm     (see web/README.md)"
  fi
fi
