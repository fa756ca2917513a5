#!/usr/bin/env bash
# On the GPU machine: install the carried cp312 wheels into /tmp/site and unpack TVM's runtime libraries.
# Then: export PYTHONPATH=/tmp/site. Prints the runtime-only install size.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK="$ROOT/.devpack"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PACK"/wheels/*.whl
mkdir -p "$PACK/tvm_runtime" && tar -xzf "$PACK/tvm_runtime.tar.gz" -C "$PACK/tvm_runtime"
echo "runtime-only install: tvm runtime libs $(du -sh "$PACK/tvm_runtime" | cut -f1), tvm_ffi $(du -sh /tmp/site/tvm_ffi | cut -f1), mistral-common + deps $(du -shc /tmp/site/* | tail -1 | cut -f1) total site"
python3 -c "import sys; print('python', sys.version.split()[0])"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
