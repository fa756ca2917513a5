#!/usr/bin/env bash
# Assemble .devpack/, what travels to the GPU machine with `run(carry=[".devpack"])` (64 MiB a call):
#   src/                voxc, targets, schedules, bench as committed (git archive HEAD): the code the
#                       artifacts were built from, so the device never runs newer runtime code against them
#   artifacts/          tiny_cuda, tiny_cuda_graph, tiny_llvm (one tiny checkpoint), full_cuda and
#                       full_cuda_graph (ModelConfig() defaults, manifest + model.so, NO weights:
#                       bench/cuda_build.py:ensure_weights writes random ones on the device),
#                       attn_cuda.so (+ .json: ring attention at the full model's shapes)
#   tvm_runtime.tar.gz  tvm/lib/libtvm_runtime{,_extra,_cuda}.so: TVM's runtime without its compiler
#   wheels/             cp312 wheels the device lacks: apache-tvm-ffi 0.1.14.post1, mistral-common + deps,
#                       aiohttp + deps (the server load step)
#   vulkan/             when a vulkan artifact travels: wgpu-native (libwgpu_native*.so.gz, from the installed
#                       wgpu wheel; the artifacts carry voxc's device plugin) and Debian's Vulkan loader .debs
#                       (the GPU machine has NVIDIA's Vulkan driver but no loader: bench/device/vulkan_loader.sh)
# Usage: bash bench/device/pack.sh [--quick|--local]
#   --quick: sm_90 only, no full-size builds
#   --local: a rehearsal on this machine (what CI runs): the working tree's sources, the tiny model only
#            (tiny_cuda for sm_90 when nvcc is here, tiny_llvm, a weight-less tiny full_llvm), the ring
#            attention for llvm at small shapes (attn_llvm.so) and for cuda (build only), no wheels; where
#            wgpu and a Vulkan driver are here (lavapipe), also a float16 tiny_vulkan_f16 + its llvm twin and a
#            weight-less tiny full_vulkan; then `bash bench/device/run_bench.sh --local` runs the device
#            steps on the CPU.
#   VARIANTS="tiny_q4k:--quantization=q4_k tiny_f16:--dtype=float16 full_f16:--dtype=float16 \
#             full_q4k:--quantization=q4_k quantbench gemmbench" bash bench/device/pack.sh
#   A variant's --target (cuda by default, or vulkan) names its artifacts: full_q4kf16:--target=vulkan+... ->
#   full_vulkan_q4kf16 (cuda_bench.py times it beside full_cuda_q4kf16); tiny_f16:--target=vulkan+... ->
#   tiny_vulkan_f16 and its own llvm twin tiny_llvm_vulkan_f16.
# Env: VOXC_DEVPACK (the pack directory, default .devpack), PYTHON, VARIANTS, TINY_ARCHS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK="${VOXC_DEVPACK:-$ROOT/.devpack}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODE=${1:-}
case "$MODE" in ""|--quick|--local) ;; *) echo "usage: $0 [--quick|--local]" >&2; exit 2 ;; esac
HAVE_NVCC=0
{ command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; } && HAVE_NVCC=1
if [ "$PACK" = "$ROOT/.devpack" ]; then
  exclude=$(git -C "$ROOT" rev-parse --path-format=absolute --git-path info/exclude)   # a worktree's too
  grep -qx '/.devpack/' "$exclude" 2>/dev/null || echo '/.devpack/' >> "$exclude"
fi

rm -rf "$PACK" && mkdir -p "$PACK/src" "$PACK/artifacts" "$PACK/wheels"
SOURCES="voxc targets schedules bench tests/references.py pyproject.toml"
if [ "$MODE" = "--local" ]; then   # the working tree as it is (tracked and new files, not ignored ones)
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- $SOURCES \
     | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -x -C "$PACK/src"
else
  git -C "$ROOT" archive HEAD $SOURCES | tar -x -C "$PACK/src"
fi
SRC="$PACK/src"
cd "$SRC"
export PYTHONPATH="$SRC"
CB="bench/cuda_build.py"

if [ "$MODE" = "--local" ]; then
  if [ $HAVE_NVCC = 1 ]; then
    "$PY" $CB tiny "$PACK/artifacts" --archs sm_90
    "$PY" $CB attn "$PACK/artifacts/attn_cuda.so" --archs sm_90
  else
    echo "== no nvcc: the cuda builds are skipped"
    "$PY" $CB tiny "$PACK/artifacts" --no-cuda
  fi
  "$PY" $CB full "$PACK/artifacts/full_llvm" --target llvm --tiny-config
  "$PY" $CB attn "$PACK/artifacts/attn_llvm.so" --target llvm --tiny
  LOCAL_VULKAN=""   # the Vulkan rehearsal needs wgpu and a Vulkan driver here (lavapipe)
  if "$PY" -c "import wgpu, sys; sys.exit(wgpu.gpu.request_adapter_sync() is None)" >/dev/null 2>&1; then
    LOCAL_VULKAN="tiny_f16:--target=vulkan+--dtype=float16 full:--target=vulkan+--tiny-config"
  else
    echo "== no wgpu or no Vulkan driver here: the vulkan builds are skipped"
  fi
  VARIANTS=${VARIANTS-$LOCAL_VULKAN}
else
  ARCHS=""
  [ "$MODE" = "--quick" ] && ARCHS="--archs sm_90"
  "$PY" $CB tiny "$PACK/artifacts" --archs ${TINY_ARCHS:-sm_80,sm_90}
  # VARIANTS: which other builds travel, as name:cuda_build-args pairs (tiny_* -> tiny_cuda_<x> and its
  # llvm twin tiny_llvm_<x>; full_* -> a weight-less full-size artifact; quantbench[:quant_gpu-build-args]
  # -> bench/quant_gpu.py's cubin; gemmbench[:gemm_gpu-build-args] -> bench/gemm_gpu.py's library)
  VARIANTS=${VARIANTS-"tiny_graph:--cuda-graph full:--archs=sm_80,sm_90 full_graph:--cuda-graph+--archs=sm_90"}
  "$PY" $CB attn "$PACK/artifacts/attn_cuda.so" --archs sm_90
fi
for spec in $VARIANTS; do
  name=${spec%%:*}; args=""                     # args joined by '+', e.g. --dtype=float16+--cuda-graph
  case $spec in *:*) args=$(echo "${spec#*:}" | tr '+' ' ') ;; esac
  target=$(echo " $args" | sed -n 's/.* --target[= ]\([a-z]*\).*/\1/p'); target=${target:-cuda}
  case $name in
    tiny_*)  rm -rf "$PACK/tmp" && mkdir -p "$PACK/tmp" && "$PY" $CB tiny "$PACK/tmp" --archs sm_90 $args
             mv "$PACK/tmp/tiny_$target" "$PACK/artifacts/tiny_${target}_${name#tiny_}"
             # a cuda variant's twin keeps its old name; another target's has its own (no clash with cuda's)
             twin=tiny_llvm_${name#tiny_}; [ "$target" = cuda ] || twin=tiny_llvm_${target}_${name#tiny_}
             [ "$name" = tiny_graph ] || mv "$PACK/tmp/tiny_llvm" "$PACK/artifacts/$twin"
             rm -rf "$PACK/tmp" ;;
    full*)   [ "$MODE" = "--quick" ] || "$PY" $CB full "$PACK/artifacts/${name/full/full_$target}" $args ;;
    quantbench) "$PY" bench/quant_gpu.py build --out "$PACK/quantbench" --arch sm_90 $args
                gzip -9 "$PACK/quantbench/kernels.cu" ;;     # the source, for reading only: 19 MB plain
    gemmbench) "$PY" bench/gemm_gpu.py build --out "$PACK/gemmbench" --arch sm_90 $args ;;
    *)       echo "unknown variant $name" >&2; exit 2 ;;
  esac
done
rm -rf "$PACK/artifacts/tiny_ckpt"
# Carry size (64 MiB a call): an llvm twin's weight shards are the same bytes as its cuda twin's, so
# they travel once (setup.sh copies them back); compiled libraries travel gzipped (about a third).
for twin in "$PACK"/artifacts/tiny_llvm*; do
  cuda_twin="${twin/tiny_llvm/tiny_cuda}"
  for shard in "$twin"/params_shard_*.bin; do
    [ -f "$shard" ] && [ -f "$cuda_twin/$(basename "$shard")" ] && cmp -s "$shard" "$cuda_twin/$(basename "$shard")" || continue
    rm "$shard" && basename "$shard" >> "$twin/.shards_from_cuda_twin"
  done
done
find "$PACK/artifacts" -name '*.so' -exec gzip -9 {} +

# TVM runtime only: the runtime libraries of the installed apache-tvm wheel
TVM_LIB=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('tvm').origin).parent / 'lib')")
STAGE=$(mktemp -d) && mkdir -p "$STAGE/tvm/lib"
cp "$TVM_LIB"/libtvm_runtime.so "$TVM_LIB"/libtvm_runtime_extra.so "$STAGE/tvm/lib/"
[ "$MODE" = "--local" ] || cp "$TVM_LIB"/libtvm_runtime_cuda.so "$STAGE/tvm/lib/"
tar -C "$STAGE" -czf "$PACK/tvm_runtime.tar.gz" tvm && rm -rf "$STAGE"

# What a vulkan artifact needs beyond its own files (which hold voxc's device plugin): wgpu-native, from
# this machine's wgpu package (the runtime loads the library, never the Python package), and the loader
if [ -n "$(ls -d "$PACK"/artifacts/*_vulkan* 2>/dev/null)" ]; then
  mkdir -p "$PACK/vulkan"
  WGPU_NATIVE=$("$PY" -c "from voxc.runtime.wgpu_device import wgpu_native_library; print(wgpu_native_library())")
  gzip -9 -c "$WGPU_NATIVE" > "$PACK/vulkan/$(basename "$WGPU_NATIVE").gz"
  if [ "$MODE" != "--local" ]; then
    source "$ROOT/bench/device/vulkan_loader.sh"
    vulkan_loader_fetch "$PACK/vulkan"
  fi
fi

if [ "$MODE" != "--local" ]; then
  WHEELS="${VOXC_WHEEL_CACHE:-$HOME/.cache/voxc/wheels-cp312}"
  mkdir -p "$WHEELS"
  if [ -z "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
      apache-tvm-ffi==0.1.14.post1 mistral_common==1.13.1 pydantic==2.14.4 pydantic_core==2.50.5 \
      pydantic-extra-types==2.11.1 pycountry==26.2.16 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
      referencing==0.37.0 rpds-py==2026.9.1 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing_extensions==4.16.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 \
      frozenlist==1.8.0 idna==3.21 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1    # the last row: voxc serve
  fi
  cp "$WHEELS"/*.whl "$PACK/wheels/"
fi

echo "== $(basename "$PACK") sizes"
du -sh "$PACK"/* "$PACK"/artifacts/* | sed "s#$PACK/##"
du -sh "$PACK"
