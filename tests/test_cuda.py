"""The cuda target without a GPU: builds compile to a library holding a real fatbin for the requested
architectures (never CUDA source compiled at load), and runtime errors are clear VoxcErrors.
What runs ON a GPU is bench/device/tiny_check.py (see bench/RESULTS.md)."""
from __future__ import annotations

import ctypes
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from targets import cuda as tc  # noqa: E402
from targets import get_target  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402

ARCHS = ("sm_80", "sm_90")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="no CUDA toolkit (nvcc) on this machine")


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    root = tmp_path_factory.mktemp("cuda")
    ckpt = make_tiny(root / "ckpt")
    import targets

    target = dataclasses.replace(tc.TARGET, archs=ARCHS)
    original = targets.get_target
    targets.get_target = lambda name: target if name == "cuda" else original(name)
    try:
        return build(ckpt, "cuda", root / "art", progress=False)
    finally:
        targets.get_target = original


def test_registry_returns_the_cuda_target():
    target = get_target("cuda")
    assert target.name == "cuda" and target.device_kind == "cuda" and target.library_name == "model.so"
    t = target.tvm_target()
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == "sm_90" and t.host.kind.name == "llvm"
    assert int(t.attrs["max_shared_memory_per_block"]) == 49152


def test_nvcc_flags_cover_every_arch_plus_ptx():
    flags = tc.nvcc_arch_flags(("sm_80", "sm_86", "sm_90"))
    assert flags.count("-gencode") == 4
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags
    assert flags[-1] == "arch=compute_90,code=compute_90"   # PTX for newer GPUs


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(tc, "Path", _NoFile)
    with pytest.raises(VoxcError, match="install the CUDA toolkit: apt-get install nvidia-cuda-toolkit or put nvcc"):
        tc.find_nvcc()


class _NoFile(type(Path())):
    def exists(self):  # every candidate path is absent
        return False


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_stub_libcuda_builds_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXC_CACHE_DIR", str(tmp_path))
    stub = tc._build_stub()
    assert stub.name == "libcuda.so.1" and stub.exists()
    lib = ctypes.CDLL(str(stub))
    for name in tc._DRIVER_SYMBOLS:
        assert hasattr(lib, name)
    assert lib.cuModuleLoadData() == 100          # CUDA_ERROR_NO_DEVICE
    out = subprocess.run(["readelf", "-d", str(stub)], capture_output=True, text=True).stdout \
        if shutil.which("readelf") else "libcuda.so.1"
    assert "libcuda.so.1" in out                  # the soname the TVM runtime asks for
    assert tc._build_stub() == stub               # cached


@needs_nvcc
def test_cuda_build_holds_a_fatbin_for_each_arch(cuda_artifact):
    lib = (cuda_artifact / "model.so").read_bytes()
    assert tc.FATBIN_MAGIC in lib
    assert tc.fatbin_archs(lib) == set(ARCHS)
    assert b"__global__" not in lib               # no CUDA source left to compile at load time
    import json
    manifest = json.loads((cuda_artifact / "voxc-artifact.json").read_text())
    assert manifest["target"] == "cuda" and manifest["device_kind"] == "cuda" and manifest["weights"]
    # the cuBLAS call is linked into every CUDA model.so, but only quantized kernels call it: a float32
    # build's manifest asks the runtime for no native library
    assert b"voxc.cublas.gemm_nt" in lib and manifest["native_libraries"] == []


@needs_nvcc
def test_ring_attention_is_replaced_by_the_cuda_kernels():
    from targets.passes import fuse_transpose_matmul, swap_ring_attention
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph

    mod, _ = export_graph(ModelConfig.tiny(), tc.TARGET.graph_options())
    out = swap_ring_attention(fuse_transpose_matmul(mod))
    names = {gv.name_hint for gv in out.get_global_vars()}
    assert not {n for n in names if n.startswith("ring_attention") and not n.endswith(("_partial", "_merge"))}
    assert {n for n in names if n.endswith("_partial")} and {n for n in names if n.endswith("_merge")}
    assert any(n.startswith("NT_matmul") for n in names)
    assert "permute_dims" not in out["decode"].script()   # no per-call weight transposes


def test_static_entries_are_exported():
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph

    mod, params = export_graph(ModelConfig.tiny(), tc.TARGET.graph_options())
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert {"decode", "decode_b1n1", "encode", "mel"} <= names
    assert "tokens: R.Tensor((1, 1)" in mod["decode_b1n1"].script()
    assert len(mod["decode_b1n1"].params) == len(mod["decode"].params)


@pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")
@needs_nvcc
def test_loading_without_a_gpu_is_a_clear_error(cuda_artifact):
    code = ("import sys\nfrom voxc.runtime.model import CompiledModel\nfrom voxc.errors import VoxcError\n"
            "try:\n    CompiledModel.load(sys.argv[1])\nexcept VoxcError as e:\n    print('VOXCERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(cuda_artifact)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "VOXCERROR" in out.stdout, out.stderr[-2000:]
    assert "NVIDIA" in out.stdout


@pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")
@needs_nvcc
def test_loading_with_the_build_stub_is_a_clear_error(cuda_artifact):
    """Even in a process that preloaded the stub driver (a build and a load in one process)."""
    code = ("import sys\nfrom targets.cuda import preload_libcuda\npreload_libcuda()\n"
            "from voxc.runtime.model import CompiledModel\nfrom voxc.errors import VoxcError\n"
            "try:\n    CompiledModel.load(sys.argv[1])\nexcept VoxcError as e:\n    print('VOXCERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(cuda_artifact)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "VOXCERROR no usable NVIDIA GPU" in out.stdout, out.stderr[-2000:]


def test_fatbin_arch_parser_on_synthetic_cubins():
    def cubin(sm):
        header = bytearray(64)
        header[:4] = b"\x7fELF"
        header[4] = 2
        header[18:20] = b"\xbe\x00"
        header[48:52] = (sm << 8 | 0x40).to_bytes(4, "little")
        return bytes(header)

    blob = b"junk" + tc.FATBIN_MAGIC + cubin(80) + b"pad" + cubin(90)
    assert tc.fatbin_archs(blob) == {"sm_80", "sm_90"}


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_ring_attention_kernels_compile_for_each_storage_dtype(dtype):
    """Half caches load 8 lanes per vector; the float32 math on them must still compile with nvcc
    (TVM's CUDA codegen has no float32x8)."""
    from schedules.ring_attention import ring_attention_merge_cuda, ring_attention_partial_cuda

    funcs = {"partial": ring_attention_partial_cuda(8, 2, 128, 64, dtype),
             "merge": ring_attention_merge_cuda(8, 2, 128, 64, dtype)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    tc.prepare_toolchain()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    from targets.base import CompileReport
    report = CompileReport()
    with target, tc.fatbin_compiler(("sm_90",), report):
        tvm.compile(mod, target=target)        # nvcc raises a VoxcError on a broken kernel
    assert "__global__" in report.device_source and "make_ulonglong4" not in report.device_source
