"""Dense (float) matrix-vector products for the CPU: the ``NT_matmul`` PrimFuncs of
targets/passes.py (``y[..., j] = sum_k x[..., k] * W[j, k]``, W as stored) with a few static rows.

TVM's default llvm lowering leaves such a PrimFunc as written: one thread, and a float reduction
LLVM may not reorder into vectors; a 1 x 3072 @ 9216 x 3072 float32 product ran at 3.1 GB/s of
weights on this machine (dlight's CPU GEMV rule: 3.3 GB/s).  The schedule here reads W once:

* output rows are tiled ``rows_per_tile`` at a time, the tiles run ``parallel``;
* K is split into ``lanes``-wide chunks and the lane axis ``rfactor``-ed, so the inner loop is a
  vector multiply-add over consecutive weights of each row, and the ``lanes`` partial sums are
  added once per output at the end;
* all (static, few) input rows are handled inside a tile, so each weight is read once for all.

Measured (same machine, same shape): 14 GB/s, 4.5x TVM's default; 4 input rows 11 GB/s.
"""
from __future__ import annotations

import tvm
from tvm import tirx

MAX_ROWS = 16          # above this many input rows the product is compute-bound: left to TVM


def static_rows(func: tirx.PrimFunc) -> int | None:
    """The number of input rows (product of the leading output dims) if static, else None."""
    out = func.params[-1]
    rows = 1
    for dim in list(out.shape)[:-1]:
        if not isinstance(dim, tirx.IntImm):
            return None
        rows *= int(dim)
    return rows


def schedule_gemv_llvm(func: tirx.PrimFunc, rows_per_tile: int = 8, lanes: int = 16) -> tirx.PrimFunc | None:
    """The scheduled ``NT_matmul`` (and its ``NT_matmul_cast`` to a half dtype, if any), or None
    where the function is not a dense NT matmul with at most MAX_ROWS static rows."""
    rows = static_rows(func)
    if rows is None or rows > MAX_ROWS:
        return None
    sch = tvm.s_tir.Schedule(func)
    try:
        block = sch.get_sblock("NT_matmul")
    except Exception:  # noqa: BLE001 - not one of fuse_transpose_matmul's functions
        return None
    *spatial, j, r = sch.get_loops(block)
    n, k = int(sch.get(j).extent), int(sch.get(r).extent)
    if n % rows_per_tile or k % lanes:
        return None
    jo, ji = sch.split(j, [None, rows_per_tile])
    ro, rl = sch.split(r, [None, lanes])
    sch.reorder(jo, ro, ji, *spatial, rl)
    partial = sch.rfactor(rl, factor_axis=len(spatial) + 1)
    loops = sch.get_loops(partial)
    sch.vectorize(loops[-1])
    sch.parallel(loops[0])
    sch.reverse_compute_at(block, loops[0])
    try:
        cast = sch.get_sblock("NT_matmul_cast")
        sch.reverse_compute_at(cast, loops[0])
    except Exception:  # noqa: BLE001 - float32 output: no cast block
        pass
    sch.decompose_reduction(partial, loops[1])
    # scheduled by hand: dlight and FuseOps must leave it alone (op_pattern 8 = opaque)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
