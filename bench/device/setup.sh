#!/usr/bin/env bash
# On the GPU machine: install the carried cp312 wheels into /tmp/site and unpack TVM's runtime libraries;
# with vulkan artifacts, unpack wgpu-native (bench/device/common.py points voxc at it) and install the
# Vulkan loader the machine lacks (bench/device/vulkan_loader.sh).
# Then: export PYTHONPATH=/tmp/site. Prints the runtime-only install size.
#   bash bench/device/setup.sh [--local]   (--local: a rehearsal here, with this Python's packages: unpack only)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK="${VOXC_DEVPACK:-$ROOT/.devpack}"
mkdir -p "$PACK/tvm_runtime" && tar -xzf "$PACK/tvm_runtime.tar.gz" -C "$PACK/tvm_runtime"
# undo pack.sh's carry-size measures: gzipped libraries, llvm twins' shards shared with their cuda twin
find "$PACK/artifacts" -name '*.so.gz' -exec gunzip -f {} +
if [ -d "$PACK/vulkan" ]; then
  find "$PACK/vulkan" -name '*.so.gz' -exec gunzip -f {} +
  if [ "${1:-}" != "--local" ]; then   # here (--local) the system's loader and lavapipe serve
    source "$ROOT/bench/device/vulkan_loader.sh"
    vulkan_loader_install "$PACK/vulkan"
    vulkan_loader_env
    vulkan_loader_report
  fi
  echo "vulkan: wgpu-native $(ls "$PACK"/vulkan/*.so | xargs -n1 basename), loader:" \
    "$(ldconfig -p | grep -o 'libvulkan\.so\.1 .*' | sed -n 1p || echo none)"
fi
for list in "$PACK"/artifacts/tiny_llvm*/.shards_from_cuda_twin; do
  [ -f "$list" ] || continue
  twin=$(dirname "$list")
  while read -r shard; do cp "${twin/tiny_llvm/tiny_cuda}/$shard" "$twin/"; done < "$list"
  rm "$list"
done
if [ "${1:-}" = "--local" ]; then
  echo "runtime-only rehearsal: tvm runtime libs $(du -sh "$PACK/tvm_runtime" | cut -f1), this Python's tvm_ffi"
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PACK"/wheels/*.whl
echo "runtime-only install: tvm runtime libs $(du -sh "$PACK/tvm_runtime" | cut -f1), tvm_ffi $(du -sh /tmp/site/tvm_ffi | cut -f1), mistral-common + deps $(du -shc /tmp/site/* | tail -1 | cut -f1) total site"
python3 -c "import sys; print('python', sys.version.split()[0])"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
