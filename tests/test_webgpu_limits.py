"""Every kernel of a full-size web bundle stays within WebGPU's default limits, checked on the host
(compile only: no browser, no emcc, no GPU).

An adapter must grant at least the defaults (maxComputeInvocationsPerWorkgroup 256,
maxComputeWorkgroupStorageSize 16 KiB, maxStorageBuffersPerShaderStage 8), and voxc.js refuses a
bundle whose manifest asks for more than the adapter offers; bundles within the defaults run on any
WebGPU device, laptops' integrated GPUs included.  The graph is the 4B model's (ModelConfig()),
compiled as ``voxc build --target webgpu`` compiles it (float32 and each weight quantization), and
targets.webgpu.kernel_report reads the limits off the generated WGSL, as the build does for the
manifest.
"""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from targets import webgpu  # noqa: E402

DEFAULT_INVOCATIONS = 256
DEFAULT_WORKGROUP_STORAGE = 16384
DEFAULT_STORAGE_BUFFERS = 8


def _full_size_report(quantization):
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph
    from voxc.model.quantization import QuantPlan

    target = webgpu.TARGET
    mod, _ = export_graph(ModelConfig(), target.graph_options(QuantPlan(quantization, {})))
    return webgpu.kernel_report(target.compile(mod))


@pytest.mark.parametrize("quantization", [None, "q4_k", "q8_0", "q4_0"], ids=lambda q: q or "float32")
def test_full_size_kernels_fit_webgpu_default_limits(quantization):
    report = _full_size_report(quantization)
    assert report["required_features"] == []
    assert report["max_workgroup_size"] <= DEFAULT_INVOCATIONS, report
    assert report["max_workgroup_storage_bytes"] <= DEFAULT_WORKGROUP_STORAGE, report
    assert report["max_storage_buffers_per_kernel"] <= DEFAULT_STORAGE_BUFFERS, report
    assert report["num_kernels"] > 50, report   # the whole graph, not a stub


def test_kernel_report_counts_workgroup_storage(monkeypatch):
    """The report's parser on a hand-written module: arrays of scalars and vectors, plain scalars,
    the largest kernel's sum (each kernel's module starts at its binding 0)."""
    wgsl = ("@group(0) @binding(0) var<storage, read_write> a : array<f32>;\n"
            "var<workgroup> s0 : array<f32, 2048>;\nvar<workgroup> s1 : array<vec4<f32>, 16>;\n"
            "var<workgroup> t : u32;\n@compute @workgroup_size(64, 2, 1)\nfn k0() {}\n"
            "@group(0) @binding(0) var<storage, read_write> b : array<f32>;\n"
            "var<workgroup> r : array<f16, 100>;\n@compute @workgroup_size(256, 1, 1)\nfn k1() {}\n")

    class Dev:
        def inspect_source(self, fmt):
            return wgsl if fmt == "wgsl" else '{"k0": {"arg_types": ["handle"]}, "k1": {"arg_types": ["handle"]}}'

    monkeypatch.setattr(webgpu, "webgpu_module", lambda _: Dev())
    report = webgpu.kernel_report(None)
    assert report["max_workgroup_storage_bytes"] == 2048 * 4 + 16 * 16 + 4
    assert report["max_workgroup_size"] == 256 and report["max_storage_buffers_per_kernel"] == 1


# The model's GEMV shapes (decoder: stacked q/k/v, stacked w1+w3, w2, wo, the LM head; encoder:
# stacked q/k/v, w1+w3, w2, wo) and small odd ones.
GEMV_SHAPES = [(6144, 3072), (18432, 3072), (3072, 9216), (3072, 4096), (131072, 3072),
               (6144, 1280), (10240, 1280), (1280, 5120), (1280, 2048), (100, 256), (7, 256), (36, 512)]
DEFAULT_WORKGROUPS_PER_DIMENSION = 65535


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q8_0"])
def test_webgpu_gemv_fits_default_limits(qtype):
    """schedules/gpu_gemv.py's WebGPU kernels (what make_kernel gives webgpu GEMVs of 1..8 rows) at
    the model's shapes: every row covered once, at most 256 invocations and 65535 workgroups a
    dimension (the 131072-row LM head included: several rows a workgroup), and their WGSL within 16
    KiB of workgroup storage and 8 storage buffers, without shader-f16."""
    import tvm

    from schedules import dequant_matmul as dm
    from schedules.gpu_gemv import WARP, gemv_layout

    funcs = {}
    for n, k in GEMV_SHAPES:
        for batch in (1, 2, 8):
            lay = gemv_layout(qtype, n, k, batch, target="webgpu")
            assert lay.blocks * lay.warps * (WARP // lay.lanes_per_row) * lay.rows_per_thread == n, (n, k, lay)
            func = dm.make_kernel(qtype, n, k, batch, "float32", "webgpu")
            assert "T.tvm_storage_sync" in func.script()          # gpu_gemv's, not the TE schedule
            ext = dm.thread_extents(func)
            assert ext["blockIdx.x"] == lay.blocks and ext["threadIdx.y"] == lay.warps, (n, k, batch, ext)
            assert ext["threadIdx.x"] * ext["threadIdx.y"] <= DEFAULT_INVOCATIONS
            assert max(ext.get(f"blockIdx.{a}", 1) for a in "xyz") <= DEFAULT_WORKGROUPS_PER_DIMENSION, (n, k, ext)
            funcs[func.attrs["global_symbol"]] = func
    ex = tvm.compile(tvm.IRModule(funcs), target=webgpu.webgpu_target(host={"kind": "llvm"}))
    report = webgpu.kernel_report(ex)
    assert report["num_kernels"] == len(funcs)
    assert report["required_features"] == []
    assert report["max_workgroup_size"] <= DEFAULT_INVOCATIONS, report
    assert report["max_workgroup_storage_bytes"] <= DEFAULT_WORKGROUP_STORAGE, report
    assert report["max_storage_buffers_per_kernel"] <= DEFAULT_STORAGE_BUFFERS, report


def test_webgpu_gemv_refuses_grids_past_the_workgroup_limit():
    """An odd row count past 65535 has no WebGPU layout within 65535 workgroups (one row each): the
    GEMV says so and make_kernel keeps the TE schedule for it; even ones get several rows a workgroup."""
    from schedules import dequant_matmul as dm
    from schedules import gpu_gemv
    from voxc.errors import VoxcError

    with pytest.raises(VoxcError, match="65535 workgroups"):
        gpu_gemv.gemv_layout("q8_0", 65537, 256, 1, target="webgpu")
    assert not gpu_gemv.supports("q8_0", 65537, 256, 1, "webgpu") and gpu_gemv.supports("q8_0", 65537, 256, 1, "cuda")
    assert "T.tvm_storage_sync" not in dm.make_kernel("q8_0", 65537, 256, 1, "float32", "webgpu").script()
    assert gpu_gemv.gemv_layout("q8_0", 65538, 256, 1, target="webgpu").blocks == 32769   # 2 rows a workgroup
