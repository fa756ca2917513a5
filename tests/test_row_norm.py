"""schedules/row_norm.py: a residual add and the RMSNorm of its result in one kernel.

The portable TE form (what the CPU runs) against a float64 numpy reference at odd widths, with and
without the decoder's per-stream delay scale; the GPU form's launch for any width (a power-of-two
workgroup within the target's limit) and its WGSL/CUDA code generation. The GPU form runs against
the llvm build in tests/test_vulkan_model.py (lavapipe) and bench/device/tiny_check.py (an H100)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from schedules.row_norm import norm_threads, residual_rms_norm_gpu_func, residual_rms_norm_te


def _reference(x, r, w, eps, scale=None):
    s = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype)   # the stream is stored in x's dtype
    s64 = s.astype(np.float64)
    out = s64 / np.sqrt((s64 * s64).mean(-1, keepdims=True) + eps) * w.astype(np.float64)
    if scale is not None:
        out = out * scale
    return s, out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dim", [1, 20, 48, 1280])
@pytest.mark.parametrize("delayed", [False, True])
def test_te_form_matches_numpy(dtype, dim, delayed):
    rng = np.random.default_rng(dim)
    b, n, slots_n, rows, row, eps = 2, 3, 4, 5, 3, 1e-5
    x = rng.standard_normal((b, n, dim)).astype(dtype)
    r = rng.standard_normal((b, n, dim)).astype(dtype)
    w = rng.standard_normal(dim).astype(dtype)
    ring = rng.standard_normal((slots_n, rows, dim)).astype(dtype)
    slots = np.array([3, 1], np.int32)
    xt, rt = te.placeholder((b, n, dim), dtype, "x"), te.placeholder((b, n, dim), dtype, "r")
    wt, ringt = te.placeholder((dim,), dtype, "w"), te.placeholder((slots_n, rows, dim), dtype, "ring")
    st = te.placeholder((b,), "int32", "slots")
    summed, normed = residual_rms_norm_te(xt, rt, wt, eps, (ringt, st, row) if delayed else None)
    inputs = [xt, rt, wt] + ([ringt, st] if delayed else [])
    lib = tvm.compile(te.create_prim_func(inputs + [summed, normed]), target="llvm")
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros((b, n, dim), dtype), dev) for _ in range(2)]
    args = [x, r, w] + ([ring, slots] if delayed else [])
    lib(*[tvm.runtime.tensor(a, dev) for a in args], *outs)
    want_sum, want = _reference(x, r, w, eps, ring[slots, row][:, None, :].astype(np.float64) if delayed else None)
    np.testing.assert_array_equal(outs[0].numpy(), want_sum)
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(outs[1].numpy().astype(np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dim", [1, 20, 33, 48, 1280, 3072, 5000])
@pytest.mark.parametrize("max_threads", [64, 256, 1024])
def test_workgroup_is_a_power_of_two_within_the_limit(dim, max_threads):
    threads = norm_threads(dim, max_threads)
    assert threads & (threads - 1) == 0 and threads <= max_threads
    assert threads == min(32, max_threads) or threads * 4 <= dim   # wide rows only: 4+ columns a thread


@pytest.mark.parametrize("target", ["webgpu", "cuda"])
@pytest.mark.parametrize("dim,dtype,delay_row", [(20, "float32", None), (48, "float32", 7), (3072, "float16", 25),
                                                 (1280, "float16", None)])
def test_gpu_form_generates_code(target, dim, dtype, delay_row):
    from targets.gpu_pipeline import wgsl_tir_pipeline

    if target == "webgpu" and dtype == "float16":
        pytest.skip("the web bundle keeps float32 activations without shader-f16")
    func = residual_rms_norm_gpu_func(dim, 1e-6, dtype, delay_row, norm_threads(dim, 256))
    mod = tvm.IRModule({"k": func.with_attr("global_symbol", "k")})
    if target == "webgpu":
        ex = tvm.compile(mod, target=tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm"}),
                         tir_pipeline=wgsl_tir_pipeline())
        source = ex.mod.imports[0].inspect_source("wgsl")
        assert "workgroupBarrier" in source
        assert ("ring_ptr" in source) == (delay_row is not None)
    else:   # through nvcc as a build compiles (a kernel variable named like a CUDA type broke it once)
        import targets.cuda as tc
        try:
            tc.find_nvcc()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"no nvcc: {exc}")
        tc.prepare_toolchain()
        target_obj = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
        with target_obj, tc.fatbin_compiler(("sm_90",)):
            source = tvm.compile(mod, target=target_obj).mod.imports[0].inspect_source("")
        assert "__syncthreads" in source and f"__launch_bounds__({norm_threads(dim, 256)})" in source


def test_bad_workgroup_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        residual_rms_norm_gpu_func(64, 1e-5, "float32", None, threads=48)
