"""The llvm target's dense GEMV schedule (schedules/dense_matmul.py) against numpy, for the shapes
fuse_transpose_matmul produces: 2-D and 3-D inputs, a few static rows, float32 and float16."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from schedules.dense_matmul import MAX_ROWS, schedule_gemv_llvm  # noqa: E402


def nt_matmul(lead, n, k, dtype):
    x = te.placeholder((*lead, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="w")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((*lead, n), lambda *i: te.sum(x[i[:-1] + (r,)].astype("float32") * w[i[-1], r].astype("float32"),
                                                   axis=r), name="NT_matmul")
    if dtype != "float32":
        acc = te.compute(acc.shape, lambda *i: acc[i].astype(dtype), name="NT_matmul_cast")
    return te.create_prim_func([x, w, acc])


@pytest.mark.parametrize("lead,n,k,dtype", [((1,), 64, 96, "float32"), ((1, 1), 40, 128, "float32"),
                                            ((1, 4), 32, 64, "float32"), ((3,), 24, 48, "float16")])
def test_dense_gemv_matches_numpy(lead, n, k, dtype):
    func = schedule_gemv_llvm(nt_matmul(lead, n, k, dtype))
    assert func is not None and func.attrs["tirx.is_scheduled"]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target("llvm"))
    rng = np.random.default_rng(n)
    x = rng.standard_normal((*lead, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    out = tvm.runtime.tensor(np.zeros((*lead, n), dtype))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    tol = 1e-3 if dtype == "float16" else 1e-5
    assert np.abs(out.numpy() - ref).max() <= tol * np.abs(ref).max()


def test_many_or_symbolic_rows_are_left_to_tvm():
    assert schedule_gemv_llvm(nt_matmul((MAX_ROWS + 1,), 64, 96, "float32")) is None
    assert schedule_gemv_llvm(nt_matmul((te.var("m"),), 64, 96, "float32")) is None
    assert schedule_gemv_llvm(nt_matmul((1,), 63, 96, "float32")) is None      # rows not a tile multiple
