"""Shared set-up of the scripts that run on the GPU machine (see bench/device/pack.sh).

They run voxc with TVM's RUNTIME only: ``.devpack/tvm_runtime/tvm/lib`` holds libtvm_runtime*.so
(no libtvm_compiler.so, no tvm Python package), tvm_ffi comes from the carried cp312 wheel, and
voxc's sources are the snapshot the artifacts were built from (``.devpack/src``), so an artifact
and the runtime code that drives it always match even while the checkout moves on.
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

PACK = Path(os.environ.get("VOXC_DEVPACK", Path(__file__).resolve().parents[2] / ".devpack"))


def setup(block_compiler: bool = True) -> Path:
    """sys.path -> the voxc snapshot; the runtime libraries; no TVM compiler importable."""
    src = PACK / "src"
    if src.exists() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    lib = PACK / "tvm_runtime" / "tvm" / "lib"
    if lib.exists():
        os.environ.setdefault("VOXC_TVM_LIB_DIR", str(lib))
    if os.environ.get("VOXC_HIDE_TVM") == "1":   # local rehearsal: act as if only the runtime were installed
        _hide_tvm()
    if block_compiler:
        _shim_tvm()
    return PACK


def _hide_tvm() -> None:
    import importlib.abc

    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tvm" or name.startswith("tvm."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden: runtime-only rehearsal)")
            return None

    sys.meta_path.insert(0, _Hide())


def _shim_tvm() -> None:
    """voxc's runtime modules import compiler-side modules (voxc.model.mel for the host-side mel framer,
    voxc.model.graph for a constant), which import tvm's compiler API at module level. With the runtime
    alone those imports fail, so any ``tvm.*`` import gets a stub module whose attributes are stub
    classes (subclassable, callable); nothing of them is ever run. Reported to the lead: the runtime
    should not import graph code."""
    try:
        import tvm  # noqa: F401
        if not getattr(tvm, "__voxc_shim__", False):
            raise RuntimeError("the tvm compiler package is importable here; the runtime-only check needs it absent")
        return
    except ImportError:
        pass
    import importlib.abc
    import importlib.machinery

    class _StubMeta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _StubMeta(name, (_Stub,), {})

        def __call__(cls, *args, **kwargs):
            return cls

        def __getitem__(cls, item):
            return cls

    class _Stub(metaclass=_StubMeta):
        pass

    class _StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            full = f"{self.__name__}.{name}"
            return sys.modules.get(full) or _StubMeta(name, (_Stub,), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "tvm" or name.startswith("tvm."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _StubModule(spec.name)
            module.__path__ = []
            module.__voxc_shim__ = True
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


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
