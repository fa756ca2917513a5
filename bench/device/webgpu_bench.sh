#!/usr/bin/env bash
# voxc's web bundle in Node.js on Dawn (Chrome's WebGPU) on the lent GPU, through web/voxc.js.
#
#   bash bench/device/webgpu_bench.sh pack    # here: build .webgpupack/ (about 50 MB, see below)
#   run(command="bash bench/device/webgpu_bench.sh run", carry=[".webgpupack"], kind="nvidia-h100-x1")
#   bash bench/device/webgpu_bench.sh local   # here: the same run on Chromium's SwiftShader (tiny only)
#
# .webgpupack/ holds what the GPU machine lacks (it has no node, no Vulkan loader, no network):
#   node.gz        this machine's node binary (v20), gzipped
#   webgpu.tgz     npm "webgpu" 0.6.2 (Dawn as dawn.node), linux-x64 only
#   debs/          Debian's libvulkan1 (the loader; the NVIDIA ICD is on the machine)
#   tiny.tgz       the tiny model's bundle WITH weights (windows 750/8192, the 4B model's structure),
#                  expect.json + clip.f32: the token ids the CPU (llvm) build gives for that clip
#   full.tgz       the 4B model's bundle (ModelConfig(), float32, split token table) WITHOUT weights:
#                  voxc.js fills 16.5 GB of random weights on the GPU (--weights random)
# `run` writes $OUT/tiny.json (check: tokens equal the CPU's) and $OUT/full.json (load, stream RTF,
# decode step, encode windows on the 4B model's shapes) plus logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK="$ROOT/.webgpupack"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WHAT=${1:-run}
DAWN_CACHE="${VOXC_CACHE_DIR:-$HOME/.cache/voxc}/dawn-node-webgpu-0.6.2"

pack() {
  grep -qx '/.webgpupack/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.webgpupack/' >> "$ROOT/.git/info/exclude"
  rm -rf "$PACK" && mkdir -p "$PACK/debs" "$PACK/stage"
  # node + Dawn
  gzip -9 -c "$(readlink -f "$(command -v node)")" > "$PACK/node.gz"
  if [ ! -f "$DAWN_CACHE/node_modules/webgpu/dist/linux-x64/dawn.node" ]; then
    mkdir -p "$DAWN_CACHE" && (cd "$DAWN_CACHE" && npm init -y >/dev/null && \
      npm install --no-audit --no-fund --ignore-scripts webgpu@0.6.2 >/dev/null)
  fi
  tar -C "$DAWN_CACHE/node_modules" -czf "$PACK/webgpu.tgz" webgpu/package.json webgpu/index.js \
    webgpu/dist/linux-x64/dawn.node
  # the Vulkan loader (the device tool's README: amd64 package lists in /tmp/amd64)
  local o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64"
  mkdir -p /tmp/amd64/partial
  [ -n "$(ls /tmp/amd64/*Packages* 2>/dev/null)" ] || apt-get $o update >/dev/null
  (cd "$PACK/debs" && apt-get $o download libvulkan1 >/dev/null)
  # bundles
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" - "$PACK/stage" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from targets import webgpu
from voxc.build import build
from voxc.loader.tiny import make_tiny
from voxc.runtime.session import StreamingSession
import voxc

stage = Path(sys.argv[1])
ckpt = make_tiny(stage / "tiny_ckpt")
tiny = build(ckpt, "webgpu", stage / "tiny", progress=False)
cpu = voxc.load(build(ckpt, "llvm", stage / "tiny_llvm", progress=False))
rng = np.random.default_rng(0)
t = np.arange(int(16000 * 3.0)) / 16000
pcm = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
(tiny / "clip.f32").write_bytes(pcm.astype("<f4").tobytes())
s = StreamingSession(cpu, delay_ms=480, left_pad_tokens=cpu.left_pad_tokens)
for i in range(0, len(pcm), 1280):
    s.feed(pcm[i:i + 1280])
s.finish()
(tiny / "expect.json").write_text(json.dumps({"clip": {"file": "clip.f32"}, "chunk": 1280, "delay_ms": 480,
                                              "tokens": s.tokens}))
print("tiny: expect", len(s.tokens), "tokens")
webgpu.write_benchmark_bundle(stage / "full")
print("full: written")
EOF
  )
  tar -C "$PACK/stage" -czf "$PACK/tiny.tgz" tiny
  tar -C "$PACK/stage" -czf "$PACK/full.tgz" full
  rm -rf "$PACK/stage"
  du -sh "$PACK"/* "$PACK"
}

unpack() {   # into /tmp/webgpu: node, node_modules/webgpu, the bundles
  local dst=/tmp/webgpu
  rm -rf "$dst" && mkdir -p "$dst/bin" "$dst/node_modules"
  gzip -dc "$PACK/node.gz" > "$dst/bin/node" && chmod +x "$dst/bin/node"
  tar -C "$dst/node_modules" -xzf "$PACK/webgpu.tgz"
  tar -C "$dst" -xzf "$PACK/tiny.tgz"
  tar -C "$dst" -xzf "$PACK/full.tgz"
}

run_bench() {   # $1: what (tiny|full|all); env as set up by the caller
  local dst=/tmp/webgpu node=/tmp/webgpu/bin/node
  export VOXC_WEBGPU_MODULE=$dst/node_modules/webgpu
  if [ "$1" = tiny ] || [ "$1" = all ]; then
    "$node" "$ROOT/bench/webgpu_dawn.mjs" "$dst/tiny" --expect "$dst/tiny/expect.json" --steps 100 \
      --json "$OUT/tiny.json" > "$OUT/tiny.log" 2>&1 || echo "tiny: FAILED (see tiny.log)"
    tail -c 600 "$OUT/tiny.log"
  fi
  if [ "$1" = full ] || [ "$1" = all ]; then
    "$node" "$ROOT/bench/webgpu_dawn.mjs" "$dst/full" --weights random --seconds ${SECONDS_AUDIO:-10} \
      --steps ${STEPS:-200} --json "$OUT/full.json" > "$OUT/full.log" 2>&1 || echo "full: FAILED (see full.log)"
    tail -c 2500 "$OUT/full.log"
  fi
}

case "$WHAT" in
  pack) pack ;;
  run)
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    for f in "$PACK"/debs/*.deb; do dpkg -x "$f" /; done; ldconfig
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
      export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
    unpack
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    run_bench "${2:-all}"
    ;;
  local)   # no GPU here: Dawn on Chromium's SwiftShader Vulkan driver (lavapipe is refused by Dawn)
    OUT=${OUT:-/tmp/webgpu-local}; mkdir -p "$OUT"
    export VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-/usr/lib/chromium/vk_swiftshader_icd.json}
    export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
    unpack
    run_bench tiny
    ;;
  *) echo "usage: $0 pack|run [tiny|full|all]|local" >&2; exit 2 ;;
esac
