#!/usr/bin/env bash
# ONE device call: runtime-only set-up, then the steps named (default: all), in this order:
#   check  bench/device/tiny_check.py: tiny cuda builds (f32, graphs, q4k, f16) vs their llvm twins
#   quant  bench/quant_gpu.py run: fused dequant GEMV/GEMM kernels vs copy bandwidth and cuBLAS fp16
#   voxc   bench/cuda_bench.py: full-size artifacts (ARTIFACTS="path ..." or every .devpack/artifacts/full_cuda*)
#   hf     bench/cuda_hf_baseline.py: transformers' VoxtralRealtime in bf16 on the same GPU
# Logs and JSON land in $OUT.
#   run(command="bash bench/device/run_bench.sh check quant voxc", carry=[".devpack"])
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${*:-check quant voxc hf}
export PYTHONUNBUFFERED=1
bash bench/device/setup.sh 2>&1 | tee "$OUT/setup.log"
export PYTHONPATH=/tmp/site
for step in $STEPS; do
  case $step in
    check) python3 bench/device/tiny_check.py 2>&1 | tee "$OUT/tiny_check.log" ;;
    quant) PYTHONPATH=/tmp/site:.devpack/src python3 .devpack/src/bench/quant_gpu.py run --dir .devpack/quantbench \
             --json "$OUT/quant_gpu.json" 2>&1 | tee "$OUT/quant_gpu.log" ;;
    voxc)  python3 bench/cuda_bench.py ${ARTIFACTS:-} 2>&1 | tee -a "$OUT/cuda_bench.log" ;;
    hf)    python3 bench/cuda_hf_baseline.py 2>&1 | tee "$OUT/hf_baseline.log" ;;
    *)     echo "unknown step $step (check quant voxc hf)"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader || true
