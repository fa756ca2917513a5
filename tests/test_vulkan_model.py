"""The whole model on Vulkan: ``voxc build --target vulkan`` of the tiny checkpoint, run natively by
voxc's Python runtime (CompiledModel / StreamingSession) through wgpu-native on lavapipe, against the
llvm build of the same checkpoint: greedy tokens equal and logits within tolerance, offline, streamed
in several chunkings and delays, and several streams decoded in one batch.  float16 and q4f16
(Q4_K weights, float16 activations) builds against the llvm build of the same dtype and weights.
Plus the clear errors: no Vulkan driver, an adapter without shader-f16, a buffer over the adapter's
limits, no C++ compiler, no wgpu, --target metal off macOS, an artifact of another platform.

The checkpoint is conftest's tiny one with encoder window 8 and decoder window 16, so both ring
caches wrap many times within a clip.  Needs a C++ compiler, ``pip install wgpu==0.32.0`` and a
Vulkan driver (``apt-get install mesa-vulkan-drivers`` gives lavapipe).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wgpu", reason="wgpu-py not installed (pip install wgpu==0.32.0)")

from clips import sine_with_noise  # noqa: E402
from references import run_ticks  # noqa: E402
from voxc import artifact  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HAVE_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler (apt-get install g++)")
MAX_STREAMS = 3
# |vulkan - llvm| over the largest |logit|: float32 kernels differ in summation order only; float16
# builds round activations and caches on both sides, at different points.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3}
# (samples per feed (0: the whole clip at once), delay ms)
CHUNKINGS = [(1280, 480), (2900, 480), (4000, 160), (517, 2400)]


def _build(ckpt, root: Path, target: str, **options) -> Path:
    from voxc.build import build

    name = "_".join([target, *(str(v) for v in options.values())])
    return build(ckpt, target, root / name, progress=False, **options)


@pytest.fixture(scope="module")
def models(tiny_ckpt_small_windows_dir, tmp_path_factory):
    """(vulkan model, llvm model) of the same checkpoint, float32, MAX_STREAMS slots each."""
    import voxc

    root = tmp_path_factory.mktemp("vulkan_model")
    vk = _build(tiny_ckpt_small_windows_dir, root, "vulkan")
    cpu = _build(tiny_ckpt_small_windows_dir, root, "llvm")
    try:
        gpu_model = voxc.load(vk, max_streams=MAX_STREAMS)
    except VoxcError as exc:
        if "no usable GPU adapter" in str(exc):
            pytest.skip(f"no Vulkan driver: {exc}")
        raise
    return gpu_model, voxc.load(cpu, max_streams=MAX_STREAMS)


@pytest.fixture(scope="module")
def clip():
    return sine_with_noise(2.3)


def stream(model, pcm: np.ndarray, chunk: int, delay_ms: int = 480):
    """Tokens and per-step logits of one stream fed ``chunk`` samples at a time (0: all at once)."""
    session = model.stream(delay_ms)
    session.record_logits = True
    step = chunk or len(pcm)
    for begin in range(0, len(pcm), step):
        session.feed(pcm[begin:begin + step])
    session.finish()
    return list(session.tokens), np.array(session.logits, np.float32)


def assert_same(got, want, dtype: str, what: str):
    (tokens, logits), (ref_tokens, ref_logits) = got, want
    assert tokens == ref_tokens, f"{what}: tokens differ from the llvm build's"
    assert logits.shape == ref_logits.shape
    err = float(np.abs(logits - ref_logits).max()) / float(np.abs(ref_logits).max())
    assert err <= TOLERANCE[dtype], f"{what}: logits differ by {err:.3g} of their range"


# ---- the artifact ---------------------------------------------------------------------------------
def test_artifact_holds_the_plugin_and_what_the_adapter_must_offer(models):
    model = models[0]
    manifest = model.manifest
    assert manifest["target"] == "vulkan" and manifest["device_kind"] == "webgpu"
    wgpu = manifest["wgpu"]
    assert wgpu["plugin"] == artifact.WGPU_PLUGIN_FILE and wgpu["plugin"] in manifest["files"]
    assert wgpu["backend"] == "vulkan" and wgpu["required_features"] == []   # float32: no shader-f16
    assert wgpu["max_workgroup_size"] <= 256 and wgpu["num_kernels"] > 20
    assert (model.artifact_dir / "model.so").read_bytes()[:4] == b"\x7fELF"   # native host code, not wasm
    assert model.rt.kind == "webgpu"


def test_allocation_failures_name_vulkan(models, monkeypatch):
    """TVM's webgpu runtime runs the artifact, but an allocation that fails says vulkan (a full-size
    build's caches that did not fit an H100 once said 'on webgpu')."""
    rt = models[0].rt

    def fail(*args):
        raise RuntimeError("wgpu: Out of memory\n  while allocating a buffer")

    monkeypatch.setattr(rt, "_alloc", fail)
    with pytest.raises(VoxcError, match=r"^cannot allocate a float16 tensor of shape \[2, 3\] on vulkan: "
                                        r"while allocating a buffer$"):
        rt.empty((2, 3), "float16")


# ---- float32 against the llvm build ---------------------------------------------------------------
def test_offline_matches_llvm(models, clip):
    gpu, cpu = models
    assert_same(stream(gpu, clip, 0), stream(cpu, clip, 0), "float32", "offline")
    assert gpu.transcribe(clip) == cpu.transcribe(clip)


@pytest.mark.parametrize("chunk,delay_ms", CHUNKINGS)
def test_streaming_matches_llvm(models, clip, chunk, delay_ms):
    gpu, cpu = models
    assert_same(stream(gpu, clip, chunk, delay_ms), stream(cpu, clip, chunk, delay_ms), "float32",
                f"chunks of {chunk}, delay {delay_ms} ms")


def test_batched_decode_matches_llvm(models):
    """A server's tick: every stream's chunk queued, then one batched encode and decode for all."""
    audios = [sine_with_noise(seconds=s, freq=f, seed=i) for i, (s, f) in enumerate([(2.0, 300), (3.1, 700),
                                                                                      (1.3, 450)])]
    results = []
    for model in models:
        sessions = run_ticks(model, audios)
        results.append([(list(s.tokens), np.array(s.logits, np.float32)) for s in sessions])
        for s in sessions:
            s.finish()
    assert max(len(tokens) for tokens, _ in results[1]) > 30
    for i, (got, want) in enumerate(zip(*results)):
        assert_same(got, want, "float32", f"batched stream {i}")


def test_kernels_are_submitted_in_batches(models, clip):
    """Launches are recorded and submitted together at each read-back, not one submit per kernel."""
    from voxc.runtime.wgpu_device import device_stats

    gpu = models[0]
    before = device_stats(gpu.rt.ffi)
    stream(gpu, clip, 0)
    after = device_stats(gpu.rt.ffi)
    dispatches, submits = after["dispatches"] - before["dispatches"], after["submits"] - before["submits"]
    assert dispatches > 10 * submits > 0


def test_copies_of_any_size_and_offset(models):
    """WebGPU copies move multiples of 4 bytes at offsets of 4; the device handles the rest (odd
    float16 counts, views at 2-byte offsets) by reading the surrounding words back."""
    rt = models[0].rt
    ffi = rt.ffi
    view = ffi.get_global_func("runtime.TVMTensorCreateView")
    copy = ffi.get_global_func("runtime.TVMTensorCopyFromTo")
    values = np.arange(7, dtype=np.float16) + 1
    t = rt.tensor(values)                                   # 14 bytes
    np.testing.assert_array_equal(rt.numpy(t), values)
    part = view(t, ffi.Shape((3,)), t.dtype, 2)            # elements 1..3, at byte offset 2
    np.testing.assert_array_equal(rt.numpy(part), values[1:4])
    rt.copy_into(part, np.array([-1, -2, -3], np.float16))
    np.testing.assert_array_equal(rt.numpy(t), [1, -1, -2, -3, 5, 6, 7])
    other = rt.tensor(np.zeros(7, np.float16))
    copy(t, other)                                          # device to device, 14 bytes
    np.testing.assert_array_equal(rt.numpy(other), [1, -1, -2, -3, 5, 6, 7])
    tail = view(other, ffi.Shape((3,)), other.dtype, 8)    # aligned start, 6 bytes
    copy(part, tail)                                        # device to device at odd offsets
    np.testing.assert_array_equal(rt.numpy(other), [1, -1, -2, -3, -1, -2, -3])


# ---- float16 and q4f16 against the llvm build of the same dtype ---------------------------------
@pytest.mark.parametrize("quantization", [None, "q4_k"], ids=["float16", "q4f16"])
def test_float16_builds_match_llvm(tiny_ckpt_small_windows_dir, tmp_path_factory, models, clip, quantization):
    import voxc

    root = tmp_path_factory.mktemp("vulkan_f16")
    options = {"dtype": "float16", **({"quantization": quantization} if quantization else {})}
    vk = _build(tiny_ckpt_small_windows_dir, root, "vulkan", **options)
    cpu = voxc.load(_build(tiny_ckpt_small_windows_dir, root, "llvm", **options))
    manifest = json.loads((vk / artifact.MANIFEST).read_text())
    assert manifest["model_dtype"] == "float16" and manifest["wgpu"]["required_features"] == ["shader-f16"]
    assert manifest["quantization"] == quantization
    gpu = voxc.load(vk)
    assert_same(stream(gpu, clip, 0), stream(cpu, clip, 0), "float16", f"{options} offline")
    assert_same(stream(gpu, clip, 1280), stream(cpu, clip, 1280), "float16", f"{options} streamed")


def test_quantized_builds_default_to_q4f16():
    from targets import get_target

    assert get_target("vulkan").quantized_dtype == "float16"


# ---- clear errors ---------------------------------------------------------------------------------
def _load_in_subprocess(artifact_dir: Path, env: dict) -> str:
    code = ("import sys\nfrom voxc.runtime.model import CompiledModel\nfrom voxc.errors import VoxcError\n"
            "try:\n    CompiledModel.load(sys.argv[1])\nexcept VoxcError as e:\n    print('VOXCERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(artifact_dir)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("VOXCERROR")]
    assert len(lines) == 1, out.stdout[-2000:] + out.stderr[-2000:]
    return lines[0]


def test_no_vulkan_driver_is_a_clear_error(models):
    line = _load_in_subprocess(models[0].artifact_dir, {"VK_ICD_FILENAMES": "/nonexistent/icd.json"})
    assert "no usable GPU adapter" in line and "apt-get install mesa-vulkan-drivers" in line


def test_adapter_without_shader_f16_is_refused(models):
    """The check a float16 artifact meets on an adapter without shader-f16 (lavapipe has it: its real
    description, with the feature removed)."""
    from voxc.runtime.wgpu_device import check_adapter, describe_adapter

    gpu = models[0]
    adapter = describe_adapter(gpu.rt.ffi, "vulkan")
    assert "shader-f16" in adapter["features"]
    manifest = {**gpu.manifest, "model_dtype": "float16",
                "wgpu": {**gpu.manifest["wgpu"], "required_features": ["shader-f16"]}}
    check_adapter(adapter, manifest, 1)
    with pytest.raises(VoxcError, match="lacks shader-f16.*--dtype float32"):
        check_adapter({**adapter, "features": []}, manifest, 1)
    # the kernels' other needs, against a smaller adapter
    small = {"max_compute_invocations_per_workgroup": 128, "max_compute_workgroup_storage_size": 4096,
             "max_storage_buffers_per_shader_stage": 4}
    for limit, message in zip(small, ("workgroups of 256 invocations", "bytes of workgroup memory",
                                      "storage buffers")):
        with pytest.raises(VoxcError, match=message):
            check_adapter({**adapter, "limits": {**adapter["limits"], limit: small[limit]}}, manifest, 1)


def test_buffers_over_the_adapter_limits_are_refused(models):
    import voxc
    from voxc.runtime.wgpu_device import describe_adapter

    gpu = models[0]
    binding = describe_adapter(gpu.rt.ffi, "vulkan")["limits"]["max_storage_buffer_binding_size"]
    assert binding == 128 << 20   # lavapipe's (and WebGPU's default)
    # the largest state buffer: one layer's of a per-layer state (a KV cache)
    name, per_stream = max(((k, v["tensor_bytes_per_stream"]) for k, v in gpu.manifest["state"].items()),
                           key=lambda item: item[1])
    streams = binding // per_stream + 1
    with pytest.raises(VoxcError, match=rf"buffer {name} needs .* MiB, over the 128.0 MiB .*maxStorageBuffer"):
        voxc.load(gpu.artifact_dir, max_streams=streams)
    # and any allocation past the limit, checked by the device itself
    with pytest.raises(VoxcError, match="over this adapter's limit of 134217728 bytes"):
        gpu.rt.empty((binding // 4 + 1,), "float32")


def test_missing_cxx_compiler_is_a_clear_error(tiny_ckpt_small_windows_dir, tmp_path, monkeypatch):
    from voxc.build import build

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(VoxcError, match="no C\\+\\+ compiler was found; install a C\\+\\+ compiler: apt-get install g\\+\\+"):
        build(tiny_ckpt_small_windows_dir, "vulkan", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_wgpu_is_a_clear_error(monkeypatch):
    import importlib.util

    from targets import wgpu_toolchain
    from voxc.runtime import wgpu_device

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wgpu" else real(name, *a))
    monkeypatch.delenv("VOXC_WGPU_NATIVE", raising=False)
    with pytest.raises(VoxcError, match="pip install wgpu==0.32.0"):
        wgpu_toolchain.wgpu_resources()
    with pytest.raises(VoxcError, match="pip install wgpu==0.32.0"):
        wgpu_device.wgpu_native_library()


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal builds work on macOS")
def test_metal_target_builds_on_macos_only(tiny_ckpt_small_windows_dir, tmp_path):
    from targets import get_target
    from voxc.build import build

    metal = get_target("metal")
    assert metal.name == "metal" and metal.backend == "metal" and metal.device_kind == "webgpu"
    with pytest.raises(VoxcError, match="--target metal builds on the Mac that runs it"):
        build(tiny_ckpt_small_windows_dir, "metal", tmp_path / "out", progress=False)


def test_artifact_of_another_platform_is_refused(models, tmp_path):
    """An artifact's host code and plugin are native code: one built on a Mac is refused here."""
    copy = tmp_path / "mac"
    shutil.copytree(models[0].artifact_dir, copy)
    manifest = json.loads((copy / artifact.MANIFEST).read_text())
    manifest.pop("files")
    manifest["wgpu"]["host_platform"] = "darwin-arm64"
    artifact.write_manifest(copy, manifest)
    line = _load_in_subprocess(copy, {})
    assert "holds native code for darwin-arm64" in line and "voxc build --target vulkan" in line


def test_metal_artifact_needs_metal(models, tmp_path):
    """What the loader does with a metal artifact where there is no Metal: the artifact (a vulkan one
    relabelled, as --target metal builds only on a Mac) makes the plugin open wgpu's Metal backend,
    which Linux lacks, and the load fails with one line naming it."""
    copy = tmp_path / "metal"
    shutil.copytree(models[0].artifact_dir, copy)
    manifest = json.loads((copy / artifact.MANIFEST).read_text())
    manifest.pop("files")
    manifest["target"] = "metal"
    manifest["wgpu"]["backend"] = "metal"
    artifact.write_manifest(copy, manifest)
    line = _load_in_subprocess(copy, {})
    assert "no usable GPU adapter for this artifact: it needs Metal (a Mac)" in line and "metal adapter" in line
