"""Fused dequantize + matmul kernels for GGUF Q4_0 / Q8_0 / Q4_K weights, scheduled by hand per target.

Two kernel shapes, both computing ``y[m, n] = sum_k x[m, k] * W[n, k]`` with ``W`` dequantized on the
fly from the kernel layout of :mod:`voxc.quant.formats` (``qweight`` and ``scales``, both uint32):

* **GEMV** (decode; static batch 1..16): bandwidth-bound, so the weight words are read once and
  used for every batch row.  The math is factored per 32-element group ``g``::

      part[b, n, g] = sum_{i<32} x[b, 32g+i] * raw(n, 32g+i)          # raw: q-8 / int8 / q
      y[b, n]      = sum_g  scale(n, g) * part[b, n, g]  -  offset(n, g) * xsum[b, g]

  so each weight costs one unpack and one FMA; the f16 scale (and the Q4_K 6-bit sub-scale) is
  decoded once per group, and the Q4_K min term needs only the activation group sums.
* **GEMM** (prefill / encoder; symbolic M): compute-bound, so a tile of ``W`` is dequantized once
  (into registers/L2 on CPU, shared memory on GPU) and reused across many rows of ``x``.

Schedules (written here, except the CUDA GEMM and the 1..8-row GPU GEMVs):

* ``llvm``: GEMV splits K into 8-lane chunks and ``rfactor``s the lane axis so the inner loop is a
  vector FMA; rows are tiled 4 at a time (x chunk reused from registers) and the row tiles run
  ``parallel``.  GEMM dequantizes a 16-column panel of W over all of K once (it stays in L2), then
  runs a 4x16 register-blocked micro-kernel over every row tile of x.
* ``cuda``: GEMV gives each output row one warp; its 32 threads cover 8 groups x 4 chunks of 8
  elements, so each step reads 32 consecutive packed words and the matching activations, both
  coalesced (activations as 128-bit loads); steps are unrolled so several loads per thread are in
  flight, and the warp reduces with shuffles (TVM lowers the cross-thread reduction to
  ``__shfl_down_sync``); several rows per block on ``threadIdx.y``.  The nibble -> float
  conversion uses the exponent trick (``bits | 0x4B000000`` minus 2^23) instead of I2F,
  which runs at a quarter rate on NVIDIA.  (This schedule serves CUDA batches of 9..16 rows;
  1..8 rows run schedules/gpu_gemv.py.)  GEMM: the dequantization fused into the weight-tile load
  of dlight's Matmul rule, which uses tensor cores (WMMA) for float16; where the output's 128x128
  tiles leave SMs idle (up to a few hundred rows), K is split into slices run as a batch, then
  summed; above that the weight is dequantized into a float16 workspace first (cuda_gemm_plan).
* ``webgpu``: GEMVs of 1..8 rows (the decode step's one row, which the symbolic-row kernel
  dispatches to, and static batches) run schedules/gpu_gemv.py too, in its WebGPU form: the same
  layout, the lane groups' partial sums meeting in workgroup memory after one barrier instead of
  warp shuffles, at most 256 invocations per workgroup and 65535 workgroups a dimension (an odd
  row count past 65535, which has no such layout, keeps the TE schedule).  9..16 rows keep the CUDA TE schedule's structure above with at most 256 invocations per workgroup, no
  subgroup operations (TVM reduces across threads through workgroup memory).  Both use f32
  arithmetic only, and the f16 scales decoded from their u32 words with integer ops +
  ``bitcast<f32>`` (schedules/float_bits.py; exact for normal and subnormal halves), so no
  ``shader-f16`` is needed (Chrome on NVIDIA has none) unless the activations are float16 (the
  vulkan/metal targets' q4f16, where native adapters offer it).  GEMM:
  a 64x64x16 tiled kernel, 256 invocations each owning 4x4 outputs, the W tile dequantized straight
  into padded workgroup memory; 16 deep so that it fits WebGPU's default 16 KiB of workgroup storage.

Entry point: :func:`make_kernel` (cached) returns the scheduled ``PrimFunc`` with parameters
``(x, qweight, scales, y)``; :func:`gemv_or_gemm` is the batch rule.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing

import tvm
from tvm import te, tirx

from schedules import gpu_gemv, int8_gemv
from schedules.float_bits import half_to_f32
from voxc.errors import VoxcError
from voxc.quant.formats import QType, kernel_layout_shapes

GROUP = 32                   # elements sharing one scale (Q4_K: one sub-block)
GPU_GEMV_CHUNK_ROWS = 4      # rows per GEMV pass above 2 (CUDA) or 1 (WebGPU) rows (4 measured on CUDA as fast per row as 8)
# More rows than this run the GEMM.  CUDA: a batched decode step at 16 / 32 / 64 streams took 11.0 /
# 19.6 / 17.1 ms on an H100 with 32 (bench/RESULTS.md, tenth run): each 4-row chunk reads the weights
# again (~0.54 ms a row), the split-K tensor-core GEMM costs about the same from 1 to 128 rows, so the
# two meet near 24.  WebGPU's 64x64 tiled GEMM is far slower, so its chunks go on to 32 rows.
GPU_GEMV_MAX_ROWS = {"cuda": 24, "webgpu": 32}
MAX_GEMV_BATCH = 16          # above this the weight reuse of GEMM tiles wins
TARGET_KINDS = ("llvm", "cuda", "webgpu")

F32 = "float32"
ROW_INDEX_DTYPE = {"llvm": "int64", "cuda": "int32", "webgpu": "int32"}
# Buffer offsets are computed in the index type: int32 for the static weight shapes on every target
# and for the row count on GPUs.  Static sizes are checked when a kernel is made; a symbolic row count
# is checked by the host before the kernel runs (see _guard_rows).
INT32_ELEMENTS = 2**31 - 1


def _u32(v: int):
    return tirx.const(v, "uint32")


def _f32(v: float):
    return tirx.const(v, F32)


def gemv_or_gemm(rows) -> str:
    """The batch rule: a static row count of at most 16 runs the GEMV kernel, anything else
    (a larger static count, or a symbolic one such as a prefill length) the GEMM kernel."""
    if isinstance(rows, int) and 1 <= rows <= MAX_GEMV_BATCH:
        return "gemv"
    return "gemm"


# ---- dequantization expressions ---------------------------------------------------------------

def _small_uint_to_f32(v, offset: int, target: str):
    """float(v) - offset for a uint32 ``v`` < 2^16.

    GPUs: the exponent trick, exact and two full-rate ops (int->float conversion is quarter rate
    on NVIDIA).  CPU: vcvtdq2ps is cheap, so convert then subtract in integers."""
    if target == "llvm":
        if offset:
            return tirx.Cast(F32, tirx.Cast("int32", v) - tirx.const(offset, "int32"))
        return tirx.Cast(F32, v)
    return tirx.reinterpret(F32, v | _u32(0x4B000000)) - _f32(float(2 ** 23 + offset))


class _Decoder:
    """TE expressions that read the kernel layout: raw level, group scale and group offset."""

    def __init__(self, qtype: QType, qweight: te.Tensor, scales: te.Tensor, target: str):
        self.qtype, self.qweight, self.scales, self.target = qtype, qweight, scales, target

    def raw(self, n, k):
        """The integer level as f32: Q4_0 q - 8, Q8_0 the int8, Q4_K q (0..15)."""
        if self.qtype is QType.Q8_0:
            byte = (self.qweight[n, k // 4] >> tirx.Cast("uint32", (k % 4) * 8)) & _u32(255)
            return _small_uint_to_f32(byte ^ _u32(128), 128, self.target)   # two's complement -> offset
        nibble = (self.qweight[n, k // 8] >> tirx.Cast("uint32", (k % 8) * 4)) & _u32(15)
        return _small_uint_to_f32(nibble, 8 if self.qtype is QType.Q4_0 else 0, self.target)

    def _q4k_byte(self, n, sb, b):
        """Byte ``b`` (0..11) of the packed 6-bit scales of super-block ``sb``."""
        word = self.scales[n, sb * 4 + 1 + b // 4]
        return (word >> tirx.Cast("uint32", (b % 4) * 8)) & _u32(255)

    def scale(self, n, g):
        if self.qtype is not QType.Q4_K:
            half = (self.scales[n, g // 2] >> tirx.Cast("uint32", (g % 2) * 16)) & _u32(0xFFFF)
            return half_to_f32(half, self.target)
        sb, j = g // 8, g % 8
        d = half_to_f32(self.scales[n, sb * 4] & _u32(0xFFFF), self.target)
        # ggml get_scale_min_k4; every byte index stays in 0..11 for both branches of the select.
        sc = tirx.Select(j < 4, self._q4k_byte(n, sb, j) & _u32(63),
                         (self._q4k_byte(n, sb, j + 4) & _u32(15)) | ((self._q4k_byte(n, sb, j % 4) >> _u32(6)) << _u32(4)))
        return d * tirx.Cast(F32, sc)

    def offset(self, n, g):
        """Q4_K only: dmin * m, subtracted from every element of the sub-block."""
        sb, j = g // 8, g % 8
        dmin = half_to_f32(self.scales[n, sb * 4] >> _u32(16), self.target)
        m = tirx.Select(j < 4, self._q4k_byte(n, sb, j + 4) & _u32(63),
                        (self._q4k_byte(n, sb, j + 4) >> _u32(4)) | ((self._q4k_byte(n, sb, j) >> _u32(6)) << _u32(4)))
        return dmin * tirx.Cast(F32, m)

    def value(self, n, k):
        """The dequantized weight, in the float32 operation order of ggml / gguf.quants."""
        g = k // GROUP
        if self.qtype is QType.Q4_K:
            return self.scale(n, g) * self.raw(n, k) - self.offset(n, g)
        if self.qtype is QType.Q4_0:
            return self.scale(n, g) * self.raw(n, k)
        return self.raw(n, k) * self.scale(n, g)


def _placeholders(qtype: QType, n: int, k: int, rows, dtype: str):
    shapes = kernel_layout_shapes(qtype, n, k)
    x = te.placeholder((rows, k), dtype, name="x")
    qweight = te.placeholder(shapes["qweight"], "uint32", name="qweight")
    scales = te.placeholder(shapes["scales"], "uint32", name="scales")
    return x, qweight, scales


def _with_output_cast(acc: te.Tensor, dtype: str):
    if dtype == F32:
        return acc
    return te.compute(acc.shape, lambda i, j: acc[i, j].astype(dtype), name="y_cast")


def gemv_compute(qtype: QType, n: int, k: int, batch: int, dtype: str, target: str, lanes: int,
                 chunked: bool = False) -> tirx.PrimFunc:
    """Unscheduled GEMV.  Each 32-element group is split into ``lanes`` partial dot products
    ``part[b, n, g, l]``; element ``s`` of lane ``l`` is ``32g + s*lanes + l`` (interleaved: the
    CPU's vector lanes) or, with ``chunked``, ``32g + l*(32/lanes) + s`` (contiguous chunks: on
    GPUs one thread owns one chunk, so a warp reads consecutive packed words and activations)."""
    x, qweight, scales = _placeholders(qtype, n, k, batch, dtype)
    dec = _Decoder(qtype, qweight, scales, target)
    groups, steps = k // GROUP, GROUP // lanes

    def element(g, l, s):
        return g * GROUP + (l * steps + s if chunked else s * lanes + l)

    raw = te.compute((n, k), lambda i, j: dec.raw(i, j), name="raw")
    s = te.reduce_axis((0, steps), name="s")
    part = te.compute(
        (batch, n, groups, lanes),
        lambda b, i, g, l: te.sum(x[b, element(g, l, s)].astype(F32) * raw[i, element(g, l, s)], axis=s),
        name="part")
    rg, rl = te.reduce_axis((0, groups), name="rg"), te.reduce_axis((0, lanes), name="rl")
    if qtype is QType.Q4_K:
        s2 = te.reduce_axis((0, steps), name="s2")
        xsum = te.compute((batch, groups, lanes),
                          lambda b, g, l: te.sum(x[b, element(g, l, s2)].astype(F32), axis=s2), name="xsum")
        acc = te.compute((batch, n), lambda b, i: te.sum(
            dec.scale(i, rg) * part[b, i, rg, rl] - dec.offset(i, rg) * xsum[b, rg, rl], axis=[rg, rl]), name="acc")
    else:
        acc = te.compute((batch, n), lambda b, i: te.sum(dec.scale(i, rg) * part[b, i, rg, rl], axis=[rg, rl]), name="acc")
    y = _with_output_cast(acc, dtype)
    return te.create_prim_func([x, qweight, scales, y])


def gemm_compute(qtype: QType, n: int, k: int, dtype: str, target: str, transposed_panel: bool) -> tirx.PrimFunc:
    """Unscheduled GEMM over a symbolic row count ``m``.  ``transposed_panel`` stores the
    dequantized weights as [k, n] (CPU: the micro-kernel vectorizes along n)."""
    # The row count is int64 like Relax shapes on CPU; GPU index math is int32 (int64 here trips
    # a type mismatch in TVM's lowering of the Q4_K scale selects).
    m = tirx.Var("m", ROW_INDEX_DTYPE[target])
    x, qweight, scales = _placeholders(qtype, n, k, m, dtype)
    dec = _Decoder(qtype, qweight, scales, target)
    r = te.reduce_axis((0, k), name="r")
    if transposed_panel:
        w = te.compute((k, n), lambda j, i: dec.value(i, j), name="w")
        acc = te.compute((m, n), lambda a, i: te.sum(x[a, r].astype(F32) * w[r, i], axis=r), name="acc")
    else:
        w = te.compute((n, k), lambda i, j: dec.value(i, j), name="w")
        acc = te.compute((m, n), lambda a, i: te.sum(x[a, r].astype(F32) * w[i, r], axis=r), name="acc")
    y = _with_output_cast(acc, dtype)
    return te.create_prim_func([x, qweight, scales, y])


# ---- schedules --------------------------------------------------------------------------------

def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:   # noqa: BLE001 - tvm raises a generic error for a missing block
        return False


def _schedule_gemv_llvm(func, qtype: QType, n: int, k: int, batch: int, rows_per_tile: int = 4):
    sch = tvm.s_tir.Schedule(func)
    acc, part, raw = sch.get_sblock("acc"), sch.get_sblock("part"), sch.get_sblock("raw")
    b, i, g, l = sch.get_loops(acc)
    io, ii = sch.split(i, [None, rows_per_tile])
    sch.reorder(io, g, ii, b, l)
    acc_rf = sch.rfactor(l, factor_axis=2)               # lanes become data-parallel: vector FMA
    io, g, ii, b, l = sch.get_loops(acc_rf)
    sch.compute_at(part, b)
    # Unpack a 4-row x 32 tile once for all batch rows.  (Inlining the unpack into the FMA loop
    # measured no faster at batch 1 on znver4.)
    sch.compute_at(raw, g)
    # One vector per packed word: a lane-dependent word index would turn the load into a gather.
    _, per_word = sch.split(sch.get_loops(raw)[-1], [None, qtype.elements_per_word])
    sch.vectorize(per_word)
    pl, ps = sch.get_loops(part)[-2:]
    sch.reorder(ps, pl)
    sch.vectorize(pl)
    sch.vectorize(l)
    sch.reverse_compute_at(acc, io)
    if _has_block(sch, "xsum"):
        xs = sch.get_sblock("xsum")
        xl, xsr = sch.get_loops(xs)[-2:]
        sch.reorder(xsr, xl)
        sch.vectorize(xl)
    if _has_block(sch, "y_cast"):
        sch.reverse_compute_at(sch.get_sblock("y_cast"), io)
    sch.parallel(io)
    sch.decompose_reduction(acc_rf, g)
    sch.decompose_reduction(part, ps)
    return sch


GPU_GEMV_LANES = 4            # threads per 32-element group: each owns 8 elements (1 Q4 / 2 Q8 words)
GPU_GEMV_UNROLL = 4           # warp iterations unrolled so their loads are in flight together


def _schedule_gemv_gpu(func, qtype: QType, n: int, k: int, batch: int, target: str):
    """One warp per output row, 32 threads = 8 groups x 4 lanes: at each step the warp reads 32
    consecutive packed words (8 groups, 128 B of Q4) and the 256 matching activations, both
    coalesced; steps are unrolled by 4 so that 4 loads per thread are in flight."""
    groups_per_step = 32 // GPU_GEMV_LANES
    # Rows per block must divide n: the final cross-thread reduction block is not predicated on
    # the row when TVM computes it under threadIdx.y, so a partial last block would write past
    # the row range.  (Every width in the model is a multiple of 4; odd n falls back to 1.)
    rows_per_block = next(r for r in ((4, 2, 1) if target == "cuda" else (2, 1)) if n % r == 0)
    sch = tvm.s_tir.Schedule(func)
    acc, part, raw = sch.get_sblock("acc"), sch.get_sblock("part"), sch.get_sblock("raw")
    b, i, g, l = sch.get_loops(acc)
    bx, ty = sch.split(i, [None, rows_per_block])
    go, gi = sch.split(g, [None, groups_per_step])
    sch.reorder(bx, ty, gi, l, go, b)
    tx = sch.fuse(gi, l)
    acc_rf = sch.rfactor(tx, factor_axis=1)
    bx, ty, tx, go = sch.get_loops(acc_rf)[:4]
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(acc_rf, 0, "local")
    go_o, go_u = sch.split(go, [None, GPU_GEMV_UNROLL])
    sch.decompose_reduction(acc_rf, go_o)

    sch.compute_at(part, go_u)
    sch.set_scope(part, 0, "local")
    sch.compute_at(raw, go_u)
    sch.set_scope(raw, 0, "local")
    words = sch.cache_read(raw, 0, "local")              # this thread's 1 (Q4) or 2 (Q8) words
    sch.compute_at(words, go_u)
    if qtype is QType.Q8_0:
        sch.vectorize(sch.get_loops(words)[-1])
    if _has_block(sch, "xsum"):
        xs = sch.get_sblock("xsum")
        sch.compute_at(xs, go_u)
        sch.set_scope(xs, 0, "local")
    if target == "cuda" and batch <= 8:
        # The 8 activations of each batch row as two 128-bit loads.
        x_local = sch.cache_read(part, 0, "local")
        sch.compute_at(x_local, go_u)
        _, xv = sch.split(sch.get_loops(x_local)[-1], [None, 4])
        sch.vectorize(xv)
    # Everything below the unrolled step is short: unroll it (batch rows, the 8 elements), so
    # per-row accumulators stay in registers (a loop index into a local array would not).
    for block in ("raw", "part", "xsum"):
        if _has_block(sch, block):
            for loop in sch.get_loops(sch.get_sblock(block))[5:]:
                sch.unroll(loop)
    for loop in sch.get_loops(acc_rf)[5:]:
        sch.unroll(loop)
    sch.unroll(go_u)

    sch.reverse_compute_at(acc, ty)
    # The final block's loops are (tx as a reduction, b); the reduction goes on threadIdx.x so
    # that TVM lowers it to a cross-thread (warp shuffle / workgroup memory) reduction.
    loops = sch.get_loops(acc)[2:]                       # below blockIdx.x, threadIdx.y
    red = loops[0]
    if len(loops) == 2:                                  # batch > 1 keeps its own loop
        sch.reorder(loops[1], red)            # (not unrolled: TVM's allreduce lowering rejects that)
    sch.bind(red, "threadIdx.x")
    if _has_block(sch, "y_cast"):
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(sch.get_sblock("y_cast"), ty)
    return sch


def _schedule_gemm_llvm(func, qtype: QType, n: int, k: int, panel: int = 16, rows_per_tile: int = 4):
    sch = tvm.s_tir.Schedule(func)
    acc, w = sch.get_sblock("acc"), sch.get_sblock("w")
    m, i, r = sch.get_loops(acc)
    io, ii = sch.split(i, [None, panel])
    mo, mi = sch.split(m, [None, rows_per_tile])
    sch.reorder(io, mo, r, mi, ii)
    sch.compute_at(w, io)                                # dequantize a [k, panel] slab once per panel
    wk, wn = sch.get_loops(w)[-2:]
    sch.vectorize(wn)
    acc_local = sch.cache_write(acc, 0, "local")        # 4x16 accumulators in registers
    sch.reverse_compute_at(acc_local, mo)
    sch.vectorize(sch.get_loops(acc_local)[-1])
    sch.vectorize(ii)
    sch.unroll(mi)
    if _has_block(sch, "y_cast"):
        sch.reverse_compute_inline(sch.get_sblock("y_cast"))
    sch.parallel(io)
    sch.decompose_reduction(acc, r)
    return sch


# K depth of the WebGPU GEMM's shared tiles.  WebGPU guarantees only 16 KiB of workgroup storage
# (maxComputeWorkgroupStorageSize), which padded 32-deep tiles (one group) exceed by 256 B: the tiles
# are 16 deep (8.25 KiB, the same bank spread), at the cost of twice the barriers per K step.
WEBGPU_GEMM_K_TILE = GROUP // 2


def _schedule_gemm_webgpu(func, qtype: QType, n: int, k: int):
    tile_m = tile_n = 64
    tile_k = WEBGPU_GEMM_K_TILE
    micro = 4                                            # 4x4 outputs per thread, 16x16 threads
    threads = tile_m // micro
    sch = tvm.s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    # Pad m (symbolic) and n up to whole tiles so every shared-memory tile has a constant size;
    # the padding blocks are inlined below, becoming predicates on the loads and the store.
    sch.pad_einsum(acc, [tile_m, tile_n, GROUP])
    x_pad, acc_pad = sch.get_sblock("x_pad"), sch.get_sblock("acc_pad")
    if _has_block(sch, "w_pad"):                         # n not a whole number of tiles
        sch.compute_inline(sch.get_sblock("w"))          # dequantize inside the padded W load
        w_tile = sch.get_sblock("w_pad")
    else:
        w_tile = sch.get_sblock("w")
    m, i, r = sch.get_loops(acc)
    # Each thread owns a 4x4 block of outputs.  (Interleaved ownership, ty + 16*mi, would make
    # the W-tile reads conflict-free, but the local accumulator's write-back then covers the
    # bounding box of the thread's outputs and overwrites its neighbours'.)
    by, ty, mi = sch.split(m, [None, threads, micro])
    bx, tx, ni = sch.split(i, [None, threads, micro])
    ko, ki = sch.split(r, [None, tile_k])
    sch.reorder(by, bx, ty, tx, ko, ki, mi, ni)
    sch.bind(by, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    acc_local = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(acc_local, tx)
    sch.reverse_compute_inline(acc_pad)

    def cooperative(block, vec: int, pad_rows: bool):
        # Shared scope first: compute_at then relaxes the region over the thread loops (one tile
        # per block, loaded by all 256 threads together).
        sch.set_scope(block, 0, "shared")
        sch.compute_at(block, ko)
        if pad_rows:
            # W tile rows of 33 (webgpu: 17) floats: threads 4 rows apart then hit banks 4 apart, so a
            # half-warp's reads conflict 2-way instead of 16-way.  (The x tile is read by at
            # most two distinct rows per warp, and keeps 128-bit aligned rows for its stores.)
            sch.storage_align(block, 0, axis=0, factor=tile_k, offset=1)
        fused = sch.fuse(*sch.get_loops(block)[-2:])
        _, t_y, t_x, v = sch.split(fused, [None, threads, threads, vec])
        sch.bind(t_y, "threadIdx.y")
        sch.bind(t_x, "threadIdx.x")
        if vec > 1:
            sch.vectorize(v)

    cooperative(x_pad, 1, pad_rows=False)
    cooperative(w_tile, 1, pad_rows=True)
    sch.unroll(ki)
    sch.unroll(mi)
    sch.unroll(ni)
    if _has_block(sch, "y_cast"):
        sch.reverse_compute_inline(sch.get_sblock("y_cast"))
    sch.decompose_reduction(acc, ko)
    return sch


# ---- public API -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelSpec:
    qtype: QType
    out_features: int
    in_features: int
    batch: int | None        # GEMV batch (1..16), or None for GEMM over a symbolic row count
    dtype: str = F32         # activation dtype (x and y); accumulation is always f32
    target: str = "llvm"     # "llvm" | "cuda" | "webgpu"
    dispatch_rows: bool = True  # GEMM: few rows run a GEMV (llvm: m <= 16, GPUs: m == 1; see row_dispatch)
    int8: str | None = None  # llvm GEMV: int8 activations with this integer dot product (schedules/int8_gemv.py ISAS)

    @property
    def kind(self) -> str:
        return "gemm" if self.batch is None else "gemv"

    @property
    def name(self) -> str:
        rows = f"b{self.batch}" if self.batch else "m"
        return (f"{self.kind}_{self.qtype.value}_{self.out_features}x{self.in_features}_{rows}_"
                f"{self.dtype}_{self.target}" + (f"_i8{self.int8}" if self.int8 else ""))


def _validate(spec: KernelSpec) -> KernelSpec:
    qtype = QType.parse(spec.qtype)
    if spec.target not in TARGET_KINDS:
        raise VoxcError(f"no dequant+matmul schedule for target {spec.target!r} (have {', '.join(TARGET_KINDS)})")
    if spec.dtype not in ("float32", "float16"):
        raise VoxcError(f"activation dtype must be float32 or float16, got {spec.dtype!r}")
    if spec.in_features % qtype.block_size:
        raise VoxcError(f"{qtype.value} needs in_features to be a multiple of {qtype.block_size}, "
                        f"got {spec.in_features}")
    if spec.int8 is not None and (spec.target != "llvm" or spec.int8 not in int8_gemv.ISAS):
        raise VoxcError(f"int8 activations are an llvm GEMV option with an ISA of {', '.join(int8_gemv.ISAS)}, "
                        f"got {spec.int8!r} on {spec.target}")
    if spec.batch is not None and not 1 <= spec.batch <= MAX_GEMV_BATCH:
        raise VoxcError(f"GEMV batch must be 1..{MAX_GEMV_BATCH}, got {spec.batch}")
    largest = max(math.prod(shape) for shape in kernel_layout_shapes(qtype, spec.out_features, spec.in_features).values())
    if largest > INT32_ELEMENTS or MAX_GEMV_BATCH * max(spec.out_features, spec.in_features) > INT32_ELEMENTS:
        raise VoxcError(f"a {spec.out_features}x{spec.in_features} {qtype.value} weight has {largest} packed words: "
                        f"the kernels index buffers in 32 bits (at most {INT32_ELEMENTS} elements)")
    return dataclasses.replace(spec, qtype=qtype)


def _guard_rows(func: tirx.PrimFunc, per_row: int, what: str) -> tirx.PrimFunc:
    """``func`` with a host-side check that its symbolic row count times ``per_row`` (the widest row
    of its inputs and output) fits the 32-bit indices of its buffers: a larger call fails with a
    ValueError before any kernel runs instead of reading and writing wrapped-around addresses."""
    rows = [v for v in _symbolic_vars(func) if v.ty.dtype == "int32"]
    if not rows:
        return func
    limit = INT32_ELEMENTS // per_row
    ok = tirx.Cast("int64", rows[0]) <= tirx.const(limit, "int64")
    message = f"{what}: at most {limit} rows per call ({per_row} elements a row, 32-bit indices)"
    check = tirx.AssertStmt(ok, tvm.ir.expr.StringImm("ValueError"), [tvm.ir.expr.StringImm(message)])
    return func.with_body(tirx.SeqStmt([check, func.body]))


@functools.lru_cache(maxsize=None)
def _make_kernel(spec: KernelSpec) -> tirx.PrimFunc:
    q, n, k = spec.qtype, spec.out_features, spec.in_features
    if spec.kind == "gemv" and spec.int8 and int8_gemv.available(q, k, spec.int8):
        return _finish(int8_gemv.int8_gemv(q, n, k, spec.batch, spec.dtype, spec.int8, name=spec.name), spec.name)
    if (spec.kind == "gemv" and spec.target in gpu_gemv.TARGETS and spec.batch <= gpu_gemv.MAX_ROWS
            and gpu_gemv.supports(q, n, k, spec.batch, spec.target)):
        return _finish(gpu_gemv.gpu_gemv(q, n, k, spec.batch, spec.dtype, target=spec.target), spec.name)
    if spec.kind == "gemv":
        if spec.target == "llvm":
            func = gemv_compute(q, n, k, spec.batch, spec.dtype, spec.target, lanes=8)
        else:
            func = gemv_compute(q, n, k, spec.batch, spec.dtype, spec.target, lanes=GPU_GEMV_LANES, chunked=True)
        sch = (_schedule_gemv_llvm(func, q, n, k, spec.batch) if spec.target == "llvm"
               else _schedule_gemv_gpu(func, q, n, k, spec.batch, spec.target))
    elif spec.target == "cuda":
        gemm = cuda_gemm_form(q, n, k, spec.dtype, cuda_gemm_plan(n, k, spec.dtype)[-1])
    else:
        func = gemm_compute(q, n, k, spec.dtype, spec.target, transposed_panel=spec.target == "llvm")
        sch = (_schedule_gemm_llvm(func, q, n, k) if spec.target == "llvm"
               else _schedule_gemm_webgpu(func, q, n, k))
        gemm = sch.mod["main"]
    if spec.kind == "gemm":
        if spec.dispatch_rows and spec.target == "llvm":
            rows = tirx.Var("m", ROW_INDEX_DTYPE[spec.target])
            gemv = gemv_compute(q, n, k, rows, spec.dtype, spec.target, lanes=8)
            small = _schedule_gemv_llvm(gemv, q, n, k, rows).mod["main"]
            return _finish(row_dispatch([(f"m <= {MAX_GEMV_BATCH}", small)], gemm), spec.name)
        if spec.dispatch_rows:
            # GPU GEMVs keep per-row accumulators in registers, so their batch is static.  A few rows
            # (a decode step of a few streams, one stream's 4-frame encoder step) go through static
            # kernels for 1 (and on CUDA 2) rows and, up to GPU_GEMV_MAX_ROWS, chunks of 4 rows that
            # mask the rows past m (each chunk reads the weights again); more rows, the GEMM (CUDA's
            # on tensor cores).  WebGPU ran 2..32 rows through its 64x64 tiled GEMM until the H100
            # runs showed it reading the encoder's 1280x5120 weight at 7 GB/s (20 workgroups) and a
            # two-stream decode step 11x slower than one stream (bench/RESULTS.md, seventh run).
            branches = [(f"m == {rows}", _make_kernel(dataclasses.replace(spec, batch=rows)))
                        for rows in ((1, 2) if spec.target == "cuda" else (1,))]
            if gpu_gemv.supports(q, n, k, GPU_GEMV_CHUNK_ROWS, spec.target):
                branches.append((f"m <= {GPU_GEMV_MAX_ROWS[spec.target]}",
                                 gpu_gemv.gpu_gemv(q, n, k, GPU_GEMV_CHUNK_ROWS, spec.dtype, symbolic_rows=True,
                                                   target=spec.target)))
            if spec.target == "cuda":   # the tensor-core forms for the row counts up to SPLIT_K_MAX_ROWS
                for form in cuda_gemm_plan(n, k, spec.dtype)[:-1]:
                    branches.append((f"m <= {form.rows}", cuda_gemm_form(q, n, k, spec.dtype, form)))
            func = row_dispatch(branches, gemm, gpu=True)
            return _finish(_guard_rows(func, max(n, k), spec.name), spec.name)
        return _finish(_guard_rows(gemm, max(n, k), spec.name), spec.name)
    return _finish(sch.mod["main"], spec.name)


# What dlight sizes its CUDA matmul tiles for when no cuda Target is current (any sm_80+ GPU).
_DLIGHT_CUDA_TARGET = {"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": 49152,
                       "max_threads_per_block": 1024, "thread_warp_size": 32, "registers_per_block": 65536}


def _dlight_matmul_cuda(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` (one matmul block and the elementwise blocks feeding it) scheduled by dlight's
    Matmul rule (the rule MLC-LLM's q4f16 prefill uses): tensor cores (WMMA) for float16 inputs."""
    import tvm.s_tir.dlight as dl

    current = tvm.target.Target.current(allow_none=True)
    target = current if current is not None and current.kind.name == "cuda" else tvm.target.Target(_DLIGHT_CUDA_TARGET)
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(
            tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    return mod["main"]


# dlight's tensor-core Matmul covers 128 rows x 128 columns per thread block and an H100 runs one
# such block per SM (132).  Measured on an H100 (bench/gemm_gpu.py, bench/RESULTS.md tenth run), a
# call costs about (waves of blocks) x (K per block), nearly whatever the row count up to 128 rows:
# the dequantizing tile loads, not the tensor cores or the memory, set the time of a block.
TENSOR_CORE_TILE = 128
CUDA_SMS = 132
SPLIT_K_BLOCK_COST = 256     # a block's fixed cost, in columns of K (fit: 130-550 across the shapes)
SPLIT_K_MAX_ROWS = 384       # above this, the weight dequantized first (a float16 workspace) wins
DEQUANTIZE_FIRST_MAX_ELEMENTS = 64 << 20    # its workspace at most 128 MiB (not the 805 MB LM head)
# cuBLAS on the dequantized workspace: 3-8x faster than dlight's WMMA forms from 64 to 1500 rows on an
# H100 (bench/RESULTS.md, tenth run: w2 3072x9216 at 256 rows 34 us against 149; the encoder's
# 5120x1280 at 1500 rows 32 against 111), but the dequantization costs a write and a read of the
# float16 weight (about 25 us for w2): up to CUBLAS_MIN_ROWS rows split-K stays.  The global
# function is targets/cuda_cublas.cc's, linked into every CUDA model.so.
CUBLAS_GEMM_NT = "voxc.cublas.gemm_nt"      # (x [m, k], w [n, k], y [m, n]): y = x @ w.T, float32 sums
CUBLAS_DTYPES = ("float16", "float32")
PACKED_CALLS_ATTR = "voxc_packed_calls"     # a kernel's global functions called from its host code
CUBLAS_MIN_ROWS = 128


def split_k_count(n: int, k: int, rows: int = TENSOR_CORE_TILE) -> int:
    """How many slices of K the tensor-core GEMM splits into for ``rows`` rows of an [n, k] weight:
    among whole numbers of 256-element super-blocks per slice, the count with the least waves x
    (K per slice + a block's fixed cost), the smallest such count on a tie (less workspace).
    At 64 rows w2 3072x9216 has 24 column tiles: 3 slices (72 blocks, one wave) take 98 us a call
    where 1 took 271 us; 6 slices (two waves of a sixth of K each) take the same as 3."""
    tiles = math.ceil(rows / TENSOR_CORE_TILE) * math.ceil(n / TENSOR_CORE_TILE)
    blocks = max(1, k // 256)
    counts = [splits for splits in range(1, blocks + 1) if blocks % splits == 0]
    return min(counts, key=lambda splits: (math.ceil(tiles * splits / CUDA_SMS) * (k / splits + SPLIT_K_BLOCK_COST),
                                           splits))


class GemmForm(typing.NamedTuple):
    """One form of a symbolic-row CUDA GEMM: used up to ``rows`` rows (None: every larger count).
    ``form``: "tiles" (the weight dequantized in dlight's tensor-core tile loads, K cut into ``splits``
    slices), "dequantize_first" (into a float16 workspace, then dlight's dense tensor-core matmul) or
    "cublas" (into the workspace, then cuBLAS: :data:`CUBLAS_GEMM_NT`)."""
    rows: int | None
    splits: int
    form: str


def cuda_gemm_plan(n: int, k: int, dtype: str = "float16", cublas: bool = True) -> list[GemmForm]:
    """The tensor-core GEMM forms a symbolic-row CUDA kernel of an [n, k] weight dispatches to, the
    last one (rows None) for every larger count.  Up to SPLIT_K_MAX_ROWS (or CUBLAS_MIN_ROWS where
    cuBLAS takes over): split-K forms per 128-row step (neighbours with the same count merged); above:
    the weight dequantized into a workspace first, then cuBLAS (``cublas`` and a dtype it takes), or
    dlight's dense matmul (1.3-1.6x faster than the tile-load form at 512-1500 rows on an H100: its
    tile loads are plain copies); the tile-load form where that workspace would be too big."""
    workspace_fits = n * k <= DEQUANTIZE_FIRST_MAX_ELEMENTS
    use_cublas = cublas and workspace_fits and dtype in CUBLAS_DTYPES
    last_split_rows = CUBLAS_MIN_ROWS if use_cublas else SPLIT_K_MAX_ROWS
    plan: list[GemmForm] = []
    for rows in range(TENSOR_CORE_TILE, last_split_rows + 1, TENSOR_CORE_TILE):
        splits = split_k_count(n, k, rows)
        if plan and plan[-1].splits == splits:
            plan[-1] = GemmForm(rows, splits, "tiles")
        else:
            plan.append(GemmForm(rows, splits, "tiles"))
    if use_cublas:
        plan.append(GemmForm(None, 1, "cublas"))
    elif workspace_fits:
        plan.append(GemmForm(None, 1, "dequantize_first"))
    else:
        plan[-1] = GemmForm(None, plan[-1].splits, "tiles")
    return plan


def tensor_core_gemm_cuda(qtype: QType, n: int, k: int, dtype: str, splits: int = 1,
                           dequantize_first: bool = False) -> tirx.PrimFunc:
    """CUDA GEMM over a symbolic row count on tensor cores (WMMA, float16 activations), scheduled by
    dlight's Matmul rule.  The SIMT 64x64 tile GEMM it replaced ran 10-25x behind cuBLAS fp16 at
    16-512 rows on an H100.

    The weight is dequantized in the load of each weight tile, or with ``dequantize_first`` by a
    kernel of its own into a float16 workspace [n, k] that the matmul then reads as a dense weight
    (it writes and reads twice a float16 model's weight bytes, but the matmul's tile loads are then
    plain copies instead of a dequantization each).  ``splits`` > 1 cuts K into that many slices,
    written as a batch of matmuls (dlight puts the slices on blockIdx.z) into a float32 workspace
    ``part[s, m, n]``, then one small kernel sums the slices and casts: more blocks where few rows
    leave most SMs idle."""
    if k % splits:
        raise VoxcError(f"split-K: {splits} slices do not divide in_features {k}")
    m = tirx.Var("m", "int32")
    x, qweight, scales = _placeholders(qtype, n, k, m, dtype)
    dec = _Decoder(qtype, qweight, scales, "cuda")
    weight = te.placeholder((n, k), dtype, name="w_dense") if dequantize_first else None

    def weight_at(i, j):
        return weight[i, j] if dequantize_first else dec.value(i, j).astype(dtype)

    width = k // splits
    if splits == 1:
        w = te.compute((n, k), weight_at, name="w")
        r = te.reduce_axis((0, k), name="r")
        out = _with_output_cast(te.compute((m, n), lambda a, i: te.sum(
            x[a, r].astype(F32) * w[i, r].astype(F32), axis=r), name="acc"), dtype)
    else:
        x_sliced = te.compute((splits, m, width), lambda s, a, j: x[a, s * width + j], name="x_sliced")
        w = te.compute((splits, n, width), lambda s, i, j: weight_at(i, s * width + j), name="w")
        r = te.reduce_axis((0, width), name="r")
        out = te.compute((splits, m, n), lambda s, a, i: te.sum(
            x_sliced[s, a, r].astype(F32) * w[s, i, r].astype(F32), axis=r), name="part")
    inputs = [weight, x] if dequantize_first else [x, qweight, scales]
    func = _dlight_matmul_cuda(te.create_prim_func([*inputs, out]))
    if splits > 1:
        part_in = te.placeholder((splits, m, n), F32, name="part")
        y = te.compute((m, n), lambda a, i: functools.reduce(
            lambda total, s: total + part_in[s, a, i], range(1, splits), part_in[0, a, i]).astype(dtype), name="y")
        func = _chain(func, _elementwise_cuda(te.create_prim_func([part_in, y]), "y"))
    return _dequantized_into_workspace(qtype, n, k, dtype, func) if dequantize_first else func


def cuda_gemm_form(qtype: QType, n: int, k: int, dtype: str, form: GemmForm) -> tirx.PrimFunc:
    """The PrimFunc ``(x, qweight, scales, y)`` of one form of :func:`cuda_gemm_plan`."""
    if form.form == "cublas":
        return cublas_gemm_cuda(qtype, n, k, dtype)
    return tensor_core_gemm_cuda(qtype, n, k, dtype, form.splits, form.form == "dequantize_first")


def cublas_gemm_cuda(qtype: QType, n: int, k: int, dtype: str, vector_store: bool = True) -> tirx.PrimFunc:
    """The weight dequantized into a workspace [n, k] of ``dtype``, then cuBLAS (``CUBLAS_GEMM_NT``, on
    TVM's current stream, float32 sums): ``(x [m, k], qweight, scales, y [m, n])`` for a symbolic ``m``.
    The call is made by the host between the dequantization's launch and the next kernel's."""
    m = tirx.Var("m", "int32")
    x = te.placeholder((m, k), dtype, name="x")
    weight = te.placeholder((n, k), dtype, name="w_dense")
    # plain buffers (te.extern's default ones have a symbolic element offset, which the merged row
    # dispatch would give ``x`` and so break the other forms' aligned vector loads of it)
    buffers = [tirx.decl_buffer(t.shape, dtype, t.op.name) for t in (x, weight)]
    y = te.extern((m, n), [x, weight],
                  lambda ins, outs: tirx.call_packed(CUBLAS_GEMM_NT, ins[0], ins[1], outs[0]),
                  name="y", dtype=dtype, in_buffers=buffers, out_buffers=[tirx.decl_buffer((m, n), dtype, "y")])
    func = _dequantized_into_workspace(qtype, n, k, dtype, te.create_prim_func([weight, x, y]), vector_store)
    # what a target links and the runtime loads (targets.cuda.packed_calls; row_dispatch keeps the
    # attributes of its default form, which this one is where the plan has it)
    return func.with_attr(PACKED_CALLS_ATTR, [CUBLAS_GEMM_NT])


def _dequantized_into_workspace(qtype: QType, n: int, k: int, dtype: str, consumer: tirx.PrimFunc,
                                vector_store: bool = True) -> tirx.PrimFunc:
    """``consumer`` (which reads a dense weight ``w_dense`` [n, k]) after a kernel that dequantizes
    ``qweight`` and ``scales`` into that workspace: ``(x, qweight, scales, y)``; ``vector_store`` as
    :func:`_elementwise_cuda` (16-byte stores; False: the fourteenth run's 2-byte ones, for the bench)."""
    _, qweight, scales = _placeholders(qtype, n, k, tirx.Var("m", "int32"), dtype)
    dec = _Decoder(qtype, qweight, scales, "cuda")
    dense = te.compute((n, k), lambda i, j: dec.value(i, j).astype(dtype), name="w_dense")
    lanes = 128 // tvm.DataType(dtype).bits    # one 16-byte store a thread
    producer = _elementwise_cuda(te.create_prim_func([qweight, scales, dense]), "w_dense", vector=lanes,
                                 vector_store=vector_store)
    return _chain(producer, consumer, order=("x", "qweight", "scales"))


def _elementwise_cuda(func: tirx.PrimFunc, block: str, vector: int = 1, vector_store: bool = False) -> tirx.PrimFunc:
    """An elementwise PrimFunc on CUDA: 256 threads a block, ``vector`` consecutive elements a thread.
    ``vector_store``: the thread's elements are computed into registers, then written with one vector
    store (16 bytes for 8 halves) instead of one 2-byte store each: a warp's scalar stores, 16 bytes
    apart, each fill a quarter of the sectors they touch.  (The dequantization into cuBLAS's workspace
    wrote at about 1.1 TB/s on an H100, a third of a copy: bench/RESULTS.md, fourteenth run.)"""
    sch = tvm.s_tir.Schedule(func)
    computed = sch.get_sblock(block)
    loops = sch.get_loops(computed)
    if vector > 1:
        loops = [*loops[:-1], *sch.split(loops[-1], [None, vector])]
        sch.unroll(loops[-1])
    outer, inner = sch.split(sch.fuse(*loops[:-1] if vector > 1 else loops), [None, 256])
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.x")
    if vector_store and vector > 1:
        store = sch.cache_write(computed, 0, "local")
        sch.reverse_compute_at(store, inner)
        sch.vectorize(sch.get_loops(store)[-1])
    return sch.mod["main"]


def row_dispatch(branches, default: tirx.PrimFunc, *, gpu: bool = False) -> tirx.PrimFunc:
    """One PrimFunc over a symbolic row count ``m`` that runs the body of the first ``(condition,
    func)`` of ``branches`` whose condition (TVMScript text over ``m``, e.g. ``"m <= 16"``) holds, and
    ``default``'s otherwise.  The GEMM dequantizes whole weight tiles whatever ``m`` is, so a few rows
    (a decode step, one stream's encoder chunk) cost as much as hundreds (7 s for one row of the 4B
    decoder on 2 CPU cores); a GEMV reads each weight once per row tile instead.  A branch function
    has the parameters of ``default`` in the same order (renamed to ``default``'s names if they
    differ; its shapes may fix ``m``, e.g. a batch-1 GEMV under ``m == 1``).  Each body goes into its own block of one function, through TVMScript: TVM 0.27's
    Python API has no variable substitution to merge bodies directly.  On GPUs the condition is
    marked thread-invariant, so the host picks the kernel (as targets.cuda.small_m_dispatch)."""
    header, decls, params, default_body = _script_parts(default)

    def nested(body):
        return ["        " + line if line.strip() else line for line in body]

    source = header + decls
    for index, (condition, func) in enumerate(branches):
        _, _, branch_params, body = _script_parts(func)
        if len(branch_params) != len(params):
            raise VoxcError(f"row_dispatch: parameters {branch_params} do not match {params}")
        renames = {old: new for old, new in zip(branch_params, params) if old != new}
        if renames:      # same order, other names: the branch's body speaks of the default's buffers
            pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, renames)) + r")\b")
            body = [pattern.sub(lambda hit: renames[hit.group(1)], line) for line in body]
        test = f"T.tvm_thread_invariant({condition})" if gpu else condition
        source += [f"    {'if' if index == 0 else 'elif'} {test}:", f'        with T.sblock("rows_case_{index}"):']
        source += nested(body)
    source += ["    else:", '        with T.sblock("rows_default"):'] + nested(default_body)
    return _from_script(source, decls, default)


# A PrimFunc parameter as TVMScript prints it: ``name: T.Buffer((shape...), "dtype")``
_PARAM = re.compile(r'(\w+): (T\.Buffer\((?:[^()]|\([^()]*\))*\))')


def _script_parts(func: tirx.PrimFunc):
    """``func``'s TVMScript as (header lines, ``m = T.int32()`` declarations, parameter names,
    body lines without attributes and root-block comments)."""
    lines = [line for line in func.script().splitlines() if line and not line.startswith(("#", "m = "))]
    head = next(i for i, line in enumerate(lines) if line.startswith("def "))
    body = lines[head + 1:]
    decls = [line for line in body if re.fullmatch(r"    m = T\.int(32|64)\(\)", line)]
    body = [line for line in body if line not in decls
            and not line.strip().startswith(("T.func_attr", "# with T.sblock"))]
    params = [name for name, _ in _PARAM.findall(lines[head])]
    return lines[:head + 1], decls, params, body


def _from_script(source: list[str], decls: list[str], like: tirx.PrimFunc) -> tirx.PrimFunc:
    """Parse merged TVMScript lines into a PrimFunc with ``like``'s attributes."""
    import typing

    import tvm.script
    from tvm.script import tirx as T

    # int64 shape variables print as a module-level TypeVar, int32 ones as ``m = T.int32()`` in the body
    extra = {"T": T} if decls else {"T": T, "m": typing.TypeVar("m")}
    merged = tvm.script.from_source("\n".join(source), extra_vars=extra, s_tir=True)
    return merged.with_attrs(dict(like.attrs)) if like.attrs else merged


def _chain(producer: tirx.PrimFunc, consumer: tirx.PrimFunc, order: tuple[str, ...] = ()) -> tirx.PrimFunc:
    """One PrimFunc running ``producer`` then ``consumer``, where the producer's last parameter is
    a parameter of the consumer of the same name: that buffer becomes a global allocation of the
    merged function (on GPUs a workspace the host takes from TVM's pool per call) and the
    parameters are the producer's others, then the consumer's others, those named in ``order``
    first.  Through TVMScript, as :func:`row_dispatch`."""
    header, decls, _, producer_body = _script_parts(producer)
    consumer_header, consumer_decls, _, consumer_body = _script_parts(consumer)
    producer_params = _PARAM.findall(header[-1])
    consumer_params = _PARAM.findall(consumer_header[-1])
    via, via_type = producer_params[-1]
    if via not in [name for name, _ in consumer_params]:
        raise VoxcError(f"_chain: the producer writes {via!r}, the consumer reads "
                        f"{', '.join(name for name, _ in consumer_params)}")
    merged = producer_params[:-1] + [param for param in consumer_params if param[0] != via]
    merged.sort(key=lambda param: order.index(param[0]) if param[0] in order else len(order))
    params = ", ".join(f"{name}: {kind}" for name, kind in merged)
    signature = re.sub(r"\(.*\)(\s*(->.*)?:)$", lambda hit: f"({params}){hit.group(1)}", header[-1])
    allocation = via_type.replace("T.Buffer(", "T.sblock_alloc_buffer(", 1).replace('"m"', "m")
    decls = decls or consumer_decls
    source = header[:-1] + [signature] + decls + [f"    {via} = {allocation}"] + producer_body + consumer_body
    return _from_script(source, decls, producer)


def make_kernel(qtype: QType | str, out_features: int, in_features: int, batch: int | None,
                dtype: str = F32, target: str = "llvm", dispatch_rows: bool = True,
                int8: str | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(x [rows, in], qweight, scales, y [rows, out])``.

    ``batch`` = static row count 1..16 for the GEMV kernel, or None for the GEMM kernel whose row
    count ``m`` is symbolic.  ``target`` is a target kind name (``tvm.target.Target.kind.name``).
    ``int8`` (llvm): the static-batch GEMV quantizes its activations to int8 and uses this integer
    dot product (one of schedules.int8_gemv.ISAS; shapes it does not cover keep the float GEMV).
    """
    spec = _validate(KernelSpec(QType.parse(qtype), int(out_features), int(in_features),
                                None if batch is None else int(batch), dtype, target, dispatch_rows, int8))
    return _make_kernel(spec)


def embedding_compute(qtype: QType, vocab: int, dim: int, dtype: str, target: str) -> tirx.PrimFunc:
    """Gather + dequantize rows of a quantized table: ``y[t, j] = W[ids[t], j]`` for a symbolic
    token count ``t``.  Parameters ``(ids int32 [t], qweight, scales, y [t, dim])``."""
    t = tirx.Var("t", "int32")
    shapes = kernel_layout_shapes(qtype, vocab, dim)
    ids = te.placeholder((t,), "int32", name="ids")
    qweight = te.placeholder(shapes["qweight"], "uint32", name="qweight")
    scales = te.placeholder(shapes["scales"], "uint32", name="scales")
    dec = _Decoder(qtype, qweight, scales, target)
    # Out-of-range ids read row 0 instead of memory past the table (the sampler never emits one;
    # this only keeps a bad id from faulting the GPU).
    row = lambda i: tirx.Select(tirx.all(ids[i] >= 0, ids[i] < vocab), ids[i], 0)   # noqa: E731
    y = te.compute((t, dim), lambda i, j: dec.value(row(i), j).astype(dtype), name="rows")
    return te.create_prim_func([ids, qweight, scales, y])


def _schedule_embedding(func, qtype: QType, dim: int, target: str):
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("rows")
    tok, j = sch.get_loops(blk)
    if target == "llvm":
        jo, ji = sch.split(j, [None, qtype.elements_per_word])
        sch.vectorize(ji)
        sch.parallel(tok)
    else:
        jo, ji = sch.split(j, [None, 128 if target == "cuda" else 64])
        sch.bind(tok, "blockIdx.x")
        sch.bind(ji, "threadIdx.x")
    return sch


@functools.lru_cache(maxsize=None)
def _make_embedding_kernel(qtype: QType, vocab: int, dim: int, dtype: str, target: str) -> tirx.PrimFunc:
    func = embedding_compute(qtype, vocab, dim, dtype, target)
    sch = _schedule_embedding(func, qtype, dim, target)
    name = f"embed_{qtype.value}_{vocab}x{dim}_{dtype}_{target}"
    return _finish(_guard_rows(sch.mod["main"], dim, name), name)


def make_embedding_kernel(qtype: QType | str, vocab: int, dim: int, dtype: str = F32,
                          target: str = "llvm") -> tirx.PrimFunc:
    """Scheduled row gather + dequantize ``(ids int32 [t], qweight, scales, y [t, dim])``."""
    spec = _validate(KernelSpec(QType.parse(qtype), int(vocab), int(dim), 1, dtype, target))
    return _make_embedding_kernel(spec.qtype, spec.out_features, spec.in_features, spec.dtype, spec.target)


def _finish(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    # Scheduled by hand: dlight must leave it alone, and Relax must not fuse neighbours into it
    # (op_pattern 8 = opaque), which would discard the schedule.
    return func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8})


def target_kind(target) -> str:
    """Kernel family for a ``tvm.target.Target`` (or kind name)."""
    name = target if isinstance(target, str) else target.kind.name
    if name not in TARGET_KINDS:
        raise VoxcError(f"no dequant+matmul schedule for target kind {name!r} (have {', '.join(TARGET_KINDS)})")
    return name


def _symbolic_vars(func: tirx.PrimFunc) -> list:
    """The shape variables of a PrimFunc (here: GEMM's row count ``m``)."""
    out = []
    for buf in func.params:              # tirx params carry their buffer shape directly
        for dim in buf.shape:
            if isinstance(dim, tirx.Var) and all(not dim.same_as(v) for v in out):
                out.append(dim)
    return out


def thread_extents(func: tirx.PrimFunc, m: int | None = None) -> dict[str, int]:
    """Launch dimensions of a scheduled GPU kernel (``blockIdx.x`` ... ``threadIdx.z``), with the
    symbolic row count bound to ``m`` for GEMM kernels."""
    analyzer = tvm.sym.Analyzer()
    if m is not None:
        for var in _symbolic_vars(func):
            analyzer.bind(var, tirx.const(m, var.ty.dtype))
    found: dict[str, int] = {}

    def walk(node):
        if isinstance(node, tirx.For):
            if node.kind == tirx.ForKind.THREAD_BINDING:
                tag = node.thread_binding.thread_tag
                ext = analyzer.simplify(node.extent)
                if not isinstance(ext, tirx.IntImm):
                    raise VoxcError(f"thread extent {ext} of {tag} is symbolic: pass m")
                found[tag] = max(found.get(tag, 1), int(ext))
            walk(node.body)
        elif isinstance(node, tirx.SeqStmt):
            for child in node.seq:
                walk(child)
        elif isinstance(node, tvm.s_tir.SBlockRealize):
            walk(node.block)
        elif isinstance(node, tvm.s_tir.SBlock):
            walk(node.body)
            if node.init is not None:
                walk(node.init)
        elif isinstance(node, tirx.IfThenElse):
            walk(node.then_case)
            if node.else_case is not None:
                walk(node.else_case)
        elif hasattr(node, "body"):
            walk(node.body)

    walk(func.body)
    return found


def kernel_signature(cuda_source: str, name: str) -> list[str]:
    """Parameter names of ``name``'s ``__global__`` function in TVM's CUDA source, in order."""
    pat = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?" + re.escape(name) + r"\(([^)]*)\)")
    found = pat.search(cuda_source)
    if not found:
        raise VoxcError(f"kernel {name} not found in the CUDA source")
    return [p.strip().split()[-1].lstrip("*") for p in found.group(1).split(",") if p.strip()]
