#!/usr/bin/env bash
# voxc's web bundle in Node.js on Dawn (Chrome's WebGPU) on the GPU machine, through web/voxc.js.
#
#   bash bench/device/webgpu_bench.sh pack    # here: build .webgpupack/ (see below; FULL=q4k for Q4_K only)
#   run(command="bash bench/device/webgpu_bench.sh run", carry=[".webgpupack"], kind="nvidia-h100-x1")
#   bash bench/device/webgpu_bench.sh local   # here (what CI runs): a temporary pack of the tiny bundle only
#                                             # (wasm linked without binaryen), run on Chromium's SwiftShader
#
# .webgpupack/ holds what the GPU machine lacks (it has no node, no Vulkan loader, no network):
#   node.gz        this machine's node binary (v20), gzipped
#   webgpu.tgz     npm "webgpu" 0.6.2 (Dawn as dawn.node), linux-x64 only
#   debs/          Debian's Vulkan loader packages (bench/device/vulkan_loader.sh; the NVIDIA ICD is on the
#                  machine) and the glvnd libraries, without which Dawn found no adapter on the H100 machine
#   tiny.tgz       the tiny model's bundle WITH weights (windows 750/8192, the 4B model's structure),
#                  expect.json + clip.f32: the token ids the CPU (llvm) build gives for that clip
#   tiny_q4k.tgz   the same check for Q4_K weights: a small model whose widths are multiples of 256
#                  (tests/test_webgpu_quant.py's), built --quantization q4_k, tokens of its llvm Q4_K build
#   full.tgz       the 4B model's bundle (ModelConfig(), float32, split token table) WITHOUT weights
#                  (build(..., weights=False)): voxc.js fills 16.5 GB of random weights on the GPU
#   full_q4k.tgz   the 4B model with Q4_K projections and token table (split in blocks < 128 MiB),
#                  WITHOUT weights: 2.6 GB of random packed levels and finite scales on the GPU
# (bench/webgpu_pack.py builds the bundles.)
# `run` writes $OUT/tiny.json, $OUT/tiny_q4k.json (check: tokens equal the CPU's), $OUT/full.json and
# $OUT/full_q4k.json (load, stream RTF + per-feed latency, decode step with and without the token
# readback, encode windows of 1 and 32 tokens, offline RTF of a 60 s clip, on the 4B model's shapes)
# plus a .log each.  Kernel-level timing: decode_nosync.ms_per_step is the GPU time of one decoder
# step (26 layers of Q4 GEMVs + attention + the LM head), decode_step adds the token readback;
# $OUT/<bundle>.profile.json times every kernel of one decoder step and one 80 ms stream step
# (timestamp queries: per kernel total ms and count, largest first; the top 15 are in the .log).
# `local` checks that profile (names are the bundle's kernels, times > 0, sum within the wall time).
# Load: load.pipelines_s is the time creating the kernels' pipelines (PIPELINES=async|blocking, see
# below); $OUT/tiny_q4k_blocking.json repeats the tiny Q4_K check with blocking pipeline creation
# (COMPARE_PIPELINES=blocking|async|"": which way, or none) so both ways are timed on one machine.
# Whether a bundle's kernels fit WebGPU's default limits, by Dawn's own validation:
#   VOXC_WEBGPU_MODULE=$DST/node_modules/webgpu $DST/bin/node bench/webgpu_default_limits.mjs $DST/full_q4k
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="${PYTHON:-$ROOT/.venv/bin/python}"
source "$ROOT/bench/device/vulkan_loader.sh"
WHAT=${1:-run}
DAWN_CACHE="${VOXC_CACHE_DIR:-$HOME/.cache/voxc}/dawn-node-webgpu-0.6.2"
if [ "$WHAT" = local ]; then
  LOCAL_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/voxc-webgpu-local.XXXXXX")
  trap 'rm -rf "$LOCAL_ROOT"' EXIT
  PACK="$LOCAL_ROOT/pack"
  DST="$LOCAL_ROOT/run"
  TINY=${TINY:-f32}; FULL=""
else
  PACK="${VOXC_WEBGPUPACK:-$ROOT/.webgpupack}"
  DST="${VOXC_WEBGPU_DIR:-/tmp/webgpu}"
  TINY=${TINY:-f32,q4k}
  FULL=${FULL-q4k,f32}   # which full-size bundles `pack` builds: q4k, f32 or both
  COMPARE_PIPELINES=${COMPARE_PIPELINES-blocking}   # tiny_q4k once more, its pipelines made this way
fi
# How voxc.js creates the kernels' pipelines (Voxc.load's pipelines: async, the browser's way, or
# blocking).  `local` makes them blocking: the Chromium tests cover async, and on SwiftShader
# blocking takes about half the time.
PIPELINES=${PIPELINES:-$([ "$WHAT" = local ] && echo blocking || echo async)}

dawn() {   # npm "webgpu" (Dawn as dawn.node), cached
  if [ ! -f "$DAWN_CACHE/node_modules/webgpu/dist/linux-x64/dawn.node" ]; then
    mkdir -p "$DAWN_CACHE" && (cd "$DAWN_CACHE" && npm init -y >/dev/null && \
      npm install --no-audit --no-fund --ignore-scripts webgpu@0.6.2 >/dev/null)
  fi
  tar -C "$DAWN_CACHE/node_modules" -czf "$PACK/webgpu.tgz" webgpu/package.json webgpu/index.js \
    webgpu/dist/linux-x64/dawn.node
}

pack() {   # $1: --local (no node binary, no Vulkan loader, no binaryen)
  if [ "$PACK" = "$ROOT/.webgpupack" ]; then
    local exclude; exclude=$(git -C "$ROOT" rev-parse --path-format=absolute --git-path info/exclude)   # a worktree's too
    grep -qx '/.webgpupack/' "$exclude" 2>/dev/null || echo '/.webgpupack/' >> "$exclude"
  fi
  rm -rf "$PACK" && mkdir -p "$PACK/debs" "$PACK/stage"
  dawn
  local quick=""
  if [ "${1:-}" = --local ]; then
    quick="--fast-link --small-windows --clip-seconds 0.5 --delay-ms 80"
  else
    gzip -9 -c "$(readlink -f "$(command -v node)")" > "$PACK/node.gz"
    vulkan_loader_fetch "$PACK/debs"
  fi
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" bench/webgpu_pack.py "$PACK/stage" --tiny "$TINY" --full "$FULL" $quick)
  for b in tiny tiny_q4k full full_q4k; do
    if [ -d "$PACK/stage/$b" ]; then tar -C "$PACK/stage" -czf "$PACK/$b.tgz" "$b"; fi
  done
  rm -rf "$PACK/stage"
  du -sh "$PACK"/* "$PACK"
}

unpack() {   # into $DST: node, node_modules/webgpu, the bundles
  rm -rf "$DST" && mkdir -p "$DST/bin" "$DST/node_modules"
  if [ -f "$PACK/node.gz" ]; then
    gzip -dc "$PACK/node.gz" > "$DST/bin/node" && chmod +x "$DST/bin/node"
  else
    ln -s "$(readlink -f "$(command -v node)")" "$DST/bin/node"
  fi
  tar -C "$DST/node_modules" -xzf "$PACK/webgpu.tgz"
  for b in tiny tiny_q4k full full_q4k; do
    if [ -f "$PACK/$b.tgz" ]; then tar -C "$DST" -xzf "$PACK/$b.tgz"; fi
  done
  return 0
}

run_bench() {   # $1: what (tiny|full|all); env as set up by the caller.  Returns 1 if a run failed.
  local node=$DST/bin/node b failed=0
  export VOXC_WEBGPU_MODULE=$DST/node_modules/webgpu
  if [ "$1" = tiny ] || [ "$1" = all ]; then
    for b in tiny tiny_q4k; do
      [ -d "$DST/$b" ] || continue
      "$node" "$ROOT/bench/webgpu_dawn.mjs" "$DST/$b" --expect "$DST/$b/expect.json" --steps ${TINY_STEPS:-100} \
        ${TINY_ARGS:-} --pipelines "$PIPELINES" --profile "$OUT/$b.profile.json" --json "$OUT/$b.json" \
        > "$OUT/$b.log" 2>&1 || { echo "$b: FAILED (see $b.log)"; failed=1; }
      tail -c 600 "$OUT/$b.log"; echo
    done
    if [ -n "${COMPARE_PIPELINES:-}" ] && [ -d "$DST/tiny_q4k" ]; then   # the same check, pipelines made the other way
      b=tiny_q4k_$COMPARE_PIPELINES
      "$node" "$ROOT/bench/webgpu_dawn.mjs" "$DST/tiny_q4k" --expect "$DST/tiny_q4k/expect.json" --steps 5 --warm 1 \
        --encode-reps 1 --encode-tokens 1 --pipelines "$COMPARE_PIPELINES" --json "$OUT/$b.json" > "$OUT/$b.log" 2>&1 \
        || { echo "$b: FAILED (see $b.log)"; failed=1; }
      grep -h '"pipelines_s"' "$OUT/tiny_q4k.json" "$OUT/$b.json" || true
    fi
  fi
  if [ "$1" = full ] || [ "$1" = all ]; then
    for b in full_q4k full; do   # Q4_K first: the issue's question
      [ -d "$DST/$b" ] || continue
      "$node" "$ROOT/bench/webgpu_dawn.mjs" "$DST/$b" --weights random --seconds ${SECONDS_AUDIO:-10} \
        --steps ${STEPS:-200} --offline-seconds ${OFFLINE_SECONDS:-60} --pipelines "$PIPELINES" --profile "$OUT/$b.profile.json" \
        --json "$OUT/$b.json" > "$OUT/$b.log" 2>&1 \
        || { echo "$b: FAILED (see $b.log)"; failed=1; }
      tail -c 2500 "$OUT/$b.log"; echo
      grep -E '^(decode step|80 ms stream step|profile)|^ +[0-9.]+ ms ' "$OUT/$b.log" || true   # the profiles' top kernels
    done
  fi
  return $failed
}

case "$WHAT" in
  pack) pack ;;
  run)
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    vulkan_loader_install "$PACK/debs"
    vulkan_loader_env
    unpack
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    run_bench "${2:-all}" || true   # each bundle's result is in $OUT
    ;;
  local)   # no GPU here: Dawn on Chromium's SwiftShader Vulkan driver (lavapipe is refused by Dawn)
    OUT=${OUT:-/tmp/webgpu-local}; mkdir -p "$OUT"
    export VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-/usr/lib/chromium/vk_swiftshader_icd.json}
    export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
    pack --local
    unpack
    TINY_STEPS=${TINY_STEPS:-24} TINY_ARGS=${TINY_ARGS:-"--warm 1 --encode-reps 1 --encode-tokens 1 --profile-check --copy-mb 8"} \
      run_bench tiny
    ;;
  *) echo "usage: $0 pack|run [tiny|full|all]|local" >&2; exit 2 ;;
esac
