"""WebGPU (browsers): WGSL kernels plus a wasm32 host module, linked with TVM's web runtime.

A model for the browser is one ``model.wasm`` (the Relax VM executable, its host code and the WGSL
shaders, statically linked with TVM's C++ runtime; targets/web_toolchain.py builds and links it)
driven from JavaScript by tvmjs, TVM's JS runtime, and web/voxc.js, voxc's streaming API.

What the browser graph changes against the common one (voxc.model.graph.GraphOptions): parameters
are one packed tuple argument (voxc.js hands the VM the weight array it got from the tensor cache
once per call instead of hundreds of arguments), and a token table above WebGPU's default
maxStorageBufferBindingSize (128 MiB) is split into row blocks (voxc.model.embedding).  What the
pipeline swaps (targets/passes.py): greedy ``topk(k=1)`` becomes an int32 argmax kernel (TVM's
sort/argmax use int64 indices or blockIdx.z, neither of which WGSL has); the ring attention uses
voxc's split-K kernels sized for WebGPU's limits; the mel front end's DFT matmul gets a plain
kernel (SwiftShader never finishes compiling dlight's tiled WGSL for it); log10 is lowered to log.

Numerics: float32 by default.  Chrome on Linux/NVIDIA and SwiftShader (the headless test browser)
have no ``shader-f16``; a bundle records whether its WGSL needs it and voxc.js checks the adapter.
The mel front end computes in float32 (WGSL has no f64).

``voxc build CKPT --target webgpu -o OUT`` writes a static folder (targets/web_bundle.py): the demo
page, web/voxc.js, tvmjs.js, model.wasm, the weights (tensor-cache.json + params_shard_*.bin),
tokenizer.json (token bytes for the text) and voxc-artifact.json, the manifest voxc.js reads first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

from targets.base import CompileReport, TargetSpec
from targets.gpu_pipeline import gpu_relax_pipeline, wgsl_tir_pipeline
from targets.passes import (fuse_transpose_matmul, replace_greedy_topk, schedule_constant_matmuls, swap_ring_attention,
                            swap_row_norms)
from targets.web_toolchain import export_wasm
from voxc.artifact import WEB_SHARD_BYTES
from voxc.errors import VoxcError
from voxc.model.graph import GraphOptions
from voxc.model.quantization import QuantPlan

# The browser can always count on 256 invocations per workgroup (the WebGPU default limit).
WEBGPU_DEFAULT_MAX_WORKGROUP = 256
# WebGPU's default maxComputeWorkgroupStorageSize.
WEBGPU_DEFAULT_WORKGROUP_STORAGE = 16 << 10
# WebGPU's default maxStorageBufferBindingSize: every weight buffer of a bundle stays under it.
EMBEDDING_PART_BYTES = 128 << 20
# Matmuls with a run-time row count M: LowBatchGEMV (weights read once per `bucket` rows) while
# M <= limit, dlight's tiled Matmul above.  (limit, bucket) pairs, as the CUDA target's.
SMALL_M_TIERS = ((4, 4), (32, 16))


@dataclasses.dataclass(frozen=True)
class WebGPUTarget(TargetSpec):
    name: str = "webgpu"
    device_kind: str = "webgpu"
    library_name: str = "model.wasm"
    model_dtype: str = "float32"   # no shader-f16 on SwiftShader / Chrome-on-NVIDIA
    mel_dtype: str = "float32"     # WGSL has no f64
    max_workgroup_size: int = WEBGPU_DEFAULT_MAX_WORKGROUP
    optimize_wasm: bool = True     # binaryen -O2 on the final link (see module docstring)
    # A dense token table larger than this is split into row blocks of at most this many bytes, one
    # GPU buffer each (see SplitEmbedding); 128 MiB is WebGPU's default maxStorageBufferBindingSize.
    embedding_part_bytes: int = EMBEDDING_PART_BYTES
    shard_bytes: int = WEB_SHARD_BYTES
    small_m_tiers: tuple = SMALL_M_TIERS

    def tvm_target(self):
        return webgpu_target(self.max_workgroup_size)

    def graph_options(self, quant: QuantPlan = QuantPlan()) -> GraphOptions:
        return dataclasses.replace(super().graph_options(quant), token_table_part_bytes=self.embedding_part_bytes,
                                   packed_params=True)

    def compile(self, mod, report: CompileReport | None = None):
        return compile_model_for_webgpu(mod, max_workgroup_size=self.max_workgroup_size,
                                        small_m_tiers=self.small_m_tiers, report=report)

    def export(self, executable, out_dir: Path) -> Path:
        return export_wasm(executable, Path(out_dir) / self.library_name, optimize=self.optimize_wasm)

    def package(self, out_dir: Path, *, executable, tokenizer_bytes: bytes, params, cfg,
                weights_written: bool) -> dict:
        """The page, voxc.js, tvmjs.js and the tokenizer table beside the library and the weights;
        returns the manifest fields voxc.js needs besides the common ones."""
        from targets.web_bundle import write_web_files

        return {**super().package(out_dir, executable=executable, tokenizer_bytes=tokenizer_bytes, params=params,
                                  cfg=cfg, weights_written=weights_written),
                **write_web_files(Path(out_dir), target=self, executable=executable, tokenizer_bytes=tokenizer_bytes,
                                  params=params, cfg=cfg, weights_written=weights_written)}


TARGET = WebGPUTarget()


WASM_HOST = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}


def webgpu_target(max_workgroup_size: int = WEBGPU_DEFAULT_MAX_WORKGROUP, supports_subgroups: bool = False,
                  host: dict | None = None):
    """WebGPU device target, wasm32 host by default (a native ``host`` is for running the WGSL
    outside a browser, see targets/vulkan.py).  Workgroups above 256 invocations need a device
    that grants more (voxc.js checks the adapter), so larger values are for known GPUs only."""
    import tvm

    if max_workgroup_size < 32 or max_workgroup_size & (max_workgroup_size - 1):
        raise VoxcError(f"max_workgroup_size must be a power of two >= 32, got {max_workgroup_size}")
    return tvm.target.Target(
        {"kind": "webgpu", "max_num_threads": int(max_workgroup_size), "supports_subgroups": bool(supports_subgroups)},
        host=host or WASM_HOST)


def compile_for_webgpu(mod, *, max_workgroup_size: int = WEBGPU_DEFAULT_MAX_WORKGROUP,
                       supports_subgroups: bool = False, host: dict | None = None, relax_pipeline="default"):
    """Relax IRModule -> VM executable with WGSL kernels (TVM's GPU pipeline: legalize, fuse, dlight)."""
    import tvm

    register_wgsl_intrinsics()

    target = webgpu_target(max_workgroup_size, supports_subgroups, host)
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline, tir_pipeline=wgsl_tir_pipeline())


def webgpu_module(executable):
    """The device module (kind "webgpu") inside a compiled executable: VMExecutable -> host -> webgpu."""
    stack = [executable.mod if hasattr(executable, "mod") else executable]
    while stack:
        m = stack.pop()
        if m.kind == "webgpu":
            return m
        stack.extend(m.imports)
    raise VoxcError("the executable holds no WebGPU module; was it compiled with compile_for_webgpu?")


def shader_info(executable) -> dict:
    """What the browser must offer to run the executable's WGSL: features and workgroup size."""
    dev = webgpu_module(executable)
    wgsl = dev.inspect_source("wgsl")
    sizes = [int(x) * int(y) * int(z) for x, y, z in
             re.findall(r"@workgroup_size\((\d+)\s*,\s*(\d+)\s*,\s*(\d+)\)", wgsl)]
    features = ["shader-f16"] if re.search(r"^\s*enable\s+f16\s*;", wgsl, re.M) else []
    if re.search(r"^\s*enable\s+subgroups\s*;", wgsl, re.M):
        features.append("subgroups")
    return {"required_features": features, "max_workgroup_size": max(sizes, default=1),
            "num_kernels": len(json.loads(dev.inspect_source("func_info")))}


_WGSL_SCALAR_BYTES = {"f32": 4, "i32": 4, "u32": 4, "f16": 2, "bool": 4}


def kernel_report(executable) -> dict:
    """Per-kernel resource use of the WGSL, checked against the adapter by voxc.js: storage buffers
    bound by one kernel (WebGPU's default maxStorageBuffersPerShaderStage is 8) and workgroup memory
    (default maxComputeWorkgroupStorageSize 16 KiB), besides :func:`shader_info`'s fields."""
    dev = webgpu_module(executable)
    wgsl = dev.inspect_source("wgsl")
    func_info = json.loads(dev.inspect_source("func_info"))
    buffers = max((sum(1 for t in info["arg_types"] if t == "handle") for info in func_info.values()), default=0)
    # A kernel's module starts with its bindings; split the source at each one's first binding.
    workgroup_bytes = 0
    for chunk in re.split(r"\n(?=@group\(0\) @binding\(0\))", wgsl):
        total = 0
        for elem, count in re.findall(r"var<workgroup>\s+\w+\s*:\s*array<([^,<>]+(?:<[^<>]+>)?),\s*(\d+)>", chunk):
            vec = re.fullmatch(r"vec(\d)<(\w+)>", elem.strip())
            size = int(vec.group(1)) * _WGSL_SCALAR_BYTES[vec.group(2)] if vec else _WGSL_SCALAR_BYTES[elem.strip()]
            total += size * int(count)
        for elem in re.findall(r"var<workgroup>\s+\w+\s*:\s*(\w+)\s*;", chunk):
            total += _WGSL_SCALAR_BYTES.get(elem, 4)
        workgroup_bytes = max(workgroup_bytes, total)
    return {**shader_info(executable), "max_storage_buffers_per_kernel": buffers,
            "max_workgroup_storage_bytes": workgroup_bytes}


@functools.lru_cache(maxsize=None)
def register_wgsl_intrinsics() -> None:
    """WGSL has no log10 (TVM's WebGPU codegen would print C's ``log10f``): lower it to
    ``log(x) * (1 / ln 10)``.  Registered once, for the webgpu target only."""
    import math

    from tvm import tirx
    from tvm.tirx.op import register_intrin_lowering

    def log10(op):
        x = op.args[0]
        return tirx.log(x) * tirx.const(1.0 / math.log(10.0), str(x.ty.dtype))

    register_intrin_lowering("tirx.log10", "webgpu", f=log10, level=99)


def compile_model_for_webgpu(mod, *, max_workgroup_size: int = WEBGPU_DEFAULT_MAX_WORKGROUP,
                             attention_threads: int = 128, small_m_tiers=None, report: CompileReport | None = None,
                             host: dict | None = None):
    """The Voxtral graph (voxc.model.export.export_graph) -> VM executable with WGSL kernels.
    ``small_m_tiers``: see :func:`web_relax_pipeline` (None: SMALL_M_TIERS; ``()``: dlight's
    Matmul for every row count).  ``host``: the host code's target (default wasm32; targets/vulkan.py
    passes a native llvm host)."""
    import tvm

    small_m_tiers = SMALL_M_TIERS if small_m_tiers is None else small_m_tiers

    mod = replace_greedy_topk(mod, threads=min(256, max_workgroup_size))
    mod = schedule_constant_matmuls(mod)
    mod = fuse_transpose_matmul(mod)
    mod = swap_row_norms(mod, max_threads=max_workgroup_size)
    # WebGPU's default limits: 256 invocations and 16 KiB of workgroup storage per workgroup, depth 64
    mod = swap_ring_attention(mod, threads=min(attention_threads, max_workgroup_size), keys_per_split=256,
                              max_splits=32, max_threads=max_workgroup_size, max_z=64,
                              max_shared_bytes=WEBGPU_DEFAULT_WORKGROUP_STORAGE, max_vector_lanes=4)
    target = webgpu_target(max_workgroup_size, host=host)
    register_wgsl_intrinsics()
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=web_relax_pipeline(target, small_m_tiers, report),
                           tir_pipeline=wgsl_tir_pipeline())


def web_relax_pipeline(target, small_m_tiers=SMALL_M_TIERS, report: CompileReport | None = None):
    """TVM's generic GPU pipeline with one change: matmuls whose row count is only known at run time
    (every projection: rows = streams x tokens) get dlight's LowBatchGEMV kernels for few rows and
    its tiled Matmul for many, picked on the host by the row count (targets.cuda.small_m_dispatch).
    A decoder step has one row: the GEMV reads each weight once with all invocations busy.  The GEMVs
    read their padded rows without branches (targets.gpu_pipeline.clamp_padded_rows: SwiftShader, the
    test browser's WebGPU, ran out of memory compiling the guarded loads of a GEMV with K > 128)."""
    from tvm.relax.backend.gpu_generic import pipeline as gpu_pipeline

    return gpu_relax_pipeline(target, small_m_tiers, gpu_pipeline, "VoxcWebGPUPipeline", report,
                              clamp_gemv_padding=True)
