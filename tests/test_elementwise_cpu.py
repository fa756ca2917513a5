"""schedules/elementwise_cpu.py: TVM-generated injective kernels run parallel on the CPU, with the same
results as TVM's single-threaded lowering; reductions, small kernels and voxc's own kernels are left
as they are."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, te, tirx  # noqa: E402

from schedules.elementwise_cpu import CHUNK, schedule_elementwise_llvm  # noqa: E402


def _split_silu_multiply(rows, width):
    """SwiGLU's elementwise part as TVM's fusion leaves it: split, SiLU and multiply as separate blocks."""
    x = te.placeholder((rows, 2 * width), "float32", name="x")
    gate = te.compute((rows, width), lambda i, j: x[i, j], name="gate")
    up = te.compute((rows, width), lambda i, j: x[i, j + width], name="up")
    silu = te.compute((rows, width), lambda i, j: gate[i, j] / (1 + tirx.exp(-gate[i, j])), name="silu")
    out = te.compute((rows, width), lambda i, j: silu[i, j] * up[i, j], name="out")
    return te.create_prim_func([x, out]).with_attr("global_symbol", "main")


def _run(func, *arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)]
    lib["main"](*args)
    return args[-1].numpy()


def _parallel_loops(func) -> int:
    return func.script().count("T.parallel(")


def test_a_fused_activation_runs_parallel_with_the_same_result():
    func = _split_silu_multiply(4, 5120)                  # the encoder's 4-frame SwiGLU
    scheduled = schedule_elementwise_llvm(func)
    assert scheduled is not None and _parallel_loops(scheduled) == 1 and _parallel_loops(func) == 0
    x = np.random.default_rng(0).standard_normal((4, 10240)).astype(np.float32)
    expected = x[:, :5120] / (1 + np.exp(-x[:, :5120])) * x[:, 5120:]
    np.testing.assert_allclose(_run(scheduled, x, out_shape=(4, 5120)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_run(scheduled, x, out_shape=(4, 5120)), _run(func, x, out_shape=(4, 5120)))


def test_a_symbolic_row_count_is_split_too():
    n = tirx.Var("n", "int64")   # a generic entry's row count
    func = _split_silu_multiply(n, 3072)
    scheduled = schedule_elementwise_llvm(func)
    assert scheduled is not None and _parallel_loops(scheduled) == 1
    for rows in (1, 3):                                   # fewer elements than a chunk, and not a multiple
        x = np.random.default_rng(rows).standard_normal((rows, 6144)).astype(np.float32)
        np.testing.assert_array_equal(_run(scheduled, x, out_shape=(rows, 3072)), _run(func, x, out_shape=(rows, 3072)))


def test_small_kernels_reductions_and_scheduled_kernels_are_left_alone():
    assert schedule_elementwise_llvm(_split_silu_multiply(1, CHUNK // 2)) is None

    x = te.placeholder((64, 4096), "float32", name="x")
    r = te.reduce_axis((0, 4096), name="r")
    total = te.compute((64,), lambda i: te.sum(x[i, r], axis=r), name="total")
    assert schedule_elementwise_llvm(te.create_prim_func([x, total])) is None

    once = schedule_elementwise_llvm(_split_silu_multiply(8, 4096))
    assert once is not None and schedule_elementwise_llvm(once) is None


def test_the_cpu_build_schedules_the_models_activations():
    """In the CPU target's lowering of the tiny model the SwiGLU gate and RoPE kernels come out parallel."""
    from targets.llvm import LlvmTarget, parallel_elementwise
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph

    target = LlvmTarget(mcpu=None)
    mod, _ = export_graph(ModelConfig.tiny(), target.graph_options())
    with target.tvm_target():
        mod = parallel_elementwise()(relax.transform.LegalizeOps()(mod))
    names = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and _parallel_loops(f)}
    assert any(n.startswith("swiglu_gate") for n in names), sorted(names)    # the FFN activation (silu x up)
    assert any(n.startswith("rope_q") for n in names), sorted(names)
