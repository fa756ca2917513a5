"""targets/vulkan.py: TVM's WGSL kernels dispatched through wgpu (Vulkan; lavapipe on a CPU-only
machine), each checked against the llvm build of the same TIR function.

Every single-kernel TIR function of the toy module (RMSNorm, Linear, attention matmuls, softmax,
reshapes/transposes; dynamic ``seq``) runs in f32 and f16.  The grid a kernel is launched with is
computed by TVM's host code at run time; here it comes from the device IR's thread extents,
evaluated for the test's ``seq``.  Needs ``pip install wgpu==0.32.0`` and a Vulkan driver
(``apt-get install mesa-vulkan-drivers``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "web"))
import toy_model  # noqa: E402

pytest.importorskip("wgpu", reason="wgpu-py not installed (pip install wgpu==0.32.0)")

from targets import vulkan, webgpu  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402

SEQ = 7
NO_CSE = {"tirx.disable_cse_tir": True}  # keep kernel scalars as the function's shape vars


@pytest.fixture(scope="module")
def device():
    try:
        return vulkan.WgpuDevice()
    except VoxcError as exc:
        pytest.skip(f"no wgpu adapter: {exc}")


def _prim_funcs(mod, target):
    import tvm
    from tvm import relax, tirx

    with target:
        lowered = relax.get_default_pipeline(target)(mod)
    return {gv.name_hint: f for gv, f in lowered.functions.items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint != "shape_func"}


def _device_kernels(name, func, target):
    """(built module, {kernel name: (kernel params, blockIdx extents)}) for one scheduled PrimFunc."""
    import tvm
    from tvm import tirx
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.IRModule({name: func})
    with tvm.transform.PassContext(config=NO_CSE):
        built = tvm.tirx.build(mod, target=target)
        pipeline, _, _ = tvm.tirx.get_tir_pipeline("s_tir")
        with target:
            lowered = pipeline(tirx.transform.BindTarget(target)(mod))
    _, device_mods = split_host_device_mods(lowered)
    out = {}
    for dev_mod in device_mods.values():
        for gv, kfunc in dev_mod.functions.items():
            extents = {}
            _walk(kfunc.body, extents)
            grid = [extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
            out[gv.name_hint] = (list(kfunc.params), grid)
    return built, out


def _walk(stmt, extents):
    from tvm import tirx

    if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
        extents.setdefault(stmt.node.thread_tag, stmt.value)
    for field in ("body", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if isinstance(child, tirx.Stmt):
            _walk(child, extents)
    for child in getattr(stmt, "seq", None) or ():
        _walk(child, extents)


def _buffer(func, param):
    # PrimFunc parameters are Buffers in tirx (older TIR had Vars plus a buffer_map)
    return param if hasattr(param, "shape") else func.buffer_map[param]


def _concrete(expr, analyzer) -> int:
    return int(analyzer.simplify(expr)) if not isinstance(expr, int) else expr


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_wgsl_kernels_match_llvm(device, dtype):
    import tvm
    from tvm import tirx

    if dtype == "float16" and not device.has_f16:
        pytest.skip("adapter lacks shader-f16")
    mod, _ = toy_model.export(dtype)
    target = webgpu.webgpu_target().with_host(tvm.target.Target({"kind": "llvm"}))
    llvm = tvm.target.Target({"kind": "llvm"})
    gpu_funcs, cpu_funcs = _prim_funcs(mod, target), _prim_funcs(mod, llvm)
    assert set(gpu_funcs) == set(cpu_funcs)
    rng = np.random.default_rng(0)
    checked = []
    for name in sorted(gpu_funcs):
        built, launches = _device_kernels(name, gpu_funcs[name], target)
        kernels = vulkan.wgsl_kernels(built)
        assert set(kernels) == set(launches)
        if len(kernels) != 1:
            continue  # several kernels chain through intermediate buffers the host allocates
        (kname, kernel), = kernels.items()
        kparams, grid_exprs = launches[kname]
        assert len(kparams) == len(kernel.arg_types)

        # concrete shapes and random inputs for the llvm function's buffers, by buffer name
        cpu = cpu_funcs[name]
        analyzer = tvm.sym.Analyzer()
        shape_vars = {}
        buffers = [_buffer(cpu, p) for p in cpu.params]
        for buf in buffers:
            for dim in buf.shape:
                if isinstance(dim, tirx.Var):
                    shape_vars[dim.name] = dim
        for v in shape_vars.values():
            analyzer.bind(v, tirx.IntImm(str(v.ty), SEQ))
        arrays = {}
        for buf in buffers:
            shape = [_concrete(d, analyzer) for d in buf.shape]
            arrays[buf.name] = (rng.standard_normal(shape) * 0.5).astype(str(buf.dtype))
        tensors = [tvm.runtime.tensor(arrays[buf.name]) for buf in buffers]
        tvm.compile(cpu, target=llvm)(*tensors)
        want = {buf.name: t.numpy() for buf, t in zip(buffers, tensors)}

        outs = device.run(kernel, *_launch_args(kparams, kernel, grid_exprs, arrays, SEQ))
        written = [kparams[i].name.removesuffix("_ptr") for slot, i in enumerate(kernel.buffer_args)
                   if kernel.write_access[slot]]
        for out_name, got in zip(written, outs):
            ref = want[out_name].astype("float32")
            err = float(np.max(np.abs(got.astype("float32") - ref)))
            tol = 1e-5 if dtype == "float32" else 2e-3 * max(1.0, float(np.max(np.abs(ref))))
            assert err <= tol, f"{name}/{kname} ({dtype}): max |wgpu - llvm| = {err:.3g}"
        checked.append(name)
    # the module's interesting kernels all ran: norm, projections, attention, softmax
    assert {"rms_norm", "softmax", "fused_matmul_add", "fused_matmul1_multiply", "matmul2"} <= set(checked), checked


def _launch_args(kparams, kernel, grid_exprs, arrays, size):
    """(arguments, grid) of a WGSL kernel: the arrays by buffer name (kernel params are <buffer>_ptr),
    ``size`` for every scalar (the one shape variable), the grid evaluated with it."""
    import tvm
    from tvm import tirx

    args = []
    analyzer = tvm.sym.Analyzer()
    for kp, ktype in zip(kparams, kernel.arg_types):
        if ktype == "handle":
            args.append(arrays[kp.name.removesuffix("_ptr")])
        else:
            args.append(size)
            analyzer.bind(kp, tirx.IntImm(str(kp.ty), size))
    return args, [_concrete(g, analyzer) for g in grid_exprs]


def test_wgsl_kernels_of_a_compiled_executable():
    mod, _ = toy_model.export()
    ex = webgpu.compile_for_webgpu(mod)
    kernels = vulkan.wgsl_kernels(ex)
    assert len(kernels) == webgpu.shader_info(ex)["num_kernels"]
    for k in kernels.values():
        assert f"fn {k.name}(" in k.source and k.source.count("@compute") == 1
        assert len(k.write_access) == len(k.buffer_args) and any(k.write_access)
        assert all(t.startswith(("blockIdx.", "threadIdx.")) for t in k.launch_tags)
        assert not k.needs_f16


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 31])
def test_gemv_with_clamped_padding_matches_numpy(device, rows):
    """targets.gpu_pipeline.clamp_padded_rows on the stem's first convolution as the web bundle runs
    it (rows x 384 columns: 3 taps x 128 mel bins, times the weight; dlight's LowBatchGEMV with 16-row
    buckets, a K loop of 3 passes): no guarded load is left (SwiftShader's compile time doubles with
    each branch in a loop), and the real rows are right whether the last bucket is full or not."""
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from targets.gpu_pipeline import clamp_padded_rows

    k_cols, n_out = 384, 64
    m = tirx.Var("m", "int64")
    cols = te.placeholder((1, m, k_cols), "float32", name="cols")
    weight = te.placeholder((n_out, k_cols), "float32", name="weight")
    k = te.reduce_axis((0, k_cols), name="k")
    out = te.compute((1, m, n_out), lambda b, i, j: te.sum(cols[b, i, k] * weight[j, k], axis=k), name="out")
    target = webgpu.webgpu_target().with_host(tvm.target.Target({"kind": "llvm"}))
    with target:
        gemv = dl.gpu.LowBatchGEMV(16).apply(te.create_prim_func([cols, weight, out]), target, False).mod["main"]
    assert "if_then_else" in gemv.script()
    clamped = clamp_padded_rows(gemv)
    assert "if_then_else" not in clamped.script()

    built, launches = _device_kernels("gemv", clamped.with_attr("global_symbol", "gemv"), target)
    (name, kernel), = vulkan.wgsl_kernels(built).items()
    assert "condval" not in kernel.source   # TVM's WGSL for a guarded load: `var condval; if (...)`
    kparams, grid_exprs = launches[name]
    rng = np.random.default_rng(rows)
    arrays = {"cols": rng.standard_normal((1, rows, k_cols)).astype("float32"),
              "weight": rng.standard_normal((n_out, k_cols)).astype("float32"),
              "out": np.full((1, rows, n_out), np.nan, "float32")}
    got, = device.run(kernel, *_launch_args(kparams, kernel, grid_exprs, arrays, rows))
    np.testing.assert_allclose(got, arrays["cols"] @ arrays["weight"].T, rtol=1e-5, atol=1e-4)
