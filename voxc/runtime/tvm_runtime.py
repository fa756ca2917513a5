"""TVM's runtime without its compiler: load a compiled artifact and run its Relax VM.

A server or embedded device only needs ``libtvm_runtime*.so`` and ``tvm_ffi`` (about 31 MB)
instead of the 300 MB compiler, and ``import tvm.relax`` would pull the compiler in.  So this
module talks to the runtime only through ``tvm_ffi`` and the runtime's global functions, and
never imports ``tvm`` itself.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

from voxc.errors import VoxcError

# DLPack device type codes (dlpack.h)
DEVICE_TYPES = {"cpu": 1, "llvm": 1, "cuda": 2, "vulkan": 7, "metal": 8, "webgpu": 15}
_POOLED_ALLOCATOR = 2
_loaded_kinds: set[str] = set()


def _tvm_lib_dir() -> Path:
    override = os.environ.get("VOXC_TVM_LIB_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise VoxcError("the TVM runtime is not installed: pip install apache-tvm==0.27.0.post1")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def physical_cores(sys_root: str | Path = "/sys", cpus=None) -> int:
    """The CPU cores this process may run on, counting hyper-threads of one core once, capped by
    a cgroup CPU quota (a container given 2 CPUs of a 64-core host gets 2).

    ``cpus``: the logical CPUs allowed (default: the process's affinity mask).  Where the kernel
    does not say which logical CPUs share a core, each counts as one."""
    root = Path(sys_root)
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        try:
            die = (topology / "die_id").read_text().strip() if (topology / "die_id").exists() else ""
            cores.add(((topology / "physical_package_id").read_text().strip(), die, (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = max(1, len(cores))
    try:
        quota, period = (root / "fs" / "cgroup" / "cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


def default_cpu_threads() -> None:
    """TVM's CPU thread pool takes TVM_NUM_THREADS (or OMP_NUM_THREADS) when it starts, else half the
    logical CPUs on x86, assuming two hyper-threads per core: on a VM or container whose CPUs are
    cores, that leaves half of them idle (1 thread on 2 vCPUs: the decode step took 1.9x as long).
    Unless the user set either variable, it is set to the physical cores before any kernel runs."""
    if not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def load_runtime(device_kind: str = "cpu"):
    """dlopen the TVM runtime libraries a device needs (idempotent) and return ``tvm_ffi``."""
    import tvm_ffi

    default_cpu_threads()
    lib_dir = _tvm_lib_dir()
    wanted = ["libtvm_runtime.so", "libtvm_runtime_extra.so"]
    if device_kind == "cuda":
        _preload_cudart()
        wanted.append("libtvm_runtime_cuda.so")
    for name in wanted:
        if name in _loaded_kinds:
            continue
        path = lib_dir / name
        if not path.exists():
            if name == "libtvm_runtime_extra.so":
                continue
            raise VoxcError(f"TVM runtime library {path} is missing")
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            hint = ""
            if "libcuda" in str(exc):
                hint = " (no NVIDIA driver found: a cuda artifact needs a machine with an NVIDIA GPU)"
            elif "libcudart" in str(exc):
                hint = " (install the CUDA runtime: pip install nvidia-cuda-runtime-cu13, or the CUDA toolkit)"
            raise VoxcError(f"cannot load {name}: {exc}{hint}") from exc
        _loaded_kinds.add(name)
    return tvm_ffi


def _nvidia_library_candidates(sonames: tuple[str, ...], wheel_dirs: tuple[str, ...]) -> list[str]:
    """Where the CUDA toolkit or NVIDIA's pip wheels put a library: the plain sonames first (the
    loader's own search: LD_LIBRARY_PATH, ldconfig), then the toolkit's and the wheels' directories."""
    candidates = list(sonames)
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        candidates += [str(Path(root) / sub / name) for name in sonames for sub in ("lib64", "lib")]
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        candidates += [str(Path(base).parent / sub / name) for name in sonames for sub in wheel_dirs]
    return candidates


def _preload(kind: str, sonames: tuple[str, ...], wheel_dirs: tuple[str, ...]) -> bool:
    """dlopen the first loadable of ``sonames`` (RTLD_GLOBAL); True when one is loaded.  Once a library
    of that soname is loaded, the dynamic linker reuses it for a DT_NEEDED entry or a later dlopen by
    soname, so no LD_LIBRARY_PATH is needed."""
    if kind in _loaded_kinds:
        return True
    for candidate in _nvidia_library_candidates(sonames, wheel_dirs):
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded_kinds.add(kind)
        return True
    return False


def _preload_cudart() -> None:
    """libtvm_runtime_cuda.so needs libcudart.so.13; find it where the toolkit or pip put it (not
    found: loading libtvm_runtime_cuda.so reports it with a hint)."""
    _preload("libcudart", ("libcudart.so.13",), ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib"))


# Native libraries an artifact's kernels may call (its manifest's native_libraries): sonames in the
# order tried, the pip wheels' directories, and what to install.  cuBLAS: the CUDA build's large
# matmuls (targets/cuda_cublas.cc dlopens the same sonames, so it finds the one loaded here).
NATIVE_LIBRARIES = {
    "cublas": (("libcublas.so.13", "libcublas.so.12"), ("nvidia/cu13/lib", "nvidia/cublas/lib"),
               "pip install nvidia-cublas (or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)"),
}


def preload_native(names) -> None:
    """Load the native libraries an artifact's manifest lists, before its model.so runs; a missing one
    is a one-line error naming what to install."""
    for name in names:
        if name not in NATIVE_LIBRARIES:
            raise VoxcError(f"the artifact needs the native library {name!r}, which this voxc does not know "
                            f"(it knows {', '.join(NATIVE_LIBRARIES)}): upgrade voxc or rebuild the artifact")
        sonames, wheel_dirs, hint = NATIVE_LIBRARIES[name]
        if not _preload(name, sonames, wheel_dirs):
            raise VoxcError(f"the artifact calls {name} ({' or '.join(sonames)}), which was not found: {hint}")


def _check_cuda_device(ffi, device_id: int) -> None:
    try:
        count = int(ffi.get_global_func("runtime.GetCudaDeviceCount")())
    except Exception as exc:  # cudart answers "insufficient driver" / "no device" with an error
        raise VoxcError(f"no usable NVIDIA GPU: a cuda artifact needs a machine with an NVIDIA GPU and driver "
                        f"({str(exc).strip().splitlines()[-1]})") from None
    if count <= device_id:
        raise VoxcError(f"CUDA device {device_id} does not exist: this machine has {count} NVIDIA GPU(s)")


class Runtime:
    """A device plus the runtime functions voxc uses on it."""

    def __init__(self, device_kind: str, device_id: int = 0, name: str | None = None):
        """``name``: the device as messages call it (a Vulkan or Metal artifact runs TVM's webgpu
        runtime over wgpu, so its errors name vulkan, not webgpu)."""
        if device_kind not in DEVICE_TYPES:
            raise VoxcError(f"unknown device {device_kind!r}; choose one of {sorted(DEVICE_TYPES)}")
        ffi = load_runtime(device_kind)
        self.ffi = ffi
        self.kind = device_kind
        self._staging = {}      # (role, dtype) -> the device buffer :meth:`staged` reuses
        self.name = name or device_kind
        self.device = ffi.device(device_kind if device_kind != "llvm" else "cpu", device_id)
        self._alloc = ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._from_bytes = ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._to_bytes = ffi.get_global_func("runtime.TVMTensorCopyToBytes")
        self._copy = ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self._view = ffi.get_global_func("runtime.TVMTensorCreateView")
        if device_kind not in ("cpu", "llvm"):
            exists = ffi.get_global_func(f"device_api.{device_kind}", allow_missing=True)
            if exists is None:
                raise VoxcError(f"this TVM runtime has no {device_kind} support")
        if device_kind == "cuda":
            _check_cuda_device(ffi, device_id)

    # ---- tensors ----------------------------------------------------------------------------
    def empty(self, shape, dtype: str):
        shape = tuple(int(s) for s in shape)
        try:
            return self._alloc(self.ffi.Shape(shape), dtype, self.device, None)
        except Exception as exc:  # tvm_ffi raises its own error types (out of memory, over a device limit)
            message = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else repr(exc)
            raise VoxcError(f"cannot allocate a {dtype} tensor of shape {list(shape)} on {self.name}: "
                            f"{message}") from None

    def release_cached_memory(self) -> bool:
        """Give back to the driver the device memory the VMs' pooled allocator keeps for reuse: the freed
        intermediates of earlier steps, one set per batch shape seen, which a long-running model with
        many stream counts gathers (only free buffers go; tensors in use are untouched).  A captured
        CUDA graph that replays into such buffers must be dropped first (Model.release_cached_memory
        does).  False where this runtime has no such hook."""
        clear = self.ffi.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)
        if clear is None:
            return False
        clear()
        return True

    def tensor(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        out = self.empty(array.shape, _dtype_name(array.dtype))
        self.copy_into(out, array)
        return out

    def staged(self, role: str, array: np.ndarray):
        """``array`` on the device in the buffer kept for ``role`` (a call's input: PCM windows, tokens,
        slots, positions), as a view of its shape: where the device orders a host copy after the work
        already queued (CUDA's copies wait for it; the CPU runs calls as they come), every call of a
        role reuses one buffer, grown when an input outgrows it, instead of allocating a tensor that
        is freed when Python drops it (CUDA's cudaFree waits for the whole device: a stall in the middle
        of a batched step).  Elsewhere (wgpu, whose copies may overtake kernels not yet submitted) a
        fresh tensor, as :meth:`tensor`."""
        array = np.ascontiguousarray(array)
        if self.kind not in REUSED_INPUT_KINDS:
            return self.tensor(array)
        dtype = _dtype_name(array.dtype)
        buffer = self._staging.get((role, dtype))
        if buffer is None or int(buffer.shape[0]) < array.size:
            grown = max(array.size, 1, 2 * int(buffer.shape[0]) if buffer is not None else 0)
            buffer = self._staging[(role, dtype)] = self.empty((grown,), dtype)
        view = self.view(buffer, array.shape)
        self.copy_into(view, array)
        return view

    def copy_into(self, tensor, array: np.ndarray) -> None:
        """Host -> device copy into an existing tensor (or view) of the same size."""
        array = np.ascontiguousarray(array)
        self._from_bytes(tensor, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)

    def view(self, tensor, shape, byte_offset: int = 0):
        """A tensor of ``shape`` over ``tensor``'s memory from ``byte_offset`` (same dtype)."""
        return self._view(tensor, self.ffi.Shape(tuple(int(s) for s in shape)), tensor.dtype, int(byte_offset))

    def copy(self, src, dst) -> None:
        """Device copy of ``src`` into ``dst`` (tensors or views of the same size and dtype)."""
        self._copy(src, dst)

    def zeros(self, shape, dtype: str):
        return self.tensor(np.zeros(shape, dtype=_numpy_dtype(dtype)))

    def numpy(self, tensor) -> np.ndarray:
        out = np.empty(tuple(tensor.shape), dtype=_numpy_dtype(str(tensor.dtype)))
        self._to_bytes(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    # ---- modules ----------------------------------------------------------------------------
    def load_vm(self, library_path: Path):
        """Load an exported Relax executable and start its VM on this device."""
        try:
            lib = self.ffi.load_module(str(library_path))
        except Exception as exc:  # tvm_ffi raises its own error types
            raise VoxcError(f"cannot load compiled model {library_path}: {exc}") from exc
        vm = lib["vm_load_executable"]()
        init = [DEVICE_TYPES[self.kind], self.device.index, _POOLED_ALLOCATOR]
        if DEVICE_TYPES[self.kind] != DEVICE_TYPES["cpu"]:
            init += [DEVICE_TYPES["cpu"], 0, _POOLED_ALLOCATOR]
        vm["vm_initialization"](*init)
        return vm


# Device kinds whose host-to-device copies are ordered after the work already queued, so a call's
# input buffer may be rewritten for the next call at once (Runtime.staged).
REUSED_INPUT_KINDS = ("cuda", "cpu", "llvm")


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return "bfloat16" if name == "bfloat16" else name


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)
