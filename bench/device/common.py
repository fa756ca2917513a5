"""Shared set-up of the scripts that run on the GPU machine (see bench/device/pack.sh).

They run voxc with TVM's RUNTIME only: ``.devpack/tvm_runtime/tvm/lib`` holds libtvm_runtime*.so
(no libtvm_compiler.so, no tvm Python package), tvm_ffi comes from the carried cp312 wheel, and
voxc's sources are the snapshot the artifacts were built from (``.devpack/src``), so an artifact
and the runtime code that drives it always match even while the checkout moves on.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

PACK = Path(os.environ.get("VOXC_DEVPACK", Path(__file__).resolve().parents[2] / ".devpack"))


def setup(block_compiler: bool = True) -> Path:
    """sys.path -> the voxc snapshot; the runtime libraries; with ``block_compiler``, no ``tvm``
    importable (on the GPU machine it is not installed; a local rehearsal on a machine that has the
    compiler hides it, and the runtime libraries then come from the pack or the installed package).
    voxc's runtime imports only tvm_ffi, so any ``import tvm`` on this path is a layering bug and fails."""
    src = PACK / "src"
    if src.exists() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    lib = PACK / "tvm_runtime" / "tvm" / "lib"
    if lib.exists():
        os.environ.setdefault("VOXC_TVM_LIB_DIR", str(lib))
    # vulkan artifacts: the wgpu-native library that travelled (the GPU machine has no wgpu package)
    wgpu_native = sorted((PACK / "vulkan").glob("*wgpu_native*.so"))
    if wgpu_native:
        os.environ.setdefault("VOXC_WGPU_NATIVE", str(wgpu_native[0]))
    if block_compiler:
        hide_tvm()
    return PACK


def hide_tvm() -> None:
    """Make ``import tvm`` fail in this process, as on a machine with TVM's runtime only (idempotent).
    Where the package is installed, its runtime libraries stay in use (VOXC_TVM_LIB_DIR)."""
    if any(isinstance(f, _HideTvm) for f in sys.meta_path):
        return
    if "VOXC_TVM_LIB_DIR" not in os.environ:
        import importlib.util

        spec = importlib.util.find_spec("tvm")   # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            os.environ["VOXC_TVM_LIB_DIR"] = str(Path(list(spec.submodule_search_locations)[0]) / "lib")
    if any(m == "tvm" or m.startswith("tvm.") for m in sys.modules):
        raise RuntimeError("tvm was imported before the runtime-only set-up; nothing of the compiler may load")
    sys.meta_path.insert(0, _HideTvm())


@contextlib.contextmanager
def tvm_lookups_allowed():
    """Lift hide_tvm() for a while: for libraries that probe for optional packages with
    ``importlib.util.find_spec`` (torch.profiler looks for ``tvm``) and do not expect it to raise.
    On the GPU machine no ``tvm`` package is installed, so the probe finds nothing either way."""
    hidden = [f for f in sys.meta_path if isinstance(f, _HideTvm)]
    for finder in hidden:
        sys.meta_path.remove(finder)
    try:
        yield
    finally:
        sys.meta_path[:0] = hidden


class _HideTvm:
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" or name.startswith("tvm."):
            raise ModuleNotFoundError(f"No module named {name!r} (runtime only: the TVM compiler is not available)")
        return None


def tvm_compiler_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tvm") is not None
    except ModuleNotFoundError:
        return False


class Report:
    """Prints each result as it comes and rewrites $OUT/<name>.json after each one (a run killed at
    its time limit keeps what it measured)."""

    def __init__(self, name: str):
        self.name = name
        self.data: dict = {"script": name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.t0 = time.perf_counter()

    def __setitem__(self, key, value):
        self.data[key] = value
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {key}: {json.dumps(value, default=str)}", flush=True)
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def save(self):
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str))
        return self.data


class BenchTokenizer:
    """Random weights emit arbitrary ids: a tokenizer that never ends a stream and decodes nothing."""
    bos_id, streaming_pad_id, eos_id = 1, 32, -1

    class _Decoder:
        def push(self, token):
            return ""

        def flush(self):
            return ""

    def incremental_decoder(self):
        return self._Decoder()


def gpu_name() -> str:
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"
