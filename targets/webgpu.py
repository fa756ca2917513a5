"""WebGPU (browsers): WGSL kernels plus a wasm32 host module, linked with TVM's web runtime.

A model for the browser is one ``model.wasm`` (the Relax VM executable, its host code and the WGSL
shaders, statically linked with TVM's C++ runtime) driven from JavaScript by tvmjs, TVM's JS runtime.
The apache-tvm wheel ships the *sources* of both but no built artifacts, so this module builds them
once per (tvm, tvm-ffi, emcc) version into a cache:

* ``ensure_web_runtime``: TVM's C++ web runtime (``web/emcc/{wasm_runtime,tvmjs_support,
  webgpu_runtime}.cc``), compiled with Debian's emscripten from a TVM_HOME-like tree assembled from
  the wheel.  The wheel lacks nine small headers those sources include; voxc's own minimal versions
  live in ``targets/web_runtime_headers/`` (see its README).
* ``build_tvmjs``: the tvmjs bundle (``lib/index.js``), rolled up from the wheel's ``web/src`` with
  a pinned minimal npm toolchain (the wheel's package-lock.json is out of sync, so ``npm ci``
  fails).  ``source="npm"`` instead unpacks the pinned npm package ``@mlc-ai/web-runtime``.
* ``export_wasm``: links a compiled executable with the runtime.

Link speed: ``tvm.support.emcc.create_tvmjs_wasm`` links the runtime as LLVM *bitcode* at -O3, so
every export re-runs LLVM code generation on 16 MB of runtime bitcode plus binaryen -O3 (70-140 s
on 2 cores).  voxc instead compiles the runtime once to wasm *object files* and links those; the
default link (``optimize=False``) skips binaryen and takes about one second (6.6 MB wasm with
function names, useful in browser stack traces); ``optimize=True`` runs binaryen -O2 (3.9 MB,
30-40 s) for published bundles.  Both use create_tvmjs_wasm's flags otherwise.  TVM's own
exporter can't take the objects: it looks runtime files up by their ``.bc`` names.

Numerics: float32 by default.  Chrome on Linux/NVIDIA and SwiftShader (the headless test browser)
have no ``shader-f16``; a bundle records whether its WGSL needs it and voxc.js checks the adapter.
The mel front end computes in float32 (WGSL has no f64).

``voxc build CKPT --target webgpu -o OUT`` (``WebGPUTarget.package`` -> :func:`write_model_bundle`)
writes a static folder: the demo page (web/index.html, demo.js, demo.css, capture-worklet.js),
web/voxc.js (the streaming API, voxc.runtime.session's logic in JavaScript), tvmjs.js, model.wasm,
tensor-cache.json + params_shard_*.bin (weights, tvmjs's tensor-cache format), tokenizer.json
(token bytes for the text) and voxc-bundle.json (the manifest voxc.js reads first).  What the
browser graph changes against the common one (packed parameters, the split token table, argmax,
attention kernels, the DFT matmul, log10) is described at :func:`export_web_graph`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from schedules import pin_source
from targets.base import TargetSpec
from voxc.errors import VoxcError

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called

HEADERS_DIR = Path(__file__).resolve().parent / "web_runtime_headers"
WEB_DIR = Path(__file__).resolve().parent.parent / "web"  # voxc.js, the browser API
EMCC_HINT = "install Emscripten: apt-get install emscripten"
NPM_HINT = "install Node.js and npm (node 18+), e.g. apt-get install nodejs npm"
RUNTIME_SOURCES = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")  # slowest first
# The exact tool versions the wheel's web/package-lock.json resolves to, minus lint/test/doc tools.
TVMJS_BUILD_DEPS = {
    "rollup": "4.62.2",
    "@rollup/plugin-commonjs": "29.0.3",
    "@rollup/plugin-node-resolve": "16.0.3",
    "@rollup/plugin-typescript": "12.3.0",
    "rollup-plugin-ignore": "1.0.10",
    "typescript": "5.9.3",
    "tslib": "2.8.1",
    "@webgpu/types": "0.1.71",
    "@types/node": "25.9.5",
}
TVMJS_NPM_PACKAGE = "@mlc-ai/web-runtime@0.27.0-dev0"  # the tvmjs build published for TVM 0.27
# The browser can always count on 256 invocations per workgroup (the WebGPU default limit).
WEBGPU_DEFAULT_MAX_WORKGROUP = 256
# WebGPU's default maxStorageBufferBindingSize: every weight buffer of a bundle stays under it.
EMBEDDING_PART_BYTES = 128 << 20
# Matmuls with a run-time row count M: LowBatchGEMV (weights read once per `bucket` rows) while
# M <= limit, dlight's tiled Matmul above.  (limit, bucket) pairs, as the CUDA target's.
SMALL_M_TIERS = ((4, 4), (32, 16))
# create_tvmjs_wasm's link flags (tvm/support/emcc.py), which the model wasm keeps.
_LINK_FLAGS = ["-std=c++17", "--no-entry", "-s", "WASM_BIGINT=1", "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0",
               "-s", "STANDALONE_WASM=1", "-s", "ALLOW_MEMORY_GROWTH=1", "-s", "TOTAL_MEMORY=160MB"]
# web/Makefile's flags for tvmjs_runtime.js, whose JS glue (the wasm imports) tvmjs bundles.
_GLUE_LINK_FLAGS = ["--no-entry", "-s", "WASM_BIGINT=1", "-s", "ALLOW_MEMORY_GROWTH=1", "-s", "STANDALONE_WASM=1",
                    "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0", "-s", "ASYNCIFY=1"]
_CXX_FLAGS = ["-O3", "-std=c++17", "-Wno-ignored-attributes"]


# ---- the target ------------------------------------------------------------------------------------
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
    shard_mb: int = 32             # weight shard size (a tensor above half of it gets its own shard)
    small_m_tiers: tuple = SMALL_M_TIERS

    def tvm_target(self):
        return webgpu_target(self.max_workgroup_size)

    def export_graph(self, cfg):
        return export_web_graph(cfg, dtype=self.model_dtype, mel_dtype=self.mel_dtype,
                                embedding_part_bytes=self.embedding_part_bytes)

    def compile(self, mod):
        return compile_model_for_webgpu(mod, max_workgroup_size=self.max_workgroup_size,
                                        small_m_tiers=self.small_m_tiers)

    def export(self, executable, out_dir: Path) -> Path:
        return export_wasm(executable, Path(out_dir) / self.library_name, optimize=self.optimize_wasm)

    def package(self, out_dir: Path, *, executable, params, source, left_pad_tokens=None, quantization=None,
                progress: bool = True, log=None) -> Path:
        """``voxc build --target webgpu``: the static web folder (see :func:`write_model_bundle`)."""
        return write_model_bundle(out_dir, target=self, executable=executable, params=params, source=source,
                                  left_pad_tokens=left_pad_tokens, quantization=quantization,
                                  progress=progress, log=log)


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
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline)


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


# ---- the Voxtral graph for the browser -------------------------------------------------------------
# What the browser build changes against the graph every target compiles (voxc/model/graph.py):
#
# * parameters are one packed tuple argument (nn's ``param_mode="packed"``): voxc.js hands the VM
#   the weight array it got from the tensor cache once per call instead of hundreds of arguments;
# * a dense token table above ``embedding_part_bytes`` becomes row blocks, one GPU buffer each
#   (:class:`SplitEmbedding`): the 4B model's f32 table is 131072 x 3072 x 4 B = 1.5 GB, above
#   every browser's maxStorageBufferBindingSize default (128 MiB) and above SwiftShader's and
#   tvmjs's 1 GiB, while the table's other use, the tied LM head, must read all of it on the GPU
#   every step (so a CPU-side row lookup would not remove it from the GPU);
# * greedy ``topk(k=1)`` becomes an int32 argmax kernel (TVM's sort/argmax use int64 indices or
#   blockIdx.z, neither of which WGSL has);
# * the ring attention uses voxc's split-K kernels (schedules/ring_attention.py; dlight cannot
#   schedule the TE definition) with workgroups and shared memory sized for WebGPU's limits.


def _gather_rows_func(start: int, rows: int, dim: int, dtype: str, threads: int = 256):
    """In place: ``acc[i, :] = part[ids[i] - start, :]`` for the ids inside ``[start, start + rows)``."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def embedding_part_gather(var_acc: T.handle, var_part: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        acc = T.match_buffer(var_acc, (m, dim), dtype)
        part = T.match_buffer(var_part, (rows, dim), dtype)
        ids = T.match_buffer(var_ids, (m,), "int32")
        for bx in T.thread_binding((m * dim + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("gather"):
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < m * dim:
                        row: T.let[T.int64] = T.Cast("int64", ids[flat // dim]) - start
                        if row >= 0 and row < rows:
                            acc[flat // dim, flat % dim] = part[row, flat % dim]

    return embedding_part_gather


def _write_columns_func(start: int, cols: int, total: int, dtype: str, threads: int = 256):
    """In place: ``out[:, start:start + cols] = src``."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def write_columns(var_out: T.handle, var_src: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b = T.int64()
        out = T.match_buffer(var_out, (b, total), dtype)
        src = T.match_buffer(var_src, (b, cols), dtype)
        for bx in T.thread_binding((b * cols + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("copy"):
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < b * cols:
                        out[flat // cols, start + flat % cols] = src[flat // cols, flat % cols]

    return write_columns


class _Rows(nn.Module):
    def __init__(self, rows: int, dim: int, dtype: str):
        self.weight = nn.Parameter((rows, dim), dtype)


class SplitEmbedding(nn.Module):
    """The tied token table as row blocks ``parts.<k>.weight`` (``embedding_part_rows`` below),
    with DenseEmbedding's interface.  Every kernel binds at most one block, so no buffer exceeds
    the block size and no kernel needs more than a handful of storage bindings (WebGPU's default
    is 8 per shader stage)."""

    def __init__(self, vocab_size: int, dim: int, dtype: str, rows_per_part: int):
        self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype
        self.bounds = embedding_part_bounds(vocab_size, rows_per_part)
        self.parts = nn.ModuleList([_Rows(end - start, dim, dtype) for start, end in self.bounds])

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        b, n = ids.shape
        flat_ids = op.reshape(ids, (b * n,))
        acc = op.zeros((b * n, self.dim), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            acc = op.tensor_ir_inplace_op(
                _gather_rows_func(start, end - start, self.dim, self.dtype), "embedding_part_gather",
                args=[acc, part.weight, flat_ids], inplace_indices=[0],
                out=nn.Tensor.placeholder((b * n, self.dim), self.dtype))
        return op.reshape(acc, (b, n, self.dim))

    def project(self, hidden: nn.Tensor) -> nn.Tensor:
        b = hidden.shape[0]
        logits = op.zeros((b, self.vocab_size), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            piece = op.matmul(hidden, op.permute_dims(part.weight))
            logits = op.tensor_ir_inplace_op(
                _write_columns_func(start, end - start, self.vocab_size, self.dtype), "write_columns",
                args=[logits, piece], inplace_indices=[0],
                out=nn.Tensor.placeholder((b, self.vocab_size), self.dtype))
        return logits


class SplitQuantEmbedding(nn.Module):
    """A quantized tied token table (voxc.quant.linear.QuantEmbedding) as row blocks
    ``parts.<k>.qweight`` / ``parts.<k>.scales``: the 4B model's Q4_K table (201 MB of packed levels)
    is above WebGPU's 128 MiB binding limit too.  A lookup gathers from every block (ids outside a
    block read its row 0, masked out); the LM head runs the Q4 kernels per block into its columns."""

    def __init__(self, vocab_size: int, dim: int, qtype, dtype: str, rows_per_part: int):
        from voxc.quant.linear import QuantEmbedding

        self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype
        self.bounds = embedding_part_bounds(vocab_size, rows_per_part)
        self.parts = nn.ModuleList([QuantEmbedding(end - start, dim, qtype, dtype=dtype) for start, end in self.bounds])

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        import numpy as np

        b, n = ids.shape
        flat = op.reshape(ids, (b * n,))
        acc = op.zeros((b * n, self.dim), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            local = op.subtract(flat, nn.Tensor.from_const(np.array(start, "int32")))
            rows = part.lookup(local)
            col = op.reshape(local, (b * n, 1))
            inside_lo = op.greater_equal(col, nn.Tensor.from_const(np.array(0, "int32")))
            inside_hi = op.less(col, nn.Tensor.from_const(np.array(end - start, "int32")))
            acc = op.where(inside_lo, op.where(inside_hi, rows, acc), acc)
        return op.reshape(acc, (b, n, self.dim))

    def project(self, hidden: nn.Tensor) -> nn.Tensor:
        b = hidden.shape[0]
        logits = op.zeros((b, self.vocab_size), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            piece = part.project(hidden)
            logits = op.tensor_ir_inplace_op(
                _write_columns_func(start, end - start, self.vocab_size, self.dtype), "write_columns",
                args=[logits, piece], inplace_indices=[0],
                out=nn.Tensor.placeholder((b, self.vocab_size), self.dtype))
        return logits


def embedding_part_bounds(vocab_size: int, rows_per_part: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_part, vocab_size)) for s in range(0, vocab_size, rows_per_part)]


def embedding_part_rows(vocab_size: int, dim: int, dtype: str, part_bytes: int, row_bytes: int | None = None
                        ) -> int | None:
    """Rows per block of the token table, or None when the whole table fits in ``part_bytes``.
    ``row_bytes`` (default: ``dim`` elements of ``dtype``) is the size of a row's largest buffer."""
    import numpy as np

    row_bytes = row_bytes or dim * np.dtype(dtype).itemsize
    if vocab_size * row_bytes <= part_bytes:
        return None
    n_parts = -(-vocab_size * row_bytes // part_bytes)
    rows = -(-vocab_size // n_parts)
    while rows * row_bytes > part_bytes:
        n_parts += 1
        rows = -(-vocab_size // n_parts)
    return rows


SPLIT_EMBEDDING_PREFIX = "tok_embeddings.parts."


def export_web_graph(cfg, *, dtype: str = "float32", mel_dtype: str = "float32",
                     embedding_part_bytes: int = EMBEDDING_PART_BYTES):
    """The model's Relax module for the browser (see the section comment) and its parameter list."""
    from voxc.model.graph import VoxtralGraph
    from voxc.model.layers import DenseEmbedding
    from voxc.quant.formats import kernel_layout_shapes
    from voxc.quant.linear import QuantEmbedding

    graph = VoxtralGraph(cfg, dtype=dtype, mel_dtype=mel_dtype)
    d = cfg.decoder
    table = graph.tok_embeddings
    if isinstance(table, DenseEmbedding):
        rows = embedding_part_rows(d.vocab_size, d.dim, dtype, embedding_part_bytes)
        if rows is not None:
            graph.tok_embeddings = SplitEmbedding(d.vocab_size, d.dim, dtype, rows)
    elif isinstance(table, QuantEmbedding):
        row_bytes = 4 * max(s[1] for s in kernel_layout_shapes(table.qtype, d.vocab_size, d.dim).values())
        rows = embedding_part_rows(d.vocab_size, d.dim, dtype, embedding_part_bytes, row_bytes=row_bytes)
        if rows is not None:
            graph.tok_embeddings = SplitQuantEmbedding(d.vocab_size, d.dim, table.qtype, dtype, rows)
    spec = graph.export_spec()
    for method in spec.values():
        method["$"] = {"param_mode": "packed", "effect_mode": "none"}
    return graph.export_tvm(spec=spec)


def split_param_sources(specs) -> dict[str, tuple[str, slice]]:
    """Graph parameter -> ``(checkpoint name, row slice)`` for the blocks of a split token table
    (``tok_embeddings.parts.<k>.<field>`` are rows of ``tok_embeddings.<field>``, the blocks in
    order); ``specs`` is the graph's ``[(name, shape, dtype)]``.  Other parameters are not listed."""
    out, starts = {}, {}
    for name, shape, _ in specs:
        if not name.startswith(SPLIT_EMBEDDING_PREFIX):
            continue
        field = name.rsplit(".", 1)[1]
        start = starts.get(field, 0)
        out[name] = ("tok_embeddings." + field, slice(start, start + int(shape[0])))
        starts[field] = start + int(shape[0])
    return out


def split_embedding_parts(specs) -> int:
    """Number of token table blocks among the graph's parameters (0: not split)."""
    return len({name[len(SPLIT_EMBEDDING_PREFIX):].split(".")[0] for name, _, _ in specs
                if name.startswith(SPLIT_EMBEDDING_PREFIX)})


def _argmax_func(threads: int = 256):
    """``out[b, 0] = argmax(x[b, :])`` as int32, the lowest index among equal maxima (topk's k=1),
    one workgroup per row: a strided scan, then a tree in workgroup memory."""
    from tvm.script import tirx as T

    steps = threads.bit_length() - 1

    @T.prim_func(private=True, s_tir=True)
    def argmax_rows(var_x: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, n = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, n), "float32")
        out = T.match_buffer(var_out, (b, 1), "int32")
        for bx in T.thread_binding(b, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("argmax"):
                    best_v = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    best_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    ov = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    oi = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    mv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    mi = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    sv = T.sblock_alloc_buffer((threads,), "float32", scope="shared")
                    si = T.sblock_alloc_buffer((threads,), "int32", scope="shared")
                    best_v[0] = T.float32(-3.4028234663852886e38)
                    best_i[0] = T.int32(2147483647)
                    for j in T.serial((n + threads - 1) // threads):
                        idx: T.let[T.int64] = j * threads + T.Cast("int64", tx)
                        if idx < n:
                            if x[bx, idx] > best_v[0] or best_i[0] == T.int32(2147483647):
                                best_v[0] = x[bx, idx]
                                best_i[0] = T.Cast("int32", idx)
                    sv[tx] = best_v[0]
                    si[tx] = best_i[0]
                    T.tvm_storage_sync("shared")
                    for s in T.unroll(steps):
                        half: T.let[T.int32] = T.shift_right(T.int32(threads // 2), T.Cast("int32", s))
                        ov[0] = sv[T.min(tx + half, threads - 1)]
                        oi[0] = si[T.min(tx + half, threads - 1)]
                        mv[0] = sv[tx]
                        mi[0] = si[tx]
                        T.tvm_storage_sync("shared")
                        if tx < half and (ov[0] > mv[0] or (ov[0] == mv[0] and oi[0] < mi[0])):
                            sv[tx] = ov[0]
                            si[tx] = oi[0]
                        T.tvm_storage_sync("shared")
                    if tx == 0:
                        out[bx, 0] = si[0]

    return argmax_rows


def replace_greedy_topk(mod, threads: int = 256):
    """Every ``topk(x [b, n] f32, k=1, largest, indices, int32)`` -> :func:`_argmax_func`."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    topk_op = tvm.ir.Op.get("relax.topk")

    @mutator
    class _Replace(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module
            self.kernel = None

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != topk_op:
                return call
            a = call.attrs
            x = call.args[0].ty
            if (int(a.k) != 1 or a.ret_type != "indices" or not a.largest or str(a.dtype) != "int32"
                    or x.ndim != 2 or int(a.axis) not in (-1, 1) or str(x.dtype) != "float32"):
                raise VoxcError(f"webgpu: unsupported topk ({a}); only greedy argmax is implemented")
            if self.kernel is None:
                self.kernel = self.builder_.add_func(_argmax_func(threads), "argmax_rows")
            return relax.call_tir(self.kernel, [call.args[0]],
                                  relax.TensorType((x.shape.values[0], 1), "int32"))

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _Replace(mod).run()


def apply_attention_kernels(mod, *, threads: int = 128, keys_per_split: int = 256, max_splits: int = 32):
    """Swap each TE ``ring_attention*`` PrimFunc call for voxc's split-K kernels (partial + merge,
    schedules/ring_attention.py), laid out for WebGPU: ``threads`` invocations per workgroup."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from schedules import ring_attention as ra

    layout_args = {"threads": threads, "keys_per_split": keys_per_split, "max_splits": max_splits}
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
                lay = ra.cuda_kernel_layout(heads, kv_heads, head_dim, window, dtype, **layout_args)
                partial = self.builder_.add_func(ra.ring_attention_partial_cuda(
                    heads, kv_heads, head_dim, window, dtype, **layout_args), gv.name_hint + "_partial")
                merge = self.builder_.add_func(ra.ring_attention_merge_cuda(
                    heads, kv_heads, head_dim, window, dtype, **layout_args), gv.name_hint + "_merge")
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

    return relax.transform.DeadCodeElimination()(_Swap(mod).run())


def _const_matmul_func(k_dim: int, n_dim: int, dtype: str, threads: int = 256):
    """``out[b, f, j] = sum_k x[b, f, k] * w[k, j]``, one invocation per output, k in order."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def const_matmul(var_x: T.handle, var_w: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, f = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, f, k_dim), dtype)
        w = T.match_buffer(var_w, (k_dim, n_dim), dtype)
        out = T.match_buffer(var_out, (b, f, n_dim), dtype)
        for bx in T.thread_binding((b * f * n_dim + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("const_matmul"):
                    acc = T.sblock_alloc_buffer((1,), dtype, scope="local")
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < b * f * n_dim:
                        row: T.let[T.int64] = flat // n_dim
                        col: T.let[T.int64] = flat % n_dim
                        acc[0] = T.Cast(dtype, 0)
                        for k in T.serial(k_dim):
                            acc[0] = acc[0] + x[row // f, row % f, k] * w[k, col]
                        out[row // f, row % f, col] = acc[0]

    return const_matmul


def schedule_constant_matmuls(mod):
    """``matmul(x [b, f, K], C [K, N])`` with a constant ``C`` (the mel front end's DFT basis) -> a
    plain kernel, one invocation per output.  SwiftShader (the test browser's WebGPU) never finishes
    compiling dlight's tiled WGSL for that matmul, and it is small (N x K = 402 x 400 per frame)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = tvm.ir.Op.get("relax.matmul")

    @mutator
    class _Rewrite(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module
            self.kernels = {}

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != matmul_op:
                return call
            const = call.args[1]
            if isinstance(const, relax.Var):
                const = self.lookup_binding(const)
            x = call.args[0].ty
            if not isinstance(const, tvm.ir.expr.Constant) or x.ndim != 3:
                return call
            k_dim, n_dim = (int(d) for d in const.value.shape)
            dtype = str(x.dtype)
            key = (k_dim, n_dim, dtype)
            if key not in self.kernels:
                self.kernels[key] = self.builder_.add_func(_const_matmul_func(k_dim, n_dim, dtype), "const_matmul")
            b, f = x.shape.values[0], x.shape.values[1]
            return relax.call_tir(self.kernels[key], [call.args[0], call.args[1]],
                                  relax.TensorType((b, f, n_dim), dtype))

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _Rewrite(mod).run()


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
                             attention_threads: int = 128, small_m_tiers=None):
    """The Voxtral graph (:func:`export_web_graph`) -> VM executable with WGSL kernels.
    ``small_m_tiers``: see :func:`web_relax_pipeline` (None: SMALL_M_TIERS; ``()``: dlight's
    Matmul for every row count)."""
    import tvm

    from targets.passes import fuse_transpose_matmul

    small_m_tiers = SMALL_M_TIERS if small_m_tiers is None else small_m_tiers

    mod = replace_greedy_topk(mod, threads=min(256, max_workgroup_size))
    mod = schedule_constant_matmuls(mod)
    mod = fuse_transpose_matmul(mod)
    mod = apply_attention_kernels(mod, threads=min(attention_threads, max_workgroup_size))
    target = webgpu_target(max_workgroup_size)
    register_wgsl_intrinsics()
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=web_relax_pipeline(target, small_m_tiers))


def web_relax_pipeline(target, small_m_tiers=SMALL_M_TIERS):
    """TVM's generic GPU pipeline with one change: matmuls whose row count is only known at run time
    (every projection: rows = streams x tokens) get dlight's LowBatchGEMV kernels for few rows and
    its tiled Matmul for many, picked on the host by the row count (targets.cuda.small_m_dispatch).
    A decoder step has one row: the GEMV reads each weight once with all invocations busy."""
    from tvm.relax.backend.gpu_generic import pipeline as gpu_pipeline

    from targets.cuda import gpu_relax_pipeline

    return gpu_relax_pipeline(target, small_m_tiers, gpu_pipeline, "VoxcWebGPUPipeline")


# ---- toolchain helpers -----------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("VOXC_CACHE_DIR", Path.home() / ".cache" / "voxc"))


def find_emcc() -> str:
    emcc = shutil.which("emcc")
    if emcc is None:
        raise VoxcError(f"the WebGPU target needs emcc (Emscripten) to link wasm; {EMCC_HINT}")
    return emcc


def emcc_env() -> dict[str, str]:
    """Environment for Debian's emcc: its JS tools need Debian's node modules (acorn), which a
    nodesource/nvm node does not search.  EM_CACHE must stay unset: Debian ships a frozen cache."""
    env = dict(os.environ)
    if Path("/usr/share/nodejs").is_dir():
        env["NODE_PATH"] = os.pathsep.join(p for p in ("/usr/share/nodejs", env.get("NODE_PATH")) if p)
    return env


@functools.lru_cache(maxsize=None)  # ~1 s per call (Debian's emcc is a Python wrapper)
def emcc_version() -> str:
    out = subprocess.run([find_emcc(), "--version"], capture_output=True, text=True, env=emcc_env())
    if out.returncode != 0:
        raise VoxcError(f"emcc --version failed:\n{out.stdout}{out.stderr}")
    return out.stdout.splitlines()[0].strip()


def _run(cmd, *, cwd=None, env=None, what: str) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise VoxcError(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


class _Progress:
    """A tqdm bar over build steps that also ticks the elapsed time while one long step runs."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                        bar_format="{desc}: {n}/{total} steps [{elapsed}] {postfix}")
        self._stop = threading.Event()
        # Ticking the elapsed time only makes sense on a terminal; in a log each refresh is a line.
        self._thread = threading.Thread(target=self._tick, daemon=True) if sys.stderr.isatty() else None
        if self._thread:
            self._thread.start()

    def _tick(self):
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def step(self, note: str):
        self.bar.set_postfix_str(note, refresh=True)

    def done(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.bar.close()


def _headers_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(HEADERS_DIR.rglob("*.h")):
        h.update(p.relative_to(HEADERS_DIR).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _wheel_dirs() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    tvm_dir, ffi_dir = Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent
    for p in (tvm_dir / "web" / "emcc", tvm_dir / "src", tvm_dir / "include", ffi_dir / "include", ffi_dir / "src"):
        if not p.is_dir():
            raise VoxcError(f"the installed apache-tvm / apache-tvm-ffi wheels lack {p}; reinstall them")
    return tvm_dir, ffi_dir


def _versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished build into place; a concurrent builder that won keeps its copy."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "BUILD_INFO.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ---- C++ web runtime -------------------------------------------------------------------------------
def runtime_key() -> str:
    v = _versions()
    ident = json.dumps({**v, "emcc": emcc_version(), "cxx": _CXX_FLAGS, "headers": _headers_hash()}, sort_keys=True)
    return f"tvm{v['tvm']}-ffi{v['tvm_ffi']}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def ensure_web_runtime(cache_dir: str | Path | None = None, *, bitcode: bool = False, progress: bool = True) -> Path:
    """Build (once) and return a TVM_HOME-like tree whose ``web/dist/wasm`` holds TVM's web runtime
    as wasm objects (``*.o``, what ``export_wasm`` links) and, with ``bitcode=True``, as the
    ``*.bc`` files ``tvm.support.emcc.create_tvmjs_wasm`` expects under ``$TVM_HOME``.

    Cached under ``<cache_dir or ~/.cache/voxc>/web-runtime/<key>``, the key covering the tvm and
    tvm-ffi versions, emcc's version, the compile flags and voxc's headers.  About 85 s for the
    objects on 2 cores (wasm_runtime.cc is one big translation unit), as much again for bitcode.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    emcc = find_emcc()
    root = cache / "web-runtime" / runtime_key()
    wanted = [f"{n}.o" for n in RUNTIME_SOURCES] + ([f"{n}.bc" for n in RUNTIME_SOURCES] if bitcode else [])
    dist = root / "web" / "dist" / "wasm"
    if (root / "BUILD_INFO.json").exists() and all((dist / w).exists() for w in wanted):
        return root

    if root.exists():  # built earlier without the bitcode: add it in place
        tmp, final = root, root
    else:
        tmp, final = root.with_name(f"{root.name}.tmp-{os.getpid()}"), root
        shutil.rmtree(tmp, ignore_errors=True)
        _assemble_tree(tmp)
    bar = _Progress("voxc web runtime (emcc)", len(wanted), progress)
    timings: dict[str, float] = {}
    try:
        (tmp / "web" / "dist" / "wasm").mkdir(parents=True, exist_ok=True)
        jobs = [w for w in wanted if not (tmp / "web" / "dist" / "wasm" / w).exists()]
        bar.step("compiling " + ", ".join(jobs) + " (wasm_runtime takes 1.5-2 min)")

        def build(out_name: str) -> None:
            t0 = time.perf_counter()
            stem, kind = out_name.rsplit(".", 1)
            out = tmp / "web" / "dist" / "wasm" / out_name
            part = out.with_name(out.name + ".part")
            cmd = [emcc, *_CXX_FLAGS, *_include_flags(tmp), *(["-emit-llvm"] if kind == "bc" else []),
                   "-c", tmp / "web" / "emcc" / f"{stem}.cc", "-o", part]
            _run(cmd, cwd=tmp / "web", env=emcc_env(), what=f"compiling TVM's web runtime ({stem}.cc)")
            part.rename(out)
            timings[out_name] = round(time.perf_counter() - t0, 1)
            bar.step(f"built {out_name} in {timings[out_name]:.0f} s")
            bar.done()

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for fut in [pool.submit(build, j) for j in jobs]:
                fut.result()
        info_path = tmp / "BUILD_INFO.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {
            **_versions(), "emcc": emcc_version(), "cxx_flags": _CXX_FLAGS, "seconds": {}}
        info["seconds"].update(timings)
        info_path.write_text(json.dumps(info, indent=1))
    except BaseException:
        if tmp != final:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if tmp != final:
        _publish(tmp, final)
    return final


def _include_flags(root: Path) -> list[str]:
    # web/Makefile's INCLUDE_FLAGS
    return [f"-I{root}", f"-I{root / 'include'}", f"-I{root / '3rdparty/tvm-ffi/include'}",
            f"-I{root / '3rdparty/tvm-ffi/3rdparty/dlpack/include'}", f"-I{root / '3rdparty/compiler-rt'}"]


def _assemble_tree(root: Path) -> None:
    """TVM_HOME layout from the wheel (tvm/{src,include,web}, tvm_ffi as 3rdparty/tvm-ffi) plus
    voxc's headers; the wheel's node_modules-free web/ sources are all the build reads."""
    tvm_dir, ffi_dir = _wheel_dirs()
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc")
    for name in ("src", "include", "web"):
        shutil.copytree(tvm_dir / name, root / name, ignore=ignore)
    for name in ("include", "src", "3rdparty"):
        if (ffi_dir / name).is_dir():
            shutil.copytree(ffi_dir / name, root / "3rdparty" / "tvm-ffi" / name, ignore=ignore)
    for src in HEADERS_DIR.rglob("*.h"):
        dst = root / src.relative_to(HEADERS_DIR)
        if dst.exists():  # a newer wheel ships it: prefer TVM's own
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def runtime_objects(root: Path) -> list[Path]:
    return [root / "web" / "dist" / "wasm" / f"{n}.o" for n in RUNTIME_SOURCES]


# ---- linking ---------------------------------------------------------------------------------------
def link_wasm(output: str | Path, objects, *, runtime_root: Path, optimize: bool = False, options=None) -> None:
    """emcc-link model objects with the prebuilt runtime objects (create_tvmjs_wasm's flags).
    -O1 skips binaryen entirely (the objects are already -O3); -O2 runs binaryen over the module."""
    objects = [objects] if isinstance(objects, (str, Path)) else list(objects)
    cmd = [find_emcc(), "-O2" if optimize else "-O1", *_LINK_FLAGS, "-o", output,
           *runtime_objects(runtime_root), *objects, *(options or [])]
    _run(cmd, env=emcc_env(), what="linking the wasm module")


def export_wasm(executable, out_path: str | Path, *, cache_dir: str | Path | None = None,
                optimize: bool = False, progress: bool = True) -> Path:
    """Export a WebGPU executable to a self-contained ``.wasm`` for tvmjs.

    TVM emits the host code as a wasm *object* (``object_format = "o"``): emscripten 3.1.6's
    LLVM 14 cannot read the LLVM 22 bitcode TVM would emit by default.
    """
    out_path = Path(out_path)
    root = ensure_web_runtime(cache_dir, progress=progress)

    def fcompile(output, objects, options=None):
        link_wasm(output, objects, runtime_root=root, optimize=optimize, options=options)

    fcompile.object_format = "o"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out_path), fcompile=fcompile)
    return out_path


# ---- tvmjs (the JS runtime) ------------------------------------------------------------------------
def build_tvmjs(cache_dir: str | Path | None = None, *, source: str = "wheel", progress: bool = True) -> Path:
    """Build (once) and return the path of tvmjs's ``index.js`` (UMD; sets ``globalThis.tvmjs``).

    ``source="wheel"`` (default) rolls up the installed wheel's ``web/src`` so the JS matches the
    C++ runtime exactly; its emscripten glue (``tvmjs_runtime_wasi.js``: the libc/WASI imports of
    the wasm) comes from linking the runtime objects with web/Makefile's flags.  Needs npm and
    network access once (9 pinned build packages, ~35 MB node_modules, then cached).
    ``source="npm"`` unpacks the pinned ``@mlc-ai/web-runtime`` package instead (one download).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source == "npm":
        return _tvmjs_from_npm(cache, progress)
    if source != "wheel":
        raise VoxcError(f"unknown tvmjs source {source!r}; use 'wheel' or 'npm'")
    npm = shutil.which("npm")
    if npm is None:
        raise VoxcError(f"building tvmjs needs npm; {NPM_HINT}")
    runtime_root = ensure_web_runtime(cache, progress=progress)
    key = runtime_root.name + "-" + hashlib.sha256(json.dumps(TVMJS_BUILD_DEPS, sort_keys=True).encode()).hexdigest()[:8]
    final = cache / "tvmjs" / key
    index = final / "lib" / "index.js"
    if index.exists():
        return index

    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bar = _Progress("voxc tvmjs (emcc glue, npm, rollup)", 3, progress)
    timings = {}
    try:
        web = runtime_root / "web"
        shutil.copytree(web / "src", tmp / "src")
        shutil.copy2(web / "tsconfig.json", tmp / "tsconfig.json")
        glue = tmp / "glue"
        glue.mkdir()

        t0 = time.perf_counter()
        bar.step("linking the runtime's JS glue with emcc (about 40 s)")
        _run([find_emcc(), "-O1", "-std=c++17", "-o", glue / "tvmjs_runtime.js", *runtime_objects(runtime_root),
              *_GLUE_LINK_FLAGS, "--pre-js", web / "emcc" / "preload.js"], env=emcc_env(),
             what="linking tvmjs_runtime.js")
        _run([sys.executable, web / "emcc" / "decorate_as_wasi.py", glue / "tvmjs_runtime.js",
              tmp / "src" / "tvmjs_runtime_wasi.js", "es"], what="decorate_as_wasi.py")
        shutil.rmtree(glue)
        timings["glue"] = round(time.perf_counter() - t0, 1)
        bar.done()

        t0 = time.perf_counter()
        bar.step("npm install (pinned rollup + typescript)")
        (tmp / "package.json").write_text(json.dumps(
            {"name": "voxc-tvmjs-build", "private": True, "type": "module",
             "devDependencies": TVMJS_BUILD_DEPS}, indent=1))
        _run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=tmp, what="npm install")
        timings["npm_install"] = round(time.perf_counter() - t0, 1)
        bar.done()

        t0 = time.perf_counter()
        bar.step("rollup")
        (tmp / "rollup.config.mjs").write_text(_ROLLUP_CONFIG)
        _run([tmp / "node_modules" / ".bin" / "rollup", "-c"], cwd=tmp, what="rollup (tvmjs)")
        timings["rollup"] = round(time.perf_counter() - t0, 1)
        bar.done()

        shutil.rmtree(tmp / "node_modules")  # 35 MB, only needed for the build
        (tmp / "BUILD_INFO.json").write_text(json.dumps(
            {**_versions(), "source": "wheel", "build_deps": TVMJS_BUILD_DEPS, "seconds": timings}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    return index


# voxc's rollup config: one UMD file, as the wheel's web/rollup.config.mjs produces (node-only
# modules are stubbed out for the browser; ws/perf_hooks are only required under Node).
_ROLLUP_CONFIG = """\
import commonjs from "@rollup/plugin-commonjs";
import ignore from "rollup-plugin-ignore";
import resolve from "@rollup/plugin-node-resolve";
import typescript from "@rollup/plugin-typescript";

export default {
  input: "src/index.ts",
  output: { file: "lib/index.js", format: "umd", name: "tvmjs", exports: "named",
            globals: { ws: "ws", perf_hooks: "perf_hooks" } },
  plugins: [ignore(["fs", "path", "crypto"]), resolve({ browser: true }), commonjs(),
            typescript({ tsconfig: "./tsconfig.json", declaration: false, sourceMap: false })],
  external: ["ws", "perf_hooks"],
};
"""


def _tvmjs_from_npm(cache: Path, progress: bool) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise VoxcError(f"fetching tvmjs needs npm; {NPM_HINT}")
    final = cache / "tvmjs" / ("npm-" + TVMJS_NPM_PACKAGE.replace("@", "").replace("/", "-"))
    index = final / "lib" / "index.js"
    if index.exists():
        return index
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = _run([npm, "pack", TVMJS_NPM_PACKAGE, "--pack-destination", tmp, "--json"], cwd=tmp, what="npm pack")
        tgz = tmp / json.loads(out)[0]["filename"]
        with tarfile.open(tgz) as tf:
            member = tf.getmember("package/lib/index.js")
            (tmp / "lib").mkdir()
            (tmp / "lib" / "index.js").write_bytes(tf.extractfile(member).read())
        tgz.unlink()
        (tmp / "BUILD_INFO.json").write_text(json.dumps({"source": "npm", "package": TVMJS_NPM_PACKAGE}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return index


# ---- the browser bundle ----------------------------------------------------------------------------
BUNDLE_MANIFEST = "voxc-bundle.json"


def write_bundle(out_dir: str | Path, *, wasm: str | Path, executable=None, params=None,
                 param_names: list[str] | None = None, meta: dict | None = None,
                 tvmjs: str | Path | None = None, cache_dir: str | Path | None = None,
                 shard_mb: int = 32) -> Path:
    """Assemble a folder a web server can serve as is:

    ``voxc.js`` (the browser API), ``tvmjs.js``, ``model.wasm``, ``tensor-cache.json`` + shards
    (raw bytes, ``shard_mb`` per shard: each is fetched, cached and uploaded on its own, so none
    comes near the browser's 2 GB ArrayBuffer limit) and ``voxc-bundle.json``, the manifest voxc.js
    reads first: an id (content hash; the browser cache is keyed by it), parameter order, and the
    GPU requirements (from ``executable``'s shaders).
    """
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wasm, out / "model.wasm")
    shutil.copy2(tvmjs or build_tvmjs(cache_dir), out / "tvmjs.js")
    shutil.copy2(WEB_DIR / "voxc.js", out / "voxc.js")

    names = list(param_names if param_names is not None else (params or {}).keys())
    largest = 0
    if params:
        from tvm.contrib import tvmjs as tvmjs_py

        arrays = {n: np.ascontiguousarray(params[n]) for n in names}
        largest = max(a.nbytes for a in arrays.values())
        for old in out.glob("params_shard_*.bin"):
            old.unlink()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints even with show_progress=False
            tvmjs_py.dump_tensor_cache(arrays, str(out), encode_format="raw", shard_cap_mb=shard_mb,
                                       show_progress=False)
    h = hashlib.sha256()
    for f in sorted([out / "model.wasm", *out.glob("params_shard_*.bin"), out / "tensor-cache.json"]):
        if f.exists():
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    manifest = {
        "format": 1,
        "id": h.hexdigest()[:16],
        "wasm": "model.wasm",
        "param_names": names,
        "has_params": bool(params),
        "largest_param_bytes": int(largest),
        **(shader_info(executable) if executable is not None else {}),
        "meta": meta or {},
    }
    (out / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


# ---- the model bundle (voxc build --target webgpu) -------------------------------------------------
MODEL_BUNDLE_FORMAT = 2
MAX_RECORD_BYTES = 1 << 30   # one weight tensor: far below the 2 GB ArrayBuffer limit and 1 GiB bindings
TOKENIZER_TABLE = "tokenizer.json"
TENSOR_CACHE = "tensor-cache.json"
# The page and its helpers, copied from web/ next to voxc.js.
WEB_PAGE_FILES = ("index.html", "demo.js", "demo.css", "capture-worklet.js")
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


def tokenizer_table(tokenizer) -> dict:
    """What voxc.js needs to turn token ids into text: each ordinary token's bytes (base64, index =
    id - num_special; special/control ids print nothing, as voxc.tokenizer's token_bytes)."""
    import base64

    n_special = tokenizer.num_special_tokens
    pieces = [base64.b64encode(tokenizer.token_bytes(i)).decode("ascii")
              for i in range(n_special, tokenizer.vocab_size)]
    return {"format": 1, "vocab_size": tokenizer.vocab_size, "num_special": n_special,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "streaming_pad_id": tokenizer.streaming_pad_id, "streaming_word_id": tokenizer.streaming_word_id,
            "pieces": pieces}


def state_specs(cfg, dtype: str) -> dict:
    """Device state per stream slot, as voxc.runtime.model allocates it: name -> (shape with None at
    the slot axis, dtype).  Slot-indexed rings, updated in place by encode/decode."""
    from voxc.model.encoder import Encoder
    from voxc.model.config import AUDIO_RING_ROWS

    e, d = cfg.encoder, cfg.decoder
    return {
        "conv0_state": [None, Encoder.CONV0_CONTEXT, e.num_mel_bins],
        "conv1_state": [None, Encoder.CONV1_CONTEXT, e.dim],
        "enc_cache": [e.n_layers, 2, None, e.sliding_window, e.n_heads, e.head_dim],
        "audio_ring": [None, AUDIO_RING_ROWS, d.dim],
        "dec_cache": [d.n_layers, 2, None, d.sliding_window, d.n_kv_heads, d.head_dim],
    }


class _ShardWriter:
    """tvmjs's tensor cache (``tensor-cache.json`` + ``params_shard_<i>.bin``, "raw" records), written
    tensor by tensor so a model larger than memory streams through.  A tensor above half the cap gets
    a shard of its own; every shard stays below the browser's 2 GB ArrayBuffer limit as long as no
    single tensor does (write_model_bundle keeps them under 128 MiB)."""

    def __init__(self, out: Path, cap_bytes: int):
        self.out, self.cap = out, cap_bytes
        self.shards: list[dict] = []
        self._records: list[dict] = []
        self._file = None
        self._size = 0
        self._md5 = None
        self._sha = hashlib.sha256()

    def _open(self):
        name = f"params_shard_{len(self.shards)}.bin"
        self._file = open(self.out / name, "wb")
        self._name, self._size, self._records, self._md5 = name, 0, [], hashlib.md5()

    def _close(self):
        if self._file is None:
            return
        self._file.close()
        self._sha.update(self._name.encode() + self._md5.digest())
        self.shards.append({"dataPath": self._name, "format": "raw-shard", "nbytes": self._size,
                            "records": self._records, "md5sum": self._md5.hexdigest()})
        self._file = None

    def add(self, name: str, array) -> None:
        data = array.tobytes()
        big = len(data) > self.cap // 2
        if self._file is not None and (big or self._size + len(data) > self.cap):
            self._close()
        if self._file is None:
            self._open()
        pad = (-self._size) % 4   # WebGPU copies start at 4-byte offsets
        if pad:
            self._file.write(b"\0" * pad)
            self._md5.update(b"\0" * pad)
            self._size += pad
        self._records.append({"name": name, "shape": [int(s) for s in array.shape], "dtype": str(array.dtype),
                              "format": "raw", "nbytes": len(data), "byteOffset": self._size})
        self._file.write(data)
        self._md5.update(data)
        self._size += len(data)
        if big:
            self._close()

    def finish(self, metadata: dict) -> str:
        self._close()
        (self.out / TENSOR_CACHE).write_text(json.dumps({"metadata": metadata, "records": self.shards}))
        return self._sha.hexdigest()


def _copy_web_files(out: Path, tvmjs: str | Path | None, cache_dir) -> None:
    shutil.copy2(tvmjs or build_tvmjs(cache_dir), out / "tvmjs.js")
    shutil.copy2(WEB_DIR / "voxc.js", out / "voxc.js")
    for name in WEB_PAGE_FILES:
        if (WEB_DIR / name).exists():
            shutil.copy2(WEB_DIR / name, out / name)


def write_model_bundle(out_dir: str | Path, *, target: WebGPUTarget, executable, params, source,
                       left_pad_tokens: int | None = None, quantization: str | None = None,
                       tvmjs: str | Path | None = None, cache_dir: str | Path | None = None,
                       progress: bool = True, log=None, weights: bool = True) -> Path:
    """Write the static web folder of a compiled Voxtral model:

    ``index.html`` + ``demo.js``/``demo.css``/``capture-worklet.js`` (the demo page), ``voxc.js``
    (the streaming API), ``tvmjs.js``, ``model.wasm``, ``tensor-cache.json`` + ``params_shard_*.bin``
    (weights in the graph's order and dtype), ``tokenizer.json`` (token bytes for the text),
    ``voxc-bundle.json`` (what voxc.js reads first: config, parameter order, streaming defaults,
    state shapes, GPU requirements, content id) and ``voxc-artifact.json`` (so Python tools
    recognise the folder as a web bundle).

    ``params`` is the graph's parameter list (export_web_graph), ``source`` a voxc.build.WeightSource
    (or any object with ``config``, ``tokenizer_bytes`` and ``graph_param(name, shape)``).
    ``weights=False`` writes no shards (a benchmark bundle: voxc.js ``weights: "random"`` fills them).
    """
    import numpy as np
    from tqdm import tqdm

    from voxc import build as vb
    from voxc.model import mel
    from voxc.model.config import AUDIO_RING_ROWS
    from voxc.runtime.session import MAX_TOKENS_PER_ENCODE, RIGHT_PAD_BUFFER_TOKENS
    from voxc.tokenizer import Tokenizer

    log = log or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    log("linking model.wasm")
    wasm = target.export(executable, out)
    report = kernel_report(executable)

    log("writing weights (tensor cache shards)" if weights else "no weights (a benchmark bundle)")
    for old in out.glob("params_shard_*.bin"):
        old.unlink()
    writer = _ShardWriter(out, target.shard_mb << 20)
    computed = {vb.MEL_FILTERS: mel.mel_filter_bank(cfg.audio, cfg.encoder.num_mel_bins)}
    specs = [(name, [int(s) for s in p.shape], str(p.dtype)) for name, p in params]
    split = split_param_sources(specs)
    tables = {}   # tok_embeddings.<field> -> the whole table, while its blocks are written
    largest, total = 0, 0
    for name, shape, dtype in tqdm(specs if weights else [], desc="weights", unit="tensor", disable=not progress):
        if name in computed:
            array = computed[name]
        elif name in split:
            src_name, rows = split[name]
            if src_name not in tables:
                tables[src_name] = np.asarray(source.graph_param(src_name, None))
            array = tables[src_name][rows]
        else:
            array = source.graph_param(name, shape)
        if array is None:
            raise VoxcError(f"the checkpoint has no tensor for graph parameter {name}")
        array = np.ascontiguousarray(np.asarray(array).astype(vb._numpy_dtype(dtype), copy=False))
        if list(array.shape) != shape:
            raise VoxcError(f"tensor {name}: checkpoint shape {list(array.shape)} but the graph expects {shape}")
        if array.nbytes > MAX_RECORD_BYTES:
            raise VoxcError(f"tensor {name} has {array.nbytes / 2**30:.2f} GiB: a browser cannot hold it in one "
                            f"ArrayBuffer or bind it as one buffer; split it (as SplitEmbedding does the token table)")
        writer.add(name, array)
        largest, total = max(largest, array.nbytes), total + array.nbytes
    if not weights:
        total = sum(int(np.prod(sh)) * np.dtype(d).itemsize for _, sh, d in specs)
        largest = max((int(np.prod(sh)) * np.dtype(d).itemsize for _, sh, d in specs), default=0)
    weights_hash = writer.finish({"ParamSize": len(specs), "ParamBytes": total})
    tables.clear()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:   # Tokenizer reads a file; the source holds bytes
        (Path(tmp) / "tekken.json").write_bytes(source.tokenizer_bytes)
        tokenizer = Tokenizer(Path(tmp) / "tekken.json")
        tok_table = tokenizer_table(tokenizer)
    (out / TOKENIZER_TABLE).write_text(json.dumps(tok_table, separators=(",", ":")))
    if left_pad_tokens is None:
        left_pad_tokens = tokenizer.n_left_pad_tokens
    default_delay_ms = int(tokenizer.transcription_delay_ms or 480)

    log("writing the page and the manifest")
    _copy_web_files(out, tvmjs, cache_dir)
    itemsize = np.dtype(target.model_dtype).itemsize
    states = state_specs(cfg, target.model_dtype)
    state_bytes = {k: int(np.prod([1 if s is None else s for s in v])) * itemsize for k, v in states.items()}
    h = hashlib.sha256()
    for part in (hashlib.sha256(Path(wasm).read_bytes()).digest(), weights_hash.encode(),
                 (out / TOKENIZER_TABLE).read_bytes()):
        h.update(part)
    a = cfg.audio
    manifest = {
        "format": MODEL_BUNDLE_FORMAT,
        "id": h.hexdigest()[:16],
        "kind": "voxtral-realtime",
        "voxc_version": vb._voxc_version(),
        "tvm_version": vb._tvm_version(),
        "wasm": wasm.name,
        "tensor_cache": TENSOR_CACHE,
        "param_names": [n for n, _, _ in specs],
        "params": [{"name": n, "shape": sh, "dtype": d} for n, sh, d in specs],
        "param_mode": "packed",
        "has_params": weights,
        "model_dtype": target.model_dtype,
        "mel_dtype": target.mel_dtype,
        "quantization": quantization,
        "config": cfg.to_dict(),
        "functions": ["mel", "encode", "encode_stages", "decode"],
        "streaming": {
            "left_pad_tokens": int(left_pad_tokens),
            "default_delay_ms": default_delay_ms,
            "sampling_rate": a.sampling_rate, "hop_length": a.hop_length, "window_size": a.window_size,
            "samples_per_token": a.samples_per_token, "mel_frames_per_token": a.mel_frames_per_token,
            "conv_stride": a.conv_stride, "downsample_factor": a.downsample_factor,
            "ms_per_token": 1000.0 / a.frame_rate, "allowed_delay_tokens": [*range(1, 16), 30],
            "audio_ring_rows": AUDIO_RING_ROWS, "max_tokens_per_encode": MAX_TOKENS_PER_ENCODE,
            "right_pad_buffer_tokens": RIGHT_PAD_BUFFER_TOKENS,
        },
        "state": {k: {"shape": v, "dtype": target.model_dtype, "bytes_per_stream": state_bytes[k]}
                  for k, v in states.items()},
        "tokenizer": {"file": TOKENIZER_TABLE, **{k: v for k, v in tok_table.items() if k != "pieces"}},
        "embedding": ({"split": True, "parts": split_embedding_parts(specs)} if split_embedding_parts(specs)
                      else {"split": False}),
        "gpu": {
            **report,
            "largest_param_bytes": int(largest),
            "total_param_bytes": int(total),
            "largest_state_bytes_per_stream": max(state_bytes.values()),
            "state_bytes_per_stream": sum(state_bytes.values()),
        },
        # phase-1 fields, still read by voxc.js's generic loader
        "largest_param_bytes": int(largest),
        "required_features": report["required_features"],
        "max_workgroup_size": report["max_workgroup_size"],
    }
    (out / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    artifact = {
        "format": vb.ARTIFACT_FORMAT, "voxc_version": manifest["voxc_version"], "tvm_version": manifest["tvm_version"],
        "target": target.name, "device_kind": target.device_kind, "library": wasm.name,
        "model_dtype": target.model_dtype, "config": manifest["config"],
        "params": [{"name": n, "shape": s, "dtype": d} for n, s, d in specs], "weights": [TENSOR_CACHE],
        "tokenizer": TOKENIZER_TABLE, "left_pad_tokens": int(left_pad_tokens), "default_delay_ms": default_delay_ms,
        "quantization": quantization, "web_bundle": BUNDLE_MANIFEST,
    }
    (out / vb.MANIFEST).write_text(json.dumps(artifact, indent=1))
    log(f"web bundle written to {out}: serve the folder and open index.html")
    return out


class _NoWeights:
    """The WeightSource stand-in of a weight-less bundle: a config and a tokenizer, no tensors."""

    def __init__(self, config, tokenizer_bytes: bytes):
        self.config, self.tokenizer_bytes = config, tokenizer_bytes

    def graph_param(self, name, shape):
        raise VoxcError("a weight-less bundle has no weights")


def write_benchmark_bundle(out_dir: str | Path, cfg=None, *, target: WebGPUTarget | None = None,
                           quantization: str | None = None, progress: bool = True) -> Path:
    """A weight-less bundle of ``cfg`` (default: the 4B model, ``ModelConfig()``) for benchmarks:
    voxc.js loads it with ``weights: "random"`` (bench/webgpu_dawn.mjs).  ``quantization`` (q4_k,
    q4_0, q8_0) builds the projections and the token table quantized, as ``voxc build
    --quantization`` does.  Its tokenizer is the tiny Tekken vocabulary with the table padded to the
    model's vocab_size by one-byte pieces, so every token id the random model emits decodes."""
    import base64

    from voxc.model.config import ModelConfig
    from voxc.model.layers import quantized
    from voxc.quant.formats import QType
    from voxc.quant.linear import kernel_target
    from voxc.tokenizer import tiny_tekken_dict

    cfg = cfg or ModelConfig()
    target = target or TARGET
    quant = QType.parse(quantization).value if quantization else None
    with quantized(quant), kernel_target(target.name):
        mod, params = target.export_graph(cfg)
    executable = target.compile(mod)
    source = _NoWeights(cfg, json.dumps(tiny_tekken_dict()).encode())
    out = write_model_bundle(out_dir, target=target, executable=executable, params=params, source=source,
                             quantization=quant, progress=progress, weights=False)
    table = json.loads((out / TOKENIZER_TABLE).read_text())
    pad = base64.b64encode(b"?").decode()
    table["pieces"] += [pad] * (cfg.decoder.vocab_size - table["num_special"] - len(table["pieces"]))
    table["vocab_size"] = cfg.decoder.vocab_size
    (out / TOKENIZER_TABLE).write_text(json.dumps(table, separators=(",", ":")))
    manifest = json.loads((out / BUNDLE_MANIFEST).read_text())
    manifest["tokenizer"]["vocab_size"] = cfg.decoder.vocab_size
    (out / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
