"""The llvm target's dense matmul schedule (schedules/dense_matmul.py) against numpy, for the shapes
fuse_transpose_matmul produces: 2-D and 3-D inputs, few static rows (GEMV order), many or symbolic
rows (GEMM order), float32 and float16."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te, tirx  # noqa: E402

from schedules.dense_matmul import MAX_GEMV_ROWS, schedule_nt_matmul_llvm  # noqa: E402


def nt_matmul(lead, n, k, dtype):
    x = te.placeholder((*lead, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="w")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((*lead, n), lambda *i: te.sum(x[i[:-1] + (r,)].astype("float32") * w[i[-1], r].astype("float32"),
                                                   axis=r), name="NT_matmul")
    if dtype != "float32":
        acc = te.compute(acc.shape, lambda *i: acc[i].astype(dtype), name="NT_matmul_cast")
    return te.create_prim_func([x, w, acc])


ROWS = tirx.Var("m", "int64")


@pytest.mark.parametrize("lead,n,k,dtype,run_rows", [
    ((1,), 64, 96, "float32", None), ((1, 1), 40, 128, "float32", None), ((1, 4), 32, 64, "float32", None),
    ((3,), 24, 48, "float16", None),                                   # GEMV order
    ((MAX_GEMV_ROWS + 3,), 48, 64, "float32", None),                   # GEMM order, static
    ((ROWS,), 56, 80, "float32", 1), ((ROWS,), 56, 80, "float32", 37),  # GEMM order, symbolic
    ((ROWS,), 16, 32, "float16", 5)])
def test_dense_matmul_matches_numpy(lead, n, k, dtype, run_rows):
    func = schedule_nt_matmul_llvm(nt_matmul(lead, n, k, dtype))
    assert func is not None and func.attrs["tirx.is_scheduled"]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target("llvm"))
    shape = tuple(run_rows if isinstance(d, tirx.Var) else d for d in lead)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((*shape, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    out = tvm.runtime.tensor(np.zeros((*shape, n), dtype))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    tol = 1e-3 if dtype == "float16" else 1e-5
    assert np.abs(out.numpy() - ref).max() <= tol * np.abs(ref).max()


def test_shapes_that_do_not_tile_are_left_to_tvm():
    assert schedule_nt_matmul_llvm(nt_matmul((1,), 63, 96, "float32")) is None     # columns
    assert schedule_nt_matmul_llvm(nt_matmul((1,), 64, 90, "float32")) is None     # K


def test_llvm_target_schedules_the_model_matmuls():
    from targets import llvm
    from targets.passes import fuse_transpose_matmul
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph

    mod, _ = export_graph(ModelConfig.tiny(), llvm.TARGET.graph_options())
    out = llvm.schedule_dense_matmuls(fuse_transpose_matmul(mod))
    matmuls = {gv.name_hint: f for gv, f in out.functions_items() if gv.name_hint.startswith("NT_matmul")}
    scheduled = [name for name, f in matmuls.items() if f.attrs and f.attrs.get("tirx.is_scheduled")]
    assert matmuls and len(scheduled) >= len(matmuls) * 3 // 4   # all but shapes that do not tile
