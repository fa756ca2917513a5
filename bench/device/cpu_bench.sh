#!/usr/bin/env bash
# The full-size model on the GPU machine's CPU cores (llvm, runtime-only): Q4_K (float and int8
# activations) / Q8_0 / float32 decode step vs a streaming-read floor measured in the same process, where
# one decode step and one 80 ms streaming step spend their time (per compiled function), and
# transformers' CPU decode step.
#
#   bash bench/device/cpu_bench.sh pack     # here (needs TVM): build .cpupack/ (see below), ~20 MB
#   run(command="bash bench/device/cpu_bench.sh run", carry=[".cpupack"])     # ONE device call, < 9 min
#   bash bench/device/cpu_bench.sh local    # here (what CI runs): pack the tiny model only into a temporary
#                                           # pack, then the same run on it with TVM hidden, few steps
#
# .cpupack/ (what the GPU machine lacks: it has python3.12 + torch + transformers + numpy + safetensors):
#   src/                voxc/ + bench/{cpu_bench,cuda_build}.py as built (working tree at pack time)
#   artifacts/*.tgz     full_<variant> per VARIANTS (ModelConfig(), llvm -mcpu=$MCPU, model.so + manifest,
#                       NO weights: bench/cuda_build.py:ensure_weights writes random ones on the device;
#                       a variant is q4_k, q8_0 or f32, ``_int8`` appended for int8 activations: q4_k_int8),
#                       tiny_q4_k (ModelConfig.tiny(), same flow in seconds: checks the set-up first)
#   tvm_runtime.tar.gz  libtvm_runtime.so + libtvm_runtime_extra.so (TVM's runtime, no compiler)
#   wheels/             apache-tvm-ffi 0.1.14.post1 cp312 (installed into /tmp/site)
#   pack.json           build times, sizes, git state
# `run` writes to $OUT: cpu_voxc_<artifact>.json + .log per variant, cpu_hf.json + .log, cpu_bench.json
# (summary: ms, x floor, speedup vs transformers), setup.log.  Env: MCPU (pack; default x86-64-v3),
# VARIANTS (pack/run; default "q4_k q4_k_int8 q8_0 f32"; the last ones are skipped when the time is spent), TOTAL_S (run; default 530), HF_DTYPES (float32,bfloat16),
# VOXC_CPUPACK (the pack, default .cpupack), VOXC_CPUBENCH_DIR (run: where it unpacks, default /tmp/cpubench),
# VOXC_WEIGHTS_DIR (run: random weights, default /tmp/voxc_cpu_random_weights).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHAT=${1:-run}
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MCPU=${MCPU:-x86-64-v3}
if [ "$WHAT" = local ]; then   # a temporary pack of the tiny model only, unpacked beside it
  LOCAL_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/voxc-cpubench-local.XXXXXX")
  PACK="${VOXC_CPUPACK:-$LOCAL_ROOT/pack}"
  DST="${VOXC_CPUBENCH_DIR:-$LOCAL_ROOT/run}"
  export VOXC_WEIGHTS_DIR="${VOXC_WEIGHTS_DIR:-$LOCAL_ROOT/weights}"
  VARIANTS=""
  MCPU=${MCPU_LOCAL:-generic}
else
  PACK="${VOXC_CPUPACK:-$ROOT/.cpupack}"
  DST="${VOXC_CPUBENCH_DIR:-/tmp/cpubench}"
  export VOXC_WEIGHTS_DIR="${VOXC_WEIGHTS_DIR:-/tmp/voxc_cpu_random_weights}"
  VARIANTS=${VARIANTS-q4_k q4_k_int8 q8_0 f32}
fi
WHEEL_CACHE="${VOXC_CACHE_DIR:-$HOME/.cache/voxc}/tvm-ffi-cp312"

pack() {
  set -e
  if [ "$PACK" = "$ROOT/.cpupack" ]; then
    local exclude; exclude=$(git -C "$ROOT" rev-parse --path-format=absolute --git-path info/exclude)   # a worktree's too
    grep -qx '/.cpupack/' "$exclude" 2>/dev/null || echo '/.cpupack/' >> "$exclude"
  fi
  rm -rf "$PACK" && mkdir -p "$PACK/src/bench" "$PACK/artifacts" "$PACK/wheels" "$PACK/build"
  (cd "$ROOT" && tar --exclude=__pycache__ -cf - voxc) | tar -x -C "$PACK/src"
  cp "$ROOT/bench/cpu_bench.py" "$ROOT/bench/cuda_build.py" "$PACK/src/bench/"
  mkdir -p "$PACK/src/bench/device" && cp "$ROOT/bench/device/common.py" "$PACK/src/bench/device/"
  local log="$PACK/build.log"; : > "$log"
  cd "$ROOT"
  local t0=$SECONDS
  PYTHONPATH="$ROOT" "$PY" bench/cpu_bench.py build "$PACK/build/tiny_q4_k" --size tiny --quant q4_k --mcpu "$MCPU" 2>&1 \
    | grep -v Warning | tee -a "$log"
  for v in $VARIANTS; do
    PYTHONPATH="$ROOT" "$PY" bench/cpu_bench.py build "$PACK/build/full_$v" --size full --quant "$v" --mcpu "$MCPU" 2>&1 \
      | grep -v Warning | tee -a "$log"
  done
  for a in "$PACK"/build/*; do
    tar -C "$PACK/build" -czf "$PACK/artifacts/$(basename "$a").tgz" "$(basename "$a")"
  done
  rm -rf "$PACK/build"
  local lib; lib=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('tvm').origin).parent / 'lib')")
  local stage; stage=$(mktemp -d) && mkdir -p "$stage/tvm/lib"
  cp "$lib/libtvm_runtime.so" "$lib/libtvm_runtime_extra.so" "$stage/tvm/lib/"
  tar -C "$stage" -czf "$PACK/tvm_runtime.tar.gz" tvm && rm -rf "$stage"
  if [ -z "${LOCAL:-}" ]; then   # the local run uses this Python's tvm_ffi
    mkdir -p "$WHEEL_CACHE"
    if [ -z "$(ls "$WHEEL_CACHE"/apache_tvm_ffi-0.1.14.post1-cp312-*.whl 2>/dev/null)" ]; then
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_CACHE" apache-tvm-ffi==0.1.14.post1
    fi
    cp "$WHEEL_CACHE"/apache_tvm_ffi-0.1.14.post1-cp312-*.whl "$PACK/wheels/"
  fi
  "$PY" - "$PACK" "$((SECONDS - t0))" "$MCPU" <<'EOF'
import json, subprocess, sys
from pathlib import Path
pack, seconds, mcpu = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=pack.parent).stdout.strip()
info = {"mcpu": mcpu, "pack_seconds": seconds, "git_head": git("rev-parse", "HEAD"),
        "git_dirty": git("status", "--short", "voxc", "bench/cuda_build.py", "bench/cpu_bench.py").splitlines(),
        "files_MB": {str(p.relative_to(pack)): round(p.stat().st_size / 1e6, 2) for p in sorted(pack.rglob("*"))
                     if p.is_file() and "src" not in p.parts}}
(pack / "pack.json").write_text(json.dumps(info, indent=1))
EOF
  echo "== .cpupack"; du -sh "$PACK"/artifacts/* | sed "s#$PACK/##"; du -sh "$PACK"/* | sed "s#$PACK/##"; du -sh "$PACK"
}

setup() {   # tvm-ffi into /tmp/site, TVM's runtime libraries and the artifacts into $DST
  local py=$1 dst=$DST
  rm -rf "$dst" && mkdir -p "$dst/artifacts"
  if [ -n "${LOCAL:-}" ]; then :; else
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$PACK"/wheels/*.whl
  fi
  tar -xzf "$PACK/tvm_runtime.tar.gz" -C "$dst"
  for a in "$PACK"/artifacts/*.tgz; do tar -xzf "$a" -C "$dst/artifacts"; done
  echo "runtime-only install: tvm runtime libs $(du -sh "$dst/tvm" | cut -f1)$( [ -d /tmp/site/tvm_ffi ] && echo ", tvm_ffi $(du -sh /tmp/site/tvm_ffi | cut -f1)")"
  "$py" -c "import sys, numpy; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
  nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L3|MHz" || true
  free -g | head -2; df -h /tmp | tail -1
}

stage() {   # stage NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((TOTAL - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (${left}s of the ${TOTAL}s budget left)" | tee -a "$OUT/skipped.log"; return; fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  VOXC_STAGE_S=$limit timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "Warning\|^\s*$" "$OUT/$name.log" | tail -n 40
  [ $rc -ne 0 ] && echo "== $name: exit $rc" | tee -a "$OUT/failed.log"
  rm -rf "$VOXC_WEIGHTS_DIR"   # the device's disk (and page cache) back for the next variant
  return 0
}

run_all() {   # $1: python; $2: tiny|full
  local py=$1 size=$2 arts=$DST/artifacts
  export VOXC_CPUPACK=$DST/pack VOXC_TVM_LIB_DIR=$DST/tvm/lib
  export TVM_NUM_THREADS=${TVM_NUM_THREADS:-$(nproc)} OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  export PYTHONUNBUFFERED=1
  mkdir -p "$DST/pack" && ln -sfn "$PACK/src" "$DST/pack/src"
  local bench="$PACK/src/bench/cpu_bench.py"
  BW_GIB=${BW_GIB:-0.5} stage cpu_voxc_tiny_q4_k 60 "$py" "$bench" voxc "$arts/tiny_q4_k"
  if [ "$size" = tiny ]; then
    HF_REPORT=cpu_hf stage cpu_hf 120 "$py" "$bench" hf "$arts/tiny_q4_k" --dtypes "${HF_DTYPES:-float32,bfloat16}"
  else
    local first=1
    for v in $VARIANTS; do
      [ -d "$arts/full_$v" ] || continue
      stage "cpu_voxc_full_$v" "$(case $v in q4_k*) echo 180;; q8_0*) echo 120;; *) echo 240;; esac)" "$py" "$bench" voxc "$arts/full_$v"
      if [ $first = 1 ]; then   # transformers right after the main variant, before the larger ones
        first=0
        stage cpu_hf 200 "$py" "$bench" hf "$arts/full_$v" --dtypes "${HF_DTYPES:-float32,bfloat16}"
      fi
    done
  fi
  "$py" "$bench" summary > "$OUT/summary.log" 2>&1; cat "$OUT/summary.log"
  echo "== total ${SECONDS}s"
}

case "$WHAT" in
  pack) pack ;;
  run)
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; TOTAL=${TOTAL_S:-530}; SECONDS=0
    setup python3 2>&1 | tee "$OUT/setup.log"
    export PYTHONPATH=/tmp/site
    run_all python3 "${2:-full}" 2>&1 | tee "$OUT/run.log"
    ;;
  local)   # here: pack the tiny model, then run it runtime-only with TVM hidden, this venv's tvm_ffi, few steps
    OUT=${OUT:-/tmp/cpubench-local}; mkdir -p "$OUT"; TOTAL=${TOTAL_S:-170}; SECONDS=0
    export LOCAL=1 STEPS=${STEPS:-3} POSITIONS=${POSITIONS:-100,300} STREAM_STEPS=${STREAM_STEPS:-3} \
      BW_GIB=${BW_GIB:-0.05} HF_STEPS=${HF_STEPS:-2,4} HF_DTYPES=${HF_DTYPES:-float32}
    ( pack ); rc=$?   # (not in an ||-list: pack's set -e must stay in force)
    [ $rc = 0 ] || { echo "== local pack failed"; rm -rf "$LOCAL_ROOT"; exit 1; }
    rm -f "$OUT/failed.log" "$OUT/skipped.log"
    setup "$PY" 2>&1 | tee "$OUT/setup.log"
    run_all "$PY" tiny 2>&1 | tee "$OUT/run.log"
    rm -rf "$LOCAL_ROOT"
    if [ -s "$OUT/failed.log" ] || [ -s "$OUT/skipped.log" ]; then cat "$OUT"/failed.log "$OUT"/skipped.log 2>/dev/null; exit 1; fi
    ;;
  *) echo "usage: $0 pack|run [full|tiny]|local [tiny|full]" >&2; exit 2 ;;
esac
