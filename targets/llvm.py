"""CPU (llvm): the embedded default.  TVM's default CPU pipeline after voxc's transpose-matmul fusion;
quantized projections bring their own hand-scheduled kernels (schedules/dequant_matmul.py).

The instruction set is chosen at build time (``voxc build --cpu``): ``native`` (the default) compiles
for the building machine's CPU (AVX2/FMA/AVX-512 where it has them), ``generic`` for any x86-64 or
AArch64 CPU, or any LLVM CPU name (``x86-64-v3``, ``znver4``, ``cortex-a76``).  The artifact records
the ISA extensions its code uses, and loading it on a CPU without them is a clear error, not SIGILL.
"""
from __future__ import annotations

import dataclasses

from targets.base import CompileReport, TargetSpec
from targets.passes import fuse_transpose_matmul
from voxc.artifact import DECODE_B1N1, ENCODE_B1T8, ISA_FLAGS
from voxc.errors import VoxcError


def resolve_cpu(cpu: str | None) -> str | None:
    """``native`` -> this machine's LLVM CPU name; ``generic``/None -> None (LLVM's baseline)."""
    if cpu in (None, "", "generic"):
        return None
    from tvm.target import codegen

    if cpu == "native":
        return codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
        raise VoxcError(f"--cpu {cpu!r} is not a CPU LLVM knows for this machine's architecture; use native, generic, or a name such as "
                        "x86-64-v3, skylake-avx512, znver4, cortex-a76")
    return cpu


@dataclasses.dataclass(frozen=True)
class LlvmTarget(TargetSpec):
    name: str = "llvm"
    device_kind: str = "cpu"
    library_name: str = "model.so"
    mcpu: str | None = "native"   # see the module docstring
    # one-token decode steps and one stream's 80 ms encode run the quantized GEMV kernels (the
    # generic entries, whose row counts are symbolic, run the GEMM ones)
    static_entries: tuple = (DECODE_B1N1, ENCODE_B1T8)
    # quantized GEMVs (decode) with int8 activations and the CPU's integer dot products
    # (schedules/int8_gemv.py) where it has them (AVX-VNNI / AVX512-VNNI, AVX2, AArch64 dotprod);
    # Off by default: rounding the activations to int8 moves the tiny Q4_K model's logits by up to
    # 3e-2 of their range against every other target's float activations (voxc build --int8-activations)
    int8_activations: bool = False
    supports_kv_int8 = True   # through the reference kernels (schedules/ring_attention.py): correct, not tuned

    def int8_isa(self) -> str | None:
        """The integer dot product the quantized GEMVs use on this build's CPU, or None (float)."""
        from tvm.target import codegen

        from schedules.int8_gemv import int8_isa

        if not self.int8_activations:
            return None
        isa = int8_isa(codegen.llvm_get_cpu_features(self.tvm_target()))
        return None if isa == "generic" else isa     # a baseline build keeps the float GEMV

    def graph_options(self, quant=None):
        from voxc.model.quant_linear import int8_kernel_target

        options = super().graph_options(quant) if quant is not None else super().graph_options()
        plan = dataclasses.replace(options.quant, kernel_target=int8_kernel_target(self.name, self.int8_isa()))
        return dataclasses.replace(options, quant=plan)

    def compile(self, mod, report: CompileReport | None = None):
        from tvm import relax

        # nn.Linear is matmul(x, permute_dims(W)); unfused, every call copies W^T (8x slower decode
        # measured on a 60M-parameter decoder on this machine)
        mod = schedule_dense_matmuls(apply_cpu_attention(fuse_transpose_matmul(mod)))
        # the operators legalized here (tvm.compile's own LegalizeOps then finds none left), so that
        # their kernels can be made parallel; TVM's CPU pipeline stays the generic one, without the
        # operator fusion that TVM warns may drop calls kept for their side effects
        with self.tvm_target():
            mod = parallel_elementwise()(relax.transform.LegalizeOps()(mod))
        return super().compile(mod)

    def tvm_target(self):
        import tvm

        desc = {"kind": "llvm"}
        mcpu = resolve_cpu(self.mcpu)
        if mcpu:
            desc["mcpu"] = mcpu
        return tvm.target.Target(desc)

    def manifest_extras(self) -> dict:
        """The CPU the code was generated for and the ISA extensions it may use (checked at load)."""
        from tvm.target import codegen

        target = self.tvm_target()
        features = set(codegen.llvm_get_cpu_features(target))
        mcpu = target.attrs.get("mcpu")
        return {"cpu": {"mcpu": str(mcpu) if mcpu else "generic",
                        "isa": sorted(f for f in features if f in ISA_FLAGS)}}


def parallel_elementwise():
    """Every injective PrimFunc TVM's legalization made (activations, residual adds, RoPE) ->
    schedules/elementwise_cpu.py's parallel loop; voxc's own kernels (``tirx.is_scheduled``, already
    parallel, or written without blocks) are left alone."""
    import tvm
    from tvm import tirx

    from schedules.elementwise_cpu import schedule_elementwise_llvm

    @tvm.transform.module_pass(opt_level=0, name="VoxcParallelElementwise")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
                continue
            scheduled = schedule_elementwise_llvm(func)
            if scheduled is not None:
                mod[gv] = scheduled
        return mod

    return _pass


def apply_cpu_attention(mod):
    """Every ring-attention PrimFunc (the TE definition, schedules/ring_attention.py) -> the parallel
    CPU kernel with the same signature that visits only each query's visible keys."""
    from tvm import tirx

    from schedules.ring_attention import ring_attention_cpu, ring_shape

    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("ring_attention"):
            q, k, _, cache = func.params[:4]   # buffer params carry their shapes
            if str(cache.dtype) == "int8":
                # an 8-bit cache (voxc build --kv-int8, made for CUDA) keeps the TE definition here:
                # correct, one thread, every ring row scored
                continue
            window, page_rows = ring_shape(func)
            mod[gv] = ring_attention_cpu(int(q.shape[2]), int(k.shape[2]), int(q.shape[3]), window, str(q.dtype),
                                         page_rows=page_rows)
    return mod


def schedule_dense_matmuls(mod):
    """Every float NT_matmul -> schedules/dense_matmul.py's parallel, vectorized schedule (GEMV
    order for a few static rows, GEMM order otherwise); shapes that do not tile keep TVM's lowering."""
    from tvm import tirx

    from schedules.dense_matmul import schedule_nt_matmul_llvm

    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("NT_matmul"):
            scheduled = schedule_nt_matmul_llvm(func)
            if scheduled is not None:
                mod[gv] = scheduled
    return mod


TARGET = LlvmTarget()
