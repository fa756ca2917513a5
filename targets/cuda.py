"""CUDA (NVIDIA GPUs, servers): the Relax GPU pipeline with dlight schedules plus voxc's hand-written
GPU kernels, exported as one shared library that holds a compiled fatbin (SASS for several
architectures + PTX for newer ones), so loading an artifact never runs a CUDA compiler.

Building needs ``nvcc`` (CUDA toolkit) but no GPU: TVM's CUDA runtime library links ``libcuda.so.1``
(the driver), and TVM only calls its CUDA compile callback when that library loads.  Without a
driver, voxc compiles a tiny stub ``libcuda.so.1`` (every call answers "no device") into a cache
directory and preloads it, which is all the compiler needs.

Numerics: see ``model_dtype`` below.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from targets.base import CompileReport, TargetSpec
from targets.gpu_pipeline import gpu_relax_pipeline
from targets.passes import fuse_transpose_matmul, replace_greedy_topk, swap_ring_attention, swap_row_norms
from schedules.dequant_matmul import CUBLAS_GEMM_NT, PACKED_CALLS_ATTR
from voxc.artifact import DECODE_B1N1
from voxc.errors import VoxcError

# SASS is emitted for these; PTX of the newest one is embedded too, for GPUs newer than the list.
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
NVCC_HINT = "install the CUDA toolkit: apt-get install nvidia-cuda-toolkit or put nvcc on PATH"
# Every driver entry point libtvm_runtime_cuda.so links (nm -D --undefined-only); the stub defines them all.
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                   "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                   "cuTensorMapEncodeTiled")
FATBIN_MAGIC = b"\x50\xed\x55\xba"     # 0xBA55ED50, little endian: a CUDA fatbin container
CUBIN_MAGIC = b"\x7fELF"


@dataclasses.dataclass(frozen=True)
class CudaTarget(TargetSpec):
    name: str = "cuda"
    device_kind: str = "cuda"
    library_name: str = "model.so"
    # float32 by default; --dtype float16 halves memory and weight reads.  A quantized build runs
    # float16 activations and caches with float32 accumulation (q4f16) unless --dtype says otherwise.
    model_dtype: str = "float32"
    quantized_dtype: str = "float16"
    mel_dtype: str = "float64"
    arch: str = "sm_90"                     # what TVM generates code for (the newest of `archs`)
    archs: tuple[str, ...] = DEFAULT_ARCHS  # what nvcc emits machine code for
    cuda_graph: bool = False                # relax.backend.use_cuda_graph (see bench/RESULTS.md)
    hand_kernels: bool = True               # voxc's own attention kernels instead of dlight's fallback
    # Extra entry points exported with static shapes: dlight then picks GEMV kernels for one-token
    # steps, and with cuda_graph the whole step becomes one CUDA graph.  (name, entry, {dim: value});
    # callers use them where the shapes match (bench/cuda_bench.py; voxc.runtime when it learns to).
    # (voxc.artifact.ENCODE_B1T8, which llvm exports, was measured SLOWER here than the generic
    # encode: static M=4 goes to dlight's padded Matmul, the generic one to the small-M kernels.)
    static_entries: tuple = (DECODE_B1N1,)
    # Matmuls whose row count M (batch x tokens) is only known at run time get one kernel per tier,
    # picked on the host by M: dlight's LowBatchGEMV (weights read once per `bucket` rows) for small M,
    # its tiled Matmul (rows padded to its tile) above. (max M, bucket); M beyond the last -> Matmul.
    # Measured on the H100 (bench/RESULTS.md): bucket 4 up to M=64 beats buckets 8 and 16 at M=8..27.
    small_m_tiers: tuple = ((64, 4),)
    supports_kv_int8 = True
    # ring attention keeps each block's key span in registers (schedules/ring_attention.py
    # cuda_kernel_layout): off until a GPU run shows it correct and faster (bench/cuda_build.py --span-registers)
    attention_span_in_registers: bool = False

    def tvm_target(self):
        import tvm

        return tvm.target.Target({
            "kind": "cuda", "arch": self.arch,
            "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
            "thread_warp_size": 32, "registers_per_block": 65536,
        }, host={"kind": "llvm"})

    def compile(self, mod, report: CompileReport | None = None):
        if self.kv_int8 and not self.hand_kernels:
            raise VoxcError("8-bit KV caches need voxc's attention kernels on CUDA (hand_kernels=True)")
        prepare_toolchain()
        import tvm
        from tvm.relax.backend.cuda import pipeline as cuda_pipeline

        target = self.tvm_target()
        # nn.Linear is matmul(x, permute_dims(W)): unfused, every call materialises W^T (3x the bytes)
        mod = fuse_transpose_matmul(mod)
        mod = swap_row_norms(mod)   # each residual add and its norm: one block per row
        if self.hand_kernels:   # voxc's split-K attention instead of dlight's fallback for the TE definition
            mod = swap_ring_attention(mod, span_in_registers=self.attention_span_in_registers)
            # greedy topk(k=1) as one argmax kernel: TVM's topk lowering measured 80 us and 11 launches
            # of a 2.75 ms decode step on an H100 (the argmax: one block per row)
            mod = replace_greedy_topk(mod, threads=1024)
        config = {"relax.backend.use_cuda_graph": bool(self.cuda_graph)}
        pipeline = gpu_relax_pipeline(target, self.small_m_tiers, cuda_pipeline, "VoxcCudaPipeline", report)
        with target, tvm.transform.PassContext(opt_level=3, config=config), fatbin_compiler(self.archs, report):
            executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
        # which native libraries the artifact's kernels call (the manifest's native_libraries)
        executable.voxc_packed_calls = packed_calls(mod)
        return executable

    def export(self, executable, out_dir: Path) -> Path:
        import tempfile

        path = out_dir / self.library_name
        with tempfile.TemporaryDirectory(prefix="voxc-cublas-") as scratch:
            # every CUDA model.so holds the cuBLAS call (it loads cuBLAS only when first called)
            executable.export_library(str(path), addons=[str(compile_cublas_shim(Path(scratch)))])
        if FATBIN_MAGIC not in path.read_bytes():
            raise VoxcError(f"{path} holds no compiled CUDA binary (TVM kept the source); "
                            "is the CUDA runtime of TVM loadable?")
        return path

    def package(self, out_dir: Path, *, executable, tokenizer_bytes: bytes, params, cfg,
                weights_written: bool) -> dict:
        extras = super().package(out_dir, executable=executable, tokenizer_bytes=tokenizer_bytes, params=params,
                                 cfg=cfg, weights_written=weights_written)
        calls = getattr(executable, "voxc_packed_calls", set())
        # the runtime finds and loads these before the model (voxc.runtime.tvm_runtime.preload_native)
        extras["native_libraries"] = sorted(name for name, fn in NATIVE_LIBRARY_CALLS.items() if fn in calls)
        return extras


# Native libraries a CUDA artifact may call, by the global function its kernels call them through.
NATIVE_LIBRARY_CALLS = {"cublas": CUBLAS_GEMM_NT}


def packed_calls(mod) -> set[str]:
    """Names of the global functions that the PrimFuncs of ``mod`` call from their host code, as their
    schedules recorded them (schedules.dequant_matmul.PACKED_CALLS_ATTR)."""
    from tvm import tirx

    return {str(name) for func in mod.functions.values() if isinstance(func, tirx.PrimFunc) and func.attrs
            for name in func.attrs.get(PACKED_CALLS_ATTR, ())}


TARGET = CudaTarget()


# ---- toolchain -------------------------------------------------------------------------------------------
def find_nvcc() -> str:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"]) / "bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise VoxcError(f"the cuda target needs nvcc, which was not found; {NVCC_HINT}")


def prepare_toolchain() -> None:
    """Make TVM's CUDA codegen produce binaries on this machine (GPU or not); idempotent."""
    nvcc = find_nvcc()
    nvcc_dir = str(Path(nvcc).parent)
    if nvcc_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = nvcc_dir + os.pathsep + os.environ.get("PATH", "")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    preload_libcuda()
    _load_tvm_cuda_runtime()


def preload_libcuda() -> str:
    """dlopen the real driver, or else a stub with the same soname; returns which was loaded."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "driver"
    except OSError:
        pass
    stub = _build_stub()
    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)   # later dlopens of libcuda.so.1 reuse it (same soname)
    return str(stub)


def _stub_source() -> str:
    lines = ["typedef int CUresult;",
             'static const char *msg = "no CUDA device (voxc build-time stub of libcuda.so.1)";']
    for name in _DRIVER_SYMBOLS:
        if name in ("cuGetErrorName", "cuGetErrorString"):
            lines.append(f"CUresult {name}(CUresult e, const char **s) {{ if (s) *s = msg; return 0; }}")
        else:
            lines.append(f"CUresult {name}(void) {{ return 100; }}  /* CUDA_ERROR_NO_DEVICE */")
    return "\n".join(lines) + "\n"


def _build_stub() -> Path:
    cache = Path(os.environ.get("VOXC_CACHE_DIR", Path.home() / ".cache" / "voxc")) / "cuda_stub"
    source = _stub_source()
    lib, src = cache / "libcuda.so.1", cache / "stub.c"
    if lib.exists() and src.exists() and src.read_text() == source:
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    src.write_text(source)
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise VoxcError("building for cuda without an NVIDIA driver needs a C compiler (gcc) for the stub libcuda")
    tmp = cache / f"libcuda.so.1.{os.getpid()}"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise VoxcError(f"could not build the stub libcuda.so.1: {proc.stderr.strip()}")
    os.replace(tmp, lib)
    return lib


def _load_tvm_cuda_runtime() -> None:
    import tvm  # noqa: F401  (its import loads libtvm_runtime_cuda.so when libcuda is loadable)
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    # tvm was imported before libcuda was loadable: load the CUDA runtime now.
    path = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        hint = " (the CUDA runtime libcudart.so.13 comes with the CUDA toolkit)" if "cudart" in str(exc) else ""
        raise VoxcError(f"cannot load TVM's CUDA runtime {path}: {exc}{hint}") from exc
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise VoxcError(f"{path} loaded but registered no CUDA module loader")


# ---- multi-architecture fatbin -----------------------------------------------------------------------------
def nvcc_arch_flags(archs) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    newest = max(archs, key=lambda a: int("".join(c for c in a.removeprefix("sm_") if c.isdigit())))
    num = newest.removeprefix("sm_")
    flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]   # PTX, JIT-compiled by newer drivers
    return flags


@contextlib.contextmanager
def fatbin_compiler(archs, report: CompileReport | None = None):
    """Within the block, TVM's CUDA compile callback runs nvcc once per module for all ``archs``;
    ``report.device_source`` gets the CUDA C it compiled."""
    import tvm_ffi
    from tvm.support import nvcc as tvm_nvcc

    flags = nvcc_arch_flags(archs)

    def compile_fatbin(code):
        if report is not None:
            report.device_source = code
        try:
            return tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=flags, options=["--threads", "0"],
                                         compiler="nvcc")
        except RuntimeError as exc:   # nvcc's message follows the whole source: keep its errors
            lines = str(exc).splitlines()
            errors = [" | ".join(lines[i:i + 3]) for i, line in enumerate(lines) if ": error" in line]
            raise VoxcError("nvcc failed:\n" + "\n".join(errors[:12]) + "\n" + "\n".join(lines[-3:])) from None

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_fatbin, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def fatbin_archs(data: bytes) -> set[str]:
    """The sm_XX of each cubin inside a library's embedded fatbins (e_flags of their ELF headers)."""
    found = set()
    start = 0
    while True:
        i = data.find(CUBIN_MAGIC, start)
        if i < 0:
            return found
        start = i + 4
        header = data[i:i + 64]
        if len(header) < 64 or header[4] != 2 or header[18:20] != b"\xbe\x00":   # ELFCLASS64, EM_CUDA (190)
            continue
        flags = int.from_bytes(header[48:52], "little")
        # CUDA ELF e_flags: bits 8..15 hold the SM version for CUDA >= 12 (ABI v8), bits 0..7 before.
        sm = (flags >> 8) & 0xFF if (flags & 0xFF) in (0, 0x40, 0x80) or (flags >> 8) & 0xFF >= 50 else flags & 0xFF
        found.add(f"sm_{sm}")


CUBLAS_SHIM_SOURCE = Path(__file__).with_name("cuda_cublas.cc")


def compile_cublas_shim(out_dir: Path) -> Path:
    """Compile targets/cuda_cublas.cc (the ``voxc.cublas.gemm_nt`` global function) into a
    position-independent object file in ``out_dir`` for linking into model.so; returns its path.

    Needs only g++ and tvm_ffi's headers: the shim dlopens libcublas at run time, so neither the CUDA
    toolkit's cuBLAS nor a GPU is needed here.  Not cached: it compiles in about a second.
    """
    import tvm_ffi.libinfo  # noqa: PLC0415 - only builds need it

    cxx = shutil.which("g++")
    if cxx is None:
        raise VoxcError("building for CUDA needs g++ to compile voxc's cuBLAS shim: apt-get install g++")
    includes = dict.fromkeys([tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path()])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "cuda_cublas.o"
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-c", str(CUBLAS_SHIM_SOURCE), "-o", str(obj)]
    cmd += [f"-I{d}" for d in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        # gcc's first "file:line:col: error: ..." line, else whatever it said first
        errors = [line for line in lines if ": error:" in line or ": fatal error:" in line]
        first = (errors or lines or [f"exit status {proc.returncode}"])[0]
        raise VoxcError(f"g++ could not compile voxc's cuBLAS shim {CUBLAS_SHIM_SOURCE.name}: {first}")
    return obj


if __name__ == "__main__":  # pragma: no cover - debugging aid: python -m targets.cuda <library.so>
    print(sorted(fatbin_archs(Path(sys.argv[1]).read_bytes())))
