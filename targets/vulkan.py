"""Vulkan: voxc's WebGPU kernels (WGSL) run natively through wgpu on a Vulkan driver.

Why not TVM's Vulkan backend: the apache-tvm wheels (linux x86_64 and macOS arm64 alike) are built
without USE_VULKAN, so there is no SPIR-V codegen (``target.build.vulkan`` is missing) and there is
no sdist to rebuild from.  The WebGPU codegen is there, and WGSL is portable: wgpu (Rust, the
engine behind wgpu-py and Firefox) and Dawn (Chrome's) both translate WGSL to SPIR-V and run it on
any Vulkan driver: lavapipe on a CPU-only machine (Mesa's software Vulkan, what the tests use),
NVIDIA/AMD/Intel drivers on real GPUs.  On an H100 a plain WGSL read kernel reached 1.7-2.0 TB/s
through wgpu-py and 2.5-2.8 TB/s through Dawn, against 3.0 TB/s for a CUDA copy
(shared/research/tvm_feasibility.md §7-8), so WGSL is a realistic route to native Vulkan speed.

Native Vulkan, unlike a browser, offers ``shader-f16`` (lavapipe and NVIDIA both do), so the f16
build of the model is usable here even where browsers are f32-only.

The whole model (``voxc build --target vulkan``): the WGSL kernels of the browser build with native
host code, run by TVM's *native* runtime, so the Relax VM, voxc's Python runtime (CompiledModel,
StreamingSession, batched decode, ``voxc serve``) work unchanged, as they do for CUDA:
  * the graph is the browser's (targets/webgpu.py: its kernels, passes and split token table) with
    the parameters as separate arguments, compiled with ``webgpu_target`` and an llvm host
    (x86_64/aarch64) instead of wasm32, and exported as a native ``model.so``;
  * a small C++ plugin (targets/wgpu_plugin/voxc_wgpu_device.cc, built at first use by
    targets/wgpu_toolchain.py, cached, and copied into the artifact) registers ``device_api.webgpu``
    (buffers, copies, sync on wgpu-native's C API: ``webgpu.h``/``wgpu.h`` and ``libwgpu_native``
    ship inside the wgpu wheel) and ``ffi.Module.load_from_bytes.webgpu`` (the same fmap/smap bytes
    the browser loads; kernels created and launched as tvmjs does, see below).  Launches are
    recorded into one command encoder and submitted together at each read-back;
  * voxc/runtime/wgpu_device.py loads wgpu-native and the plugin, opens the adapter and refuses,
    with one line, an adapter that lacks a feature the kernels need (shader-f16) or a buffer over
    its limits; then ``relax.VirtualMachine`` runs on ``tvm.device("webgpu")``.
``--dtype float16`` and quantized builds (q4f16 by default: float16 activations and caches) need
``shader-f16``, which native adapters offer (lavapipe and NVIDIA do), unlike most browsers.
tests/test_vulkan_model.py runs all of it on lavapipe against the llvm build.

Metal: ``--target metal`` is the same artifact built on a Mac (its host code and plugin are native
macOS code), with the plugin opening wgpu's Metal backend.  It has not been run on Apple hardware;
on Linux only its refusal to build is tested.

Not done: replaying a step's recorded dispatches (each launch still creates its bind group), and
measurements on a real GPU (issue 15: NVIDIA's Vulkan driver on the H100 against the CUDA build).

Single kernels (the first step, kept for tests/test_vulkan_wgpu.py): ``wgsl_kernels`` splits a
compiled WebGPU executable into per-kernel WGSL + TVM's launch metadata (``func_info``), and
``WgpuDevice.run`` runs one kernel through wgpu-py exactly as tvmjs's WebGPU runtime launches it
(same bind group layout: one storage buffer per handle argument, read-only unless
``paramWriteAccess`` says written, then a uniform ``PODArgs`` holding the scalar arguments followed
by ``packGridDimX``; blockIdx.x beyond 65535 folded into z), the grid supplied by the caller.

The alternative, running the browser bundle itself under Node with Dawn (npm ``webgpu``), needs
no C++ but a Node sidecar process, and Dawn rejects lavapipe (so CI could not test it here).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from targets.base import CompileReport, TargetSpec
from targets.webgpu import EMBEDDING_PART_BYTES, SMALL_M_TIERS, WEBGPU_DEFAULT_MAX_WORKGROUP
from voxc.artifact import WGPU_PLUGIN_FILE, host_platform
from voxc.errors import VoxcError
from voxc.model.graph import GraphOptions
from voxc.model.quantization import QuantPlan

NATIVE_HOST = {"kind": "llvm"}   # the building machine's CPU architecture (x86_64, aarch64)


@dataclasses.dataclass(frozen=True)
class VulkanTarget(TargetSpec):
    """WGSL kernels with native host code, run by TVM's runtime on the "webgpu" device that voxc's
    wgpu plugin provides (Vulkan on Linux/Windows; the same artifact built on a Mac runs on Metal)."""

    name: str = "vulkan"
    device_kind: str = "webgpu"    # TVM's device type: the plugin's WebGPU device API
    library_name: str = "model.so"
    model_dtype: str = "float32"
    # A quantized build runs float16 activations and caches (q4f16) where the adapter has shader-f16.
    quantized_dtype: str = "float16"
    mel_dtype: str = "float32"     # WGSL has no f64
    # Workgroups every WebGPU adapter allows (256 invocations); a known GPU could take more.
    max_workgroup_size: int = WEBGPU_DEFAULT_MAX_WORKGROUP
    # WebGPU's default binding limit (128 MiB, lavapipe's too): the token table is split into blocks.
    embedding_part_bytes: int = EMBEDDING_PART_BYTES
    small_m_tiers: tuple = SMALL_M_TIERS
    backend: str = "vulkan"        # the wgpu backend the plugin opens (voxc.runtime.wgpu_device)

    def tvm_target(self):
        from targets.webgpu import webgpu_target

        return webgpu_target(self.max_workgroup_size, host=NATIVE_HOST)

    def graph_options(self, quant: QuantPlan = QuantPlan()) -> GraphOptions:
        """The browser's graph (WebGPU's dequant+matmul kernels, the split token table) with the
        parameters as separate arguments, as the other native targets take them."""
        options = super().graph_options(quant)
        return dataclasses.replace(options, token_table_part_bytes=self.embedding_part_bytes,
                                   quant=dataclasses.replace(options.quant, kernel_target="webgpu"))

    def compile(self, mod, report: CompileReport | None = None):
        from targets.webgpu import compile_model_for_webgpu
        from targets.wgpu_toolchain import find_cxx, wgpu_resources

        self.check_host()
        find_cxx()   # a missing compiler or wgpu fails before the long compile, not at the link after it
        wgpu_resources()
        return compile_model_for_webgpu(mod, max_workgroup_size=self.max_workgroup_size,
                                        small_m_tiers=self.small_m_tiers, report=report, host=NATIVE_HOST)

    def export(self, executable, out_dir: Path) -> Path:
        from targets.wgpu_toolchain import find_cxx

        path = Path(out_dir) / self.library_name
        executable.export_library(str(path), cc=find_cxx())
        return path

    def package(self, out_dir: Path, *, executable, tokenizer_bytes: bytes, params, cfg,
                weights_written: bool) -> dict:
        """The device plugin beside the library; returns the manifest's ``wgpu`` section (what the
        adapter must offer, checked at load by voxc.runtime.wgpu_device)."""
        from targets.webgpu import kernel_report
        from targets.wgpu_toolchain import ensure_wgpu_plugin

        extras = super().package(out_dir, executable=executable, tokenizer_bytes=tokenizer_bytes, params=params,
                                 cfg=cfg, weights_written=weights_written)
        shutil.copy2(ensure_wgpu_plugin(), Path(out_dir) / WGPU_PLUGIN_FILE)
        report = kernel_report(executable)
        return {**extras, "wgpu": {"plugin": WGPU_PLUGIN_FILE, "backend": self.backend,
                                   "host_platform": host_platform(),
                                   "required_features": report["required_features"],
                                   "max_workgroup_size": report["max_workgroup_size"],
                                   "max_storage_buffers_per_kernel": report["max_storage_buffers_per_kernel"],
                                   "max_workgroup_storage_bytes": report["max_workgroup_storage_bytes"],
                                   "num_kernels": report["num_kernels"]}}


    def check_host(self) -> None:
        """The host code and the plugin are native code for the building machine, so an artifact runs
        where it was built; Metal exists on macOS only."""
        if self.backend == "metal" and sys.platform != "darwin":
            raise VoxcError("--target metal builds on the Mac that runs it (its host code and device plugin are "
                            "native macOS code); on Linux or Windows use --target vulkan")


TARGET = VulkanTarget()
METAL_TARGET = VulkanTarget(name="metal", backend="metal")

WGPU_HINT = "pip install wgpu==0.32.0 (and a Vulkan driver: apt-get install mesa-vulkan-drivers for lavapipe)"
_POD_DTYPES = {"int": np.int32, "uint": np.uint32, "float": np.float32}  # WGSL PODArgs are 32-bit
_FUNCTION_HEADER = re.compile(r"^// Function: (\S+)\n//-+\n", re.M)


@dataclasses.dataclass(frozen=True)
class WGSLKernel:
    """One TVM WebGPU kernel: its WGSL module and TVM's launch metadata (func_info)."""

    name: str
    source: str
    arg_types: tuple[str, ...]          # "handle" = a buffer; int*/uint*/float* = a scalar in PODArgs
    launch_tags: tuple[str, ...]        # blockIdx.* / threadIdx.* the launch arguments bind
    write_access: tuple[int, ...]       # per buffer argument: 1 if the kernel writes it

    @property
    def buffer_args(self) -> list[int]:
        return [i for i, t in enumerate(self.arg_types) if t == "handle"]

    @property
    def pod_args(self) -> list[int]:
        return [i for i, t in enumerate(self.arg_types) if t != "handle"]

    @property
    def workgroup_size(self) -> tuple[int, int, int]:
        m = re.search(r"@workgroup_size\((\d+)\s*,\s*(\d+)\s*,\s*(\d+)\)", self.source)
        return tuple(int(v) for v in m.groups()) if m else (1, 1, 1)

    @property
    def needs_f16(self) -> bool:
        return re.search(r"^\s*enable\s+f16\s*;", self.source, re.M) is not None


def wgsl_kernels(executable) -> dict[str, WGSLKernel]:
    """Per-kernel WGSL and launch metadata of a compiled WebGPU executable (or its device module)."""
    from targets.webgpu import webgpu_module

    dev = webgpu_module(executable)
    source = dev.inspect_source("wgsl")
    info = json.loads(dev.inspect_source("func_info"))
    # inspect_source concatenates the kernels' modules, each under a "// Function: name" header
    # (printed once more inside the module); group the text between headers by name.
    parts: dict[str, list[str]] = {}
    marks = list(_FUNCTION_HEADER.finditer(source))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(source)
        parts.setdefault(m.group(1), []).append(source[m.end():end])
    kernels = {}
    for name, finfo in info.items():
        if name not in parts:
            raise VoxcError(f"no WGSL found for kernel {name}")
        tags = [t for t in finfo["launch_param_tags"] if not t.startswith("paramWriteAccess:")]
        access = next((json.loads(t.split(":", 1)[1]) for t in finfo["launch_param_tags"]
                       if t.startswith("paramWriteAccess:")), [0] * finfo["arg_types"].count("handle"))
        kernels[name] = WGSLKernel(name, "".join(parts[name]), tuple(finfo["arg_types"]), tuple(tags),
                                   tuple(int(a) for a in access))
    return kernels


def _import_wgpu():
    try:
        import wgpu
    except ImportError as exc:
        raise VoxcError(f"the Vulkan target runs WGSL through wgpu-py: {WGPU_HINT}") from exc
    return wgpu


class WgpuDevice:
    """A wgpu device (Vulkan where available) that runs TVM WGSL kernels one dispatch at a time."""

    def __init__(self, power_preference: str = "high-performance"):
        wgpu = self.wgpu = _import_wgpu()
        adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        if adapter is None:
            raise VoxcError(f"wgpu found no GPU adapter (no Vulkan driver?); {WGPU_HINT}")
        self.adapter = adapter
        self.info = dict(adapter.info)
        self.features = set(adapter.features)
        self.has_f16 = "shader-f16" in self.features
        limits = adapter.limits
        wanted = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-invocations-per-workgroup",
                  "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
                  "max-compute-workgroup-storage-size", "max-storage-buffers-per-shader-stage")
        # Ask for everything the adapter offers: the defaults (128 MiB bindings, 256 invocations)
        # are far below what a model needs on a real GPU.
        self.device = adapter.request_device_sync(
            required_features=["shader-f16"] if self.has_f16 else [],
            required_limits={k: limits[k] for k in wanted if k in limits})
        self.limits = dict(self.device.limits)
        self._pipelines: dict[str, tuple] = {}

    def _pipeline(self, kernel: WGSLKernel):
        cached = self._pipelines.get(kernel.name)
        if cached is not None and cached[0] is kernel:
            return cached[1], cached[2]
        if kernel.needs_f16 and not self.has_f16:
            raise VoxcError(f"kernel {kernel.name} uses f16 but this adapter lacks shader-f16")
        wgpu = self.wgpu
        entries = [{"binding": b, "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": wgpu.BufferBindingType.storage if kernel.write_access[b]
                               else wgpu.BufferBindingType.read_only_storage}}
                   for b in range(len(kernel.buffer_args))]
        entries.append({"binding": len(kernel.buffer_args), "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": wgpu.BufferBindingType.uniform}})
        layout = self.device.create_bind_group_layout(entries=entries)
        module = self.device.create_shader_module(code=kernel.source)
        pipeline = self.device.create_compute_pipeline(
            layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": module, "entry_point": kernel.name})
        self._pipelines[kernel.name] = (kernel, pipeline, layout)
        return pipeline, layout

    def run(self, kernel: WGSLKernel, args, grid) -> list[np.ndarray]:
        """Run ``kernel`` once.  ``args`` follow ``kernel.arg_types``: numpy arrays for buffers
        (uploaded; their dtype must match the WGSL element type), numbers for scalars.  ``grid`` is
        the blockIdx extent per axis (x, y[, z=1]).  Returns the buffers the kernel writes, as
        arrays shaped like the inputs given for them."""
        wgpu = self.wgpu
        if len(args) != len(kernel.arg_types):
            raise VoxcError(f"{kernel.name} takes {len(kernel.arg_types)} arguments, got {len(args)}")
        gx, gy, gz = (tuple(int(g) for g in grid) + (1, 1))[:3]
        if gz != 1:
            raise VoxcError("blockIdx.z is reserved: TVM's WebGPU launches fold large x grids into z")
        pipeline, layout = self._pipeline(kernel)

        buffers, outputs = [], []
        for slot, i in enumerate(kernel.buffer_args):
            arr = np.ascontiguousarray(args[i])
            raw = arr.tobytes()
            raw += b"\0" * (-len(raw) % 4 if raw else 4)  # buffer sizes: non-zero multiples of 4
            buf = self.device.create_buffer_with_data(
                data=raw, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST)
            buffers.append(buf)
            if kernel.write_access[slot]:
                outputs.append((buf, arr))

        # blockIdx.x is limited to 65535 workgroups: halve it into z until it fits (as tvmjs does);
        # the shader skips the padding workgroups by comparing against packGridDimX.
        pack_x, wx, wz = gx, gx, 1
        while wx >= 1 << 16:
            wx, wz = (wx + 1) // 2, wz * 2
        pods = np.zeros(len(kernel.pod_args) + 1, dtype=np.uint32)
        for j, i in enumerate(kernel.pod_args):
            kind = re.match(r"[a-z]+", kernel.arg_types[i]).group(0)
            pods[j:j + 1] = np.array([args[i]], dtype=_POD_DTYPES[kind]).view(np.uint32)
        pods[-1] = pack_x
        raw = pods.tobytes() + b"\0" * (-pods.nbytes % 16)
        uniform = self.device.create_buffer_with_data(data=raw, usage=wgpu.BufferUsage.UNIFORM)

        bind_entries = [{"binding": b, "resource": {"buffer": buf, "offset": 0, "size": buf.size}}
                        for b, buf in enumerate(buffers)]
        bind_entries.append({"binding": len(buffers), "resource": {"buffer": uniform, "offset": 0, "size": uniform.size}})
        bind_group = self.device.create_bind_group(layout=layout, entries=bind_entries)
        encoder = self.device.create_command_encoder()
        cpass = encoder.begin_compute_pass()
        cpass.set_pipeline(pipeline)
        cpass.set_bind_group(0, bind_group)
        cpass.dispatch_workgroups(wx, gy, wz)
        cpass.end()
        self.device.queue.submit([encoder.finish()])
        results = []
        for buf, like in outputs:
            data = self.device.queue.read_buffer(buf)  # waits for the dispatch
            results.append(np.frombuffer(data, dtype=like.dtype, count=like.size).reshape(like.shape).copy())
        return results
