#!/usr/bin/env bash
# ONE device call: runtime-only set-up, the tiny cuda-vs-llvm check, voxc's full-size benchmark, and
# the transformers baseline on the same GPU. Logs and JSON land in $OUT.
#   run(command="bash bench/device/run_bench.sh [check|voxc|hf|all]", carry=[".devpack"])
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHAT=${1:-all}
export PYTHONUNBUFFERED=1
bash bench/device/setup.sh 2>&1 | tee "$OUT/setup.log"
export PYTHONPATH=/tmp/site
if [ "$WHAT" = check ] || [ "$WHAT" = all ]; then
  python3 bench/device/tiny_check.py 2>&1 | tee "$OUT/tiny_check.log"
fi
if [ "$WHAT" = voxc ] || [ "$WHAT" = all ] || [ "$WHAT" = check ]; then
  python3 bench/cuda_bench.py ${ARTIFACTS:-} 2>&1 | tee "$OUT/cuda_bench.log"
fi
if [ "$WHAT" = hf ] || [ "$WHAT" = all ]; then
  python3 bench/cuda_hf_baseline.py .devpack/artifacts/full_cuda 2>&1 | tee "$OUT/hf_baseline.log"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader || true
