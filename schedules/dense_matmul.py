"""Dense (float) matrix products for the CPU: the ``NT_matmul`` PrimFuncs of targets/passes.py
(``y[..., j] = sum_k x[..., k] * W[j, k]``, W as stored), for any number of input rows.

TVM's default llvm lowering leaves such a PrimFunc as written: one thread, and a float reduction
LLVM may not reorder into vectors.  Measured on this machine (2 vCPUs, AVX-512): a 1 x 3072 @
9216 x 3072 float32 product at 3.1 GB/s of weights (dlight's CPU GEMV rule: 3.3 GB/s), and a
128 x 1280 @ 5120 x 1280 one (an encoder chunk) at 2.1 GFLOP/s.  The schedule here:

* output columns (rows of W) are tiled ``rows_per_tile`` at a time, the tiles run ``parallel``;
* K is split into ``lanes``-wide chunks and the lane axis ``rfactor``-ed, so the inner loop is a
  vector multiply-add over consecutive weights of each W row, and the ``lanes`` partial sums are
  added once per output at the end;
* few static input rows (decode, one stream's encode: ``MAX_GEMV_ROWS``) are handled inside the
  K loop, so each weight is read once for all of them (GEMV); more rows, or a row count known only
  at run time, loop outside it, so the W tile (``rows_per_tile`` x K) stays in cache while every
  input row passes over it (GEMM).

Same shapes, same machine: 14 GB/s (4.5x) for the GEMV; 72 GFLOP/s (34x) for the encoder chunk.
"""
from __future__ import annotations

import tvm
from tvm import tirx

MAX_GEMV_ROWS = 16     # static input rows up to this count use the GEMV loop order


def static_rows(func: tirx.PrimFunc) -> int | None:
    """The number of input rows (product of the leading output dims) if static, else None."""
    out = func.params[-1]
    rows = 1
    for dim in list(out.shape)[:-1]:
        if not isinstance(dim, tirx.IntImm):
            return None
        rows *= int(dim)
    return rows


def schedule_nt_matmul_llvm(func: tirx.PrimFunc, rows_per_tile: int = 8, lanes: int = 16) -> tirx.PrimFunc | None:
    """The scheduled ``NT_matmul`` (and its ``NT_matmul_cast`` to a half dtype, if any), or None
    where the function is not one of fuse_transpose_matmul's dense NT matmuls or its sizes do not
    divide into the tiles."""
    sch = tvm.s_tir.Schedule(func)
    try:
        block = sch.get_sblock("NT_matmul")
    except Exception:  # noqa: BLE001 - not one of fuse_transpose_matmul's functions
        return None
    *spatial, j, r = sch.get_loops(block)
    n, k = sch.get(j).extent, sch.get(r).extent
    if not isinstance(n, tirx.IntImm) or not isinstance(k, tirx.IntImm) or int(n) % rows_per_tile or int(k) % lanes:
        return None
    rows = static_rows(func)
    gemv = rows is not None and rows <= MAX_GEMV_ROWS
    jo, ji = sch.split(j, [None, rows_per_tile])
    ro, rl = sch.split(r, [None, lanes])
    if gemv:
        sch.reorder(jo, ro, ji, *spatial, rl)
    else:
        sch.reorder(jo, *spatial, ro, ji, rl)
    partial = sch.rfactor(rl, factor_axis=len(spatial) + 1)
    loops = sch.get_loops(partial)
    sch.vectorize(loops[-1])
    sch.parallel(loops[0])
    # the final lane sums: per column tile (GEMV) or per input row of the tile (GEMM)
    outer = loops[0] if gemv else loops[len(spatial)]
    sch.reverse_compute_at(block, outer)
    try:
        cast = sch.get_sblock("NT_matmul_cast")
        sch.reverse_compute_at(cast, outer)
    except Exception:  # noqa: BLE001 - float32 output: no cast block
        pass
    sch.decompose_reduction(partial, loops[1] if gemv else loops[len(spatial) + 1])
    # scheduled by hand: dlight and FuseOps must leave it alone (op_pattern 8 = opaque)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
