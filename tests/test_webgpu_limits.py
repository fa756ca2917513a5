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
