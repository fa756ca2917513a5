#!/usr/bin/env bash
# voxc's web bundle in Node.js on Dawn (Chrome's WebGPU) on the lent GPU, through web/voxc.js.
#
#   bash bench/device/webgpu_bench.sh pack    # here: build .webgpupack/ (see below; FULL=q4k for Q4_K only)
#   run(command="bash bench/device/webgpu_bench.sh run", carry=[".webgpupack"], kind="nvidia-h100-x1")
#   bash bench/device/webgpu_bench.sh local   # here: the same run on Chromium's SwiftShader (tiny only)
#
# .webgpupack/ holds what the GPU machine lacks (it has no node, no Vulkan loader, no network):
#   node.gz        this machine's node binary (v20), gzipped
#   webgpu.tgz     npm "webgpu" 0.6.2 (Dawn as dawn.node), linux-x64 only
#   debs/          Debian's libvulkan1 (the loader; the NVIDIA ICD is on the machine)
#   tiny.tgz       the tiny model's bundle WITH weights (windows 750/8192, the 4B model's structure),
#                  expect.json + clip.f32: the token ids the CPU (llvm) build gives for that clip
#   tiny_q4k.tgz   the same check for Q4_K weights: a small model whose widths are multiples of 256
#                  (tests/test_webgpu_quant.py's), built --quantization q4_k, tokens of its llvm Q4_K build
#   full.tgz       the 4B model's bundle (ModelConfig(), float32, split token table) WITHOUT weights:
#                  voxc.js fills 16.5 GB of random weights on the GPU (--weights random)
#   full_q4k.tgz   the 4B model with Q4_K projections and token table (split in blocks < 128 MiB),
#                  WITHOUT weights: 2.6 GB of random packed levels and finite scales on the GPU
# `run` writes $OUT/tiny.json, $OUT/tiny_q4k.json (check: tokens equal the CPU's), $OUT/full.json and
# $OUT/full_q4k.json (load, stream RTF + per-feed latency, decode step with and without the token
# readback, encode windows of 1 and 32 tokens, offline RTF of a 60 s clip, on the 4B model's shapes)
# plus a .log each.  Kernel-level timing: decode_nosync.ms_per_step is the GPU time of one decoder
# step (26 layers of Q4 GEMVs + attention + the LM head), decode_step adds the token readback.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK="$ROOT/.webgpupack"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
FULL=${FULL:-q4k,f32}   # which full-size bundles `pack` builds: q4k, f32 or both
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
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" - "$PACK/stage" "$FULL" <<'EOF'
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
rng = np.random.default_rng(0)
t = np.arange(int(16000 * 3.0)) / 16000
pcm = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def tiny_case(name, ckpt, quantization=None):
    tiny = build(ckpt, "webgpu", stage / name, progress=False, quantization=quantization)
    cpu = voxc.load(build(ckpt, "llvm", stage / (name + "_llvm"), progress=False, quantization=quantization))
    (tiny / "clip.f32").write_bytes(pcm.astype("<f4").tobytes())
    s = StreamingSession(cpu, delay_ms=480, left_pad_tokens=cpu.left_pad_tokens)
    for i in range(0, len(pcm), 1280):
        s.feed(pcm[i:i + 1280])
    s.finish()
    (tiny / "expect.json").write_text(json.dumps({"clip": {"file": "clip.f32"}, "chunk": 1280, "delay_ms": 480,
                                                  "tokens": s.tokens}))
    print(name + ": expect", len(s.tokens), "tokens", flush=True)


sys.path.insert(0, "tests")
from test_webgpu_quant import q4k_config

tiny_case("tiny", make_tiny(stage / "tiny_ckpt"))
tiny_case("tiny_q4k", make_tiny(stage / "tiny_q4k_ckpt", seed=5, config=q4k_config()), "q4_k")
if "f32" in sys.argv[2].split(","):
    webgpu.write_benchmark_bundle(stage / "full", progress=False)
    print("full: written", flush=True)
if "q4k" in sys.argv[2].split(","):
    webgpu.write_benchmark_bundle(stage / "full_q4k", quantization="q4_k", progress=False)
    print("full_q4k: written", flush=True)
EOF
  )
  for b in tiny tiny_q4k full full_q4k; do
    [ -d "$PACK/stage/$b" ] && tar -C "$PACK/stage" -czf "$PACK/$b.tgz" "$b"
  done
  rm -rf "$PACK/stage"
  du -sh "$PACK"/* "$PACK"
}

unpack() {   # into /tmp/webgpu: node, node_modules/webgpu, the bundles
  local dst=/tmp/webgpu
  rm -rf "$dst" && mkdir -p "$dst/bin" "$dst/node_modules"
  gzip -dc "$PACK/node.gz" > "$dst/bin/node" && chmod +x "$dst/bin/node"
  tar -C "$dst/node_modules" -xzf "$PACK/webgpu.tgz"
  for b in tiny tiny_q4k full full_q4k; do
    [ -f "$PACK/$b.tgz" ] && tar -C "$dst" -xzf "$PACK/$b.tgz"
  done
  return 0
}

run_bench() {   # $1: what (tiny|full|all); env as set up by the caller
  local dst=/tmp/webgpu node=/tmp/webgpu/bin/node b
  export VOXC_WEBGPU_MODULE=$dst/node_modules/webgpu
  if [ "$1" = tiny ] || [ "$1" = all ]; then
    for b in tiny tiny_q4k; do
      [ -d "$dst/$b" ] || continue
      "$node" "$ROOT/bench/webgpu_dawn.mjs" "$dst/$b" --expect "$dst/$b/expect.json" --steps 100 \
        --json "$OUT/$b.json" > "$OUT/$b.log" 2>&1 || echo "$b: FAILED (see $b.log)"
      tail -c 600 "$OUT/$b.log"; echo
    done
  fi
  if [ "$1" = full ] || [ "$1" = all ]; then
    for b in full_q4k full; do   # Q4_K first: the issue's question
      [ -d "$dst/$b" ] || continue
      "$node" "$ROOT/bench/webgpu_dawn.mjs" "$dst/$b" --weights random --seconds ${SECONDS_AUDIO:-10} \
        --steps ${STEPS:-200} --offline-seconds ${OFFLINE_SECONDS:-60} --json "$OUT/$b.json" > "$OUT/$b.log" 2>&1 \
        || echo "$b: FAILED (see $b.log)"
      tail -c 2500 "$OUT/$b.log"; echo
    done
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
