"""The native WebGPU device (vulkan and metal artifacts): wgpu-native plus voxc's device plugin.

A vulkan/metal artifact holds WGSL kernels and x86_64/arm64 host code; TVM's runtime runs it on a
"webgpu" device, which voxc's plugin (a small C++ library shipped inside the artifact, built by
targets/wgpu_toolchain.py) provides on top of wgpu-native: Vulkan on Linux and Windows, Metal on
macOS.  wgpu-native itself comes from the installed ``wgpu`` package (its wheel ships the library).

Everything that can be checked before the model allocates is checked here, each with a one-line
error: no adapter, an adapter without a feature the kernels need (shader-f16), buffers over the
adapter's limits (named).
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from voxc.artifact import host_platform
from voxc.errors import VoxcError
from voxc.runtime.tvm_runtime import load_runtime

WGPU_HINT = "pip install wgpu==0.32.0 (its wheel ships wgpu-native)"
DRIVER_HINTS = {
    "vulkan": "a Vulkan driver (NVIDIA/AMD/Intel; without a GPU, apt-get install mesa-vulkan-drivers gives lavapipe)",
    "metal": "Metal (a Mac)",
    "any": "a Vulkan driver or Metal",
}
_loaded: dict[str, str] = {}   # what was dlopened: "wgpu" -> path, "plugin" -> path


def wgpu_native_library() -> Path:
    """wgpu-native from the installed wgpu package (found without importing it), or $VOXC_WGPU_NATIVE."""
    override = os.environ.get("VOXC_WGPU_NATIVE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("wgpu")
    if spec is None or not spec.submodule_search_locations:
        raise VoxcError(f"a vulkan/metal artifact runs through wgpu-native, which is not installed; {WGPU_HINT}")
    resources = Path(list(spec.submodule_search_locations)[0]) / "resources"
    suffix = {"darwin": "dylib", "win32": "dll"}.get(sys.platform, "so")
    matches = sorted(resources.glob(f"*wgpu_native*.{suffix}"))
    if not matches:
        raise VoxcError(f"the installed wgpu package has no wgpu-native library in {resources}; {WGPU_HINT}")
    return matches[0]


def load_wgpu_device(plugin: Path):
    """dlopen wgpu-native and voxc's plugin (once per process; its static initializers register the
    "webgpu" device API and module loader with TVM's runtime); returns ``tvm_ffi``."""
    ffi = load_runtime("webgpu")
    if "plugin" in _loaded:
        if Path(_loaded["plugin"]).read_bytes() != Path(plugin).read_bytes():
            raise VoxcError(f"this process already loaded another wgpu device plugin ({_loaded['plugin']}); "
                            f"load {plugin.parent} in a new process")
        return ffi
    native = wgpu_native_library()
    try:
        ctypes.CDLL(str(native), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise VoxcError(f"cannot load wgpu-native ({native}): {exc}") from exc
    _loaded["wgpu"] = str(native)
    try:
        ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise VoxcError(f"cannot load the artifact's device plugin {plugin}: {exc}; rebuild the artifact on a "
                        f"machine like this one") from exc
    _loaded["plugin"] = str(plugin)
    return ffi


def describe_adapter(ffi, backend: str = "any") -> dict:
    """Open the adapter on ``backend`` (vulkan, metal or any; once per process) and return its
    name, backend, features and limits."""
    try:
        return json.loads(ffi.get_global_func("voxc.wgpu.describe")(backend))
    except Exception as exc:  # tvm_ffi raises its own error types; wgpu's messages span lines
        message = " ".join(str(exc).split()) or repr(exc)
        need = DRIVER_HINTS.get(backend, DRIVER_HINTS["any"])
        raise VoxcError(f"no usable GPU adapter for this artifact: it needs {need} ({message})") from None


def device_stats(ffi) -> dict:
    """Dispatches, submits and live buffers of the device so far (tests and benchmarks read them)."""
    return json.loads(ffi.get_global_func("voxc.wgpu.stats")())


def largest_buffers(manifest: dict, max_streams: int) -> list[tuple[str, int]]:
    """(name, bytes) of every weight and state buffer the model allocates, largest first (a per-layer
    state, a KV cache, is one buffer per layer: named once, with one layer's size)."""
    sizes = [(p["name"], math.prod(p["shape"]) * _itemsize(p["dtype"])) for p in manifest["params"]]
    sizes += [(name, int(s["tensor_bytes_per_stream"]) * max_streams) for name, s in manifest["state"].items()]
    return sorted(sizes, key=lambda item: -item[1])


def check_adapter(adapter: dict, manifest: dict, max_streams: int) -> None:
    """Refuse, with one line, an adapter that cannot run the artifact: a missing feature (shader-f16
    for float16 kernels) or a buffer over its binding or buffer limit (the kernels bind whole
    buffers, so maxStorageBufferBindingSize bounds every one)."""
    name = f"{adapter.get('device') or adapter.get('vendor')} ({adapter.get('backend')})"
    wgpu = manifest.get("wgpu", {})
    missing = [f for f in wgpu.get("required_features", []) if f not in adapter.get("features", [])]
    if missing:
        raise VoxcError(f"the GPU adapter {name} lacks {', '.join(missing)}, which this {manifest['model_dtype']} "
                        f"artifact's kernels need; rebuild it with --dtype float32")
    limits = adapter["limits"]
    limit = min(limits["max_storage_buffer_binding_size"], limits["max_buffer_size"])
    for buffer, nbytes in largest_buffers(manifest, max_streams):
        if nbytes <= limit:
            break
        raise VoxcError(f"buffer {buffer} needs {nbytes / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB the GPU "
                        f"adapter {name} allows in one buffer (maxStorageBufferBindingSize); use fewer streams, "
                        f"--dtype float16 or a quantized build")
    invocations = limits["max_compute_invocations_per_workgroup"]
    if wgpu.get("max_workgroup_size", 0) > invocations:
        raise VoxcError(f"the artifact's kernels use workgroups of {wgpu['max_workgroup_size']} invocations, over the "
                        f"{invocations} the GPU adapter {name} allows; rebuild it with a smaller workgroup size")
    storage = limits["max_compute_workgroup_storage_size"]
    if wgpu.get("max_workgroup_storage_bytes", 0) > storage:
        raise VoxcError(f"a kernel of the artifact uses {wgpu['max_workgroup_storage_bytes']} bytes of workgroup "
                        f"memory, over the {storage} the GPU adapter {name} allows")
    buffers = limits["max_storage_buffers_per_shader_stage"]
    if wgpu.get("max_storage_buffers_per_kernel", 0) > buffers:
        raise VoxcError(f"a kernel of the artifact binds {wgpu['max_storage_buffers_per_kernel']} storage buffers, "
                        f"over the {buffers} the GPU adapter {name} allows")


def open_wgpu_device(artifact_dir: Path, manifest: dict, max_streams: int) -> dict:
    """Load the artifact's plugin, open the adapter and check it can run the artifact; returns the
    adapter's description."""
    wgpu = manifest.get("wgpu", {})
    if not wgpu.get("plugin"):
        raise VoxcError(f"{artifact_dir} is a web bundle: serve it and open index.html in a browser")
    built_on = wgpu.get("host_platform")
    if built_on and built_on != host_platform():
        raise VoxcError(f"{artifact_dir} holds native code for {built_on}, and this machine is {host_platform()}; "
                        f"build it here (`voxc build --target {manifest['target']}`)")
    ffi = load_wgpu_device(artifact_dir / wgpu["plugin"])
    adapter = describe_adapter(ffi, wgpu.get("backend", "any"))
    check_adapter(adapter, manifest, max_streams)
    return adapter


def _itemsize(dtype: str) -> int:
    import numpy as np

    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
