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

from targets.base import DECODE_B1N1, TargetSpec
from targets.passes import fuse_transpose_matmul
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
SMALL_M_DISPATCHED: set[str] = set()   # functions given per-tier kernels (one of them runs per call)
LAST_CUDA_SOURCE: str | None = None    # the CUDA C of the last compile (debugging; VOXC_KEEP_CUDA_SOURCE=1 saves it)


@dataclasses.dataclass(frozen=True)
class CudaTarget(TargetSpec):
    name: str = "cuda"
    device_kind: str = "cuda"
    library_name: str = "model.so"
    # float32 end to end for now: the model graph does not build in float16 yet (its attention mask
    # constant, time embedding and RoPE are float32-only); see bench/RESULTS.md.
    model_dtype: str = "float32"
    mel_dtype: str = "float64"
    arch: str = "sm_90"                     # what TVM generates code for (the newest of `archs`)
    archs: tuple[str, ...] = DEFAULT_ARCHS  # what nvcc emits machine code for
    cuda_graph: bool = False                # relax.backend.use_cuda_graph (see bench/RESULTS.md)
    hand_kernels: bool = True               # voxc's own attention kernels instead of dlight's fallback
    # Extra entry points exported with static shapes: dlight then picks GEMV kernels for one-token
    # steps, and with cuda_graph the whole step becomes one CUDA graph.  (name, entry, {dim: value});
    # callers use them where the shapes match (bench/cuda_bench.py; voxc.runtime when it learns to).
    # (targets.base.ENCODE_B1T8, which llvm exports, was measured SLOWER here than the generic
    # encode: static M=4 goes to dlight's padded Matmul, the generic one to the small-M kernels.)
    static_entries: tuple = (DECODE_B1N1,)
    # Matmuls whose row count M (batch x tokens) is only known at run time get one kernel per tier,
    # picked on the host by M: dlight's LowBatchGEMV (weights read once per `bucket` rows) for small M,
    # its tiled Matmul (rows padded to its tile) above. (max M, bucket); M beyond the last -> Matmul.
    # Measured on the H100 (bench/RESULTS.md): bucket 4 up to M=64 beats buckets 8 and 16 at M=8..27.
    small_m_tiers: tuple = ((64, 4),)

    def tvm_target(self):
        import tvm

        return tvm.target.Target({
            "kind": "cuda", "arch": self.arch,
            "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
            "thread_warp_size": 32, "registers_per_block": 65536,
        }, host={"kind": "llvm"})

    def compile(self, mod):
        prepare_toolchain()
        import tvm

        from tvm import relax

        target = self.tvm_target()
        # nn.Linear is matmul(x, permute_dims(W)): unfused, every call materialises W^T (3x the bytes)
        mod = fuse_transpose_matmul(mod)
        if self.hand_kernels:
            mod = apply_cuda_kernels(mod)
        config = {"relax.backend.use_cuda_graph": bool(self.cuda_graph)}
        with target, tvm.transform.PassContext(opt_level=3, config=config), fatbin_compiler(self.archs):
            return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, self.small_m_tiers))

    def export(self, executable, out_dir: Path) -> Path:
        path = out_dir / self.library_name
        executable.export_library(str(path))
        if FATBIN_MAGIC not in path.read_bytes():
            raise VoxcError(f"{path} holds no compiled CUDA binary (TVM kept the source); "
                            "is the CUDA runtime of TVM loadable?")
        if os.environ.get("VOXC_KEEP_CUDA_SOURCE") == "1" and LAST_CUDA_SOURCE:
            (out_dir / "kernels.cu").write_text(LAST_CUDA_SOURCE)
        return path


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
def fatbin_compiler(archs):
    """Within the block, TVM's CUDA compile callback runs nvcc once per module for all ``archs``."""
    import tvm_ffi
    from tvm.support import nvcc as tvm_nvcc

    flags = nvcc_arch_flags(archs)

    def compile_fatbin(code):
        global LAST_CUDA_SOURCE
        LAST_CUDA_SOURCE = code
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


def relax_pipeline(target, small_m_tiers):
    """TVM's CUDA pipeline (relax.backend.cuda.get_default_pipeline) with :func:`small_m_dispatch`
    before dlight's default rules."""
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    return gpu_relax_pipeline(target, small_m_tiers, cuda_pipeline, "VoxcCudaPipeline")


def gpu_relax_pipeline(target, small_m_tiers, backend, name: str):
    """``backend``'s (a ``tvm.relax.backend.*.pipeline`` module) GPU pipeline: library dispatch,
    legalize + fuse, then :func:`small_m_dispatch` (if ``small_m_tiers``) before dlight's default
    rules, dataflow lowering and finalization."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    schedule = ([small_m_dispatch(target, small_m_tiers)] if small_m_tiers else []) + [
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                dl.gpu.Fallback())]

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + legalize + schedule
                + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline


def small_m_dispatch(target, tiers):
    """For each PrimFunc that dlight's Matmul rule takes and whose output rows M are symbolic, build one
    schedule per tier of ``tiers`` (LowBatchGEMV with that bucket) plus the Matmul one, and pick among
    them on the host: ``if M <= 64: <LowBatchGEMV> else: <Matmul>`` (more tiers nest)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    def rows(func):
        out = func.params[-1]
        shape = list(getattr(out, "shape", []) or [])
        if len(shape) < 2:
            return None
        m = shape[0]
        for d in shape[1:-1]:
            m = m * d
        from tvm.sym.analyzer import Analyzer

        m = Analyzer().simplify(m)
        return None if isinstance(m, tirx.IntImm) else m

    def scheduled(rule, func):
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule that cannot take this function
            return None
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        return None if sch is None else sch.mod["main"]

    @tvm.transform.module_pass(opt_level=0, name="VoxcSmallMDispatch")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            m = rows(func)
            if m is None:
                continue
            large = scheduled(dl.gpu.Matmul(), func)
            if large is None:
                continue
            small = [(limit, scheduled(dl.gpu.LowBatchGEMV(bucket), func)) for limit, bucket in tiers]
            if any(f is None for _, f in small):
                continue
            body = large.body
            for limit, f in reversed(small):
                body = tirx.IfThenElse(tirx.op.tvm_thread_invariant(m <= limit), f.body, body)
            updates[gv] = func.with_body(body).with_attr("tirx.is_scheduled", True)
            SMALL_M_DISPATCHED.add(gv.name_hint)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def apply_cuda_kernels(mod):
    """Swap every call of a TE ring-attention PrimFunc (``ring_attention*``) for the split-K CUDA kernels
    of schedules/ring_attention.py (partial + merge), before dlight sees the module."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from schedules import ring_attention as ra

    attention = {gv for gv, f in mod.functions_items()
                 if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("ring_attention")}
    if not attention:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @mutator
    class _Swap(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module
            self.kernels = {}

        def kernels_for(self, gv):
            if gv not in self.kernels:
                func = self.module[gv]
                q, k, _, cache = func.params[:4]
                heads, head_dim = int(q.shape[2]), int(q.shape[3])
                kv_heads, window, dtype = int(k.shape[2]), int(cache.shape[3]), str(q.dtype)
                lay = ra.cuda_kernel_layout(heads, kv_heads, head_dim, window, dtype)
                partial = self.builder_.add_func(
                    ra.ring_attention_partial_cuda(heads, kv_heads, head_dim, window, dtype), gv.name_hint + "_partial")
                merge = self.builder_.add_func(
                    ra.ring_attention_merge_cuda(heads, kv_heads, head_dim, window, dtype), gv.name_hint + "_merge")
                self.kernels[gv] = (partial, merge, heads, head_dim, lay["n_splits"])
            return self.kernels[gv]

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != call_tir or call.args[0] not in attention:
                return call
            partial, merge, heads, head_dim, splits = self.kernels_for(call.args[0])
            out_info = call.ty_args[0]
            b, n = out_info.shape.values[0], out_info.shape.values[1]
            parts = self.builder_.emit(relax.call_tir(partial, call.args[1], [
                relax.TensorType((b, n, heads, splits, head_dim), "float32"),
                relax.TensorType((b, n, heads, splits), "float32")]), "attn_parts")
            o = self.builder_.emit(relax.TupleGetItem(parts, 0), "attn_o")
            lse = self.builder_.emit(relax.TupleGetItem(parts, 1), "attn_lse")
            return relax.call_tir(merge, relax.Tuple([o, lse]), out_info)

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    out = _Swap(mod).run()
    return relax.transform.DeadCodeElimination()(out)


if __name__ == "__main__":  # pragma: no cover - debugging aid: python -m targets.cuda <library.so>
    print(sorted(fatbin_archs(Path(sys.argv[1]).read_bytes())))
