#!/usr/bin/env bash
# ONE device call: runtime-only set-up, then the steps named (default: all), in this order:
#   check  bench/device/tiny_check.py: tiny cuda builds (f32, graphs, q4k, f16) and vulkan builds vs their
#          llvm twins
#   attn   tests/gpu_attention_check.py run on every .devpack/attn_*/ (built here by
#          `python tests/gpu_attention_check.py build .devpack/attn_<name> cuda`): the ring attention kernels
#          alone against numpy -> $OUT/attention_<name>.log
#   quant  bench/quant_gpu.py run: fused dequant GEMV/GEMM kernels vs copy bandwidth and cuBLAS fp16
#   gemm   bench/gemm_gpu.py run: the batched Q4_K float16 GEMM per split-K count vs cuBLAS fp16 (pack: gemmbench)
#   voxc   bench/cuda_bench.py: full-size artifacts (ARTIFACTS="path ..." or every .devpack/artifacts/full_cuda*,
#          then every full_vulkan*: Vulkan through NVIDIA's driver, with its ratios to the CUDA build)
#   hf     bench/cuda_hf_baseline.py: transformers' VoxtralRealtime in bf16 on the same GPU
#   server bench/server_load.py: `voxc serve` on the first of ARTIFACTS (random weights written if absent),
#          SERVER_CLIENTS realtime websocket clients (default "4 8 16 32"), SERVER_SECS of audio each (20)
# Logs and JSON land in $OUT.  Exit status: 1 if a step failed.
#   run(command="bash bench/device/run_bench.sh check quant voxc", carry=[".devpack"])
# Vulkan beside CUDA on the same GPU (the Q4_K float16 builds; a few minutes of GPU time):
#   TINY_ARCHS=sm_90 VARIANTS="full_q4kf16:--quantization=q4_k+--dtype=float16+--archs=sm_90 \
#     full_q4kf16:--target=vulkan+--quantization=q4_k+--dtype=float16 tiny_f16:--target=vulkan+--dtype=float16 \
#     tiny_q4kf16:--target=vulkan+--quantization=q4_k+--dtype=float16+--q4k-config" bash bench/device/pack.sh
#   run(command="QUICK=1 SECS=20 REALTIME=0 PROFILE=0 bash bench/device/run_bench.sh check voxc", carry=[".devpack"])
#   -> $OUT/tiny_check.json (tiny_vulkan_* tokens vs their llvm twins), $OUT/cuda_bench.json (vulkan_vs_cuda)
#   bash bench/device/run_bench.sh --local [check quant voxc hf]   # here, after `pack.sh --local`: the same
#       steps on the CPU with the tiny model (TVM's compiler hidden for check and voxc; quant: the kernels
#       built at a small shape and checked up to the launch, which needs a GPU and CuPy)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
LOCAL=""
if [ "${1:-}" = "--local" ]; then LOCAL=--local; shift; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
if [ -n "$LOCAL" ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  STEPS=${*:-check quant gemm voxc hf}
else
  PY=python3
  STEPS=${*:-check quant gemm voxc hf}
fi
bash bench/device/setup.sh $LOCAL 2>&1 | tee "$OUT/setup.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "setup failed"; exit 1; }
source bench/device/vulkan_loader.sh && vulkan_loader_env   # setup.sh installed the loader
[ -n "$LOCAL" ] || export PYTHONPATH=/tmp/site
PACK="${VOXC_DEVPACK:-$ROOT/.devpack}"
failed=""
for step in $STEPS; do
  case $step in
    check) "$PY" bench/device/tiny_check.py $LOCAL 2>&1 | tee "$OUT/tiny_check.log" ;;
    quant) if [ -n "$LOCAL" ]; then   # build at a small shape and check all but the launches (needs nvcc)
             if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
               "$PY" bench/quant_gpu.py local --out "$OUT/quantbench" 2>&1 | tee "$OUT/quant_gpu.log"
             else echo "quant: no nvcc, skipped locally"; true; fi
           else
             PYTHONPATH=/tmp/site:$PACK/src "$PY" "$PACK/src/bench/quant_gpu.py" run --dir "$PACK/quantbench" \
               --json "$OUT/quant_gpu.json" 2>&1 | tee "$OUT/quant_gpu.log"; fi ;;
    gemm)  if [ -n "$LOCAL" ]; then   # build two tiny shapes, check the library (needs nvcc)
             if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
               "$PY" bench/gemm_gpu.py local 2>&1 | tee "$OUT/gemm_gpu.log"
             else echo "gemm: no nvcc, skipped locally"; true; fi
           else
             VOXC_TVM_LIB_DIR=$PACK/tvm_runtime/tvm/lib PYTHONPATH=/tmp/site:$PACK/src "$PY" "$PACK/src/bench/gemm_gpu.py" \
               run --dir "$PACK/gemmbench" --json "$OUT/gemm_gpu.json" 2>&1 | tee "$OUT/gemm_gpu.log"; fi ;;
    attn)  # each tests/gpu_attention_check.py build in the pack (.devpack/attn_*/: attn_odd.so[.gz] + cases.json)
           rc_attn=0; found_attn=0
           for dir in "$PACK"/attn_*/; do
             [ -f "$dir/cases.json" ] || continue; found_attn=1
             find "$dir" -name '*.so.gz' -exec gunzip -kf {} +
             VOXC_TVM_LIB_DIR=${VOXC_TVM_LIB_DIR:-$PACK/tvm_runtime/tvm/lib} "$PY" tests/gpu_attention_check.py run "$dir" \
               $([ -n "$LOCAL" ] && echo cpu) > "$OUT/attention_$(basename "$dir").log" 2>&1 || rc_attn=1
             echo "attention $(basename "$dir"): $(tail -1 "$OUT/attention_$(basename "$dir").log")"
           done
           [ $found_attn = 1 ] || echo "attn: no .devpack/attn_*/ builds"
           (exit $rc_attn) ;;
    voxc)  "$PY" bench/cuda_bench.py $LOCAL ${ARTIFACTS:-} 2>&1 | tee -a "$OUT/cuda_bench.log" ;;
    hf)    if [ -n "$LOCAL" ]; then "$PY" bench/cuda_hf_baseline.py --local "$PACK/artifacts/tiny_llvm" 2>&1 \
             | tee "$OUT/hf_baseline.log"; else "$PY" bench/cuda_hf_baseline.py 2>&1 | tee "$OUT/hf_baseline.log"; fi ;;
    server) if [ -n "$LOCAL" ]; then
             "$PY" bench/server_load.py --local --clients 2 --seconds 2 --json 2>&1 | tee "$OUT/server_load.jsonl"
           else
             ART=$(echo ${ARTIFACTS:-$PACK/artifacts/full_cuda} | cut -d' ' -f1)
             PYTHONPATH=/tmp/site:$PACK/src "$PY" -c "import sys; sys.path[:0] = ['bench']; from pathlib import Path; from cuda_build import ensure_weights; print('weights', ensure_weights(Path('$ART')))"
             export VOXC_TVM_LIB_DIR=${VOXC_TVM_LIB_DIR:-$PACK/tvm_runtime/tvm/lib}   # the runtime-only libraries setup.sh unpacked
             for n in ${SERVER_CLIENTS:-4 8 16 32}; do
               PYTHONPATH=/tmp/site:$PACK/src "$PY" bench/server_load.py --local --artifact "$ART" --clients "$n" --seconds "${SERVER_SECS:-20}" --json --verify size \
                 2>&1 | tee -a "$OUT/server_load.jsonl"
             done; fi ;;
    *)     echo "unknown step $step (check attn quant gemm voxc hf server)"; exit 2 ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed="$failed $step"
done
[ -n "$LOCAL" ] || nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader || true
if [ -n "$failed" ]; then echo "== failed:$failed"; exit 1; fi
