"""targets/cuda_cublas.cc without a GPU: the shim compiles, links without libcublas/libcudart, registers
``voxc.cublas.gemm_nt``, validates its arguments with clear messages (CPU tensors reach every check:
the device is checked last), fails cleanly when no libcublas is installed, survives being loaded from
several libraries, and declares the same constants as the real cuBLAS / CUDA headers.
What the GEMM computes is checked on a GPU (bench/device)."""
from __future__ import annotations

import ctypes
import glob
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

tvm_ffi = pytest.importorskip("tvm_ffi")

from targets.cuda import CUBLAS_SHIM_SOURCE, compile_cublas_shim  # noqa: E402

FN = "voxc.cublas.gemm_nt"
NO_CUBLAS = ("voxc's CUDA build calls cuBLAS for its large matmuls, and no libcublas (.so.13/.so.12) could "
             "be loaded: pip install nvidia-cublas (or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
pytestmark = needs_gxx

KDLCPU, KDLCUDA = 1, 2
KDLFLOAT, KDLBFLOAT = 2, 4


def _link(obj: Path, so: Path) -> Path:
    subprocess.run(["g++", "-shared", str(obj), "-o", str(so)], check=True, capture_output=True, text=True)
    return so


@pytest.fixture(scope="module")
def shim_so(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cublas_shim")
    return _link(compile_cublas_shim(out), out / "libvoxc_cublas_shim.so")


@pytest.fixture(scope="module")
def gemm(shim_so):
    ctypes.CDLL(str(shim_so), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi.get_global_func(FN)


# ---- DLPack tensors with any device / dtype, without a GPU --------------------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_CAPSULE_NAME = b"dltensor"
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_keep_alive: list = []   # the structs (and buffers) fake tensors point into live as long as the module


def fake_tensor(shape, *, device_type=KDLCPU, device_id=0, code=KDLFLOAT, bits=16, strides=None):
    """A tvm_ffi tensor over a small host buffer, claiming any device, dtype and strides (by default
    null strides, what TVM's own tensors carry).  Nothing here ever reads its data."""
    buf = (ctypes.c_uint8 * 64)()
    shape_arr = (ctypes.c_int64 * len(shape))(*shape)
    strides_arr = (ctypes.c_int64 * len(shape))(*strides) if strides is not None else None
    mt = _DLManagedTensor()
    mt.dl_tensor = _DLTensor(ctypes.cast(buf, ctypes.c_void_p), _DLDevice(device_type, device_id), len(shape),
                             _DLDataType(code, bits, 1), shape_arr, strides_arr, 0)
    _keep_alive.extend([buf, shape_arr, strides_arr, mt])
    return tvm_ffi.from_dlpack(_PyCapsule_New(ctypes.addressof(mt), _CAPSULE_NAME, None))


def cpu(shape, dtype="float16"):
    return tvm_ffi.from_dlpack(np.zeros(shape, dtype))


def cuda(shape, device_id=0, **kw):
    return fake_tensor(shape, device_type=KDLCUDA, device_id=device_id, **kw)


def _cublas_loadable() -> bool:
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


# ---- building ----------------------------------------------------------------------------------------
def test_links_without_cublas_or_cudart(shim_so):
    needed = subprocess.run(["readelf", "-d", str(shim_so)], check=True, capture_output=True, text=True).stdout
    libs = re.findall(r"\(NEEDED\).*\[(.+?)\]", needed)
    assert libs and not [lib for lib in libs if "cublas" in lib or "cudart" in lib or "libcuda" in lib], libs
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(shim_so)], check=True,
                               capture_output=True, text=True).stdout
    assert not re.search(r"\b(cublas|cuda)\w*", undefined), undefined   # all resolved with dlsym at run time


def test_compile_error_is_a_voxc_error(tmp_path, monkeypatch):
    from targets import cuda as tc
    from voxc.errors import VoxcError

    bad = tmp_path / "bad.cc"
    bad.write_text("int main() { return undeclared_thing; }\n")
    monkeypatch.setattr(tc, "CUBLAS_SHIM_SOURCE", bad)
    with pytest.raises(VoxcError, match=r"bad.cc.*error.*undeclared_thing") as e:
        tc.compile_cublas_shim(tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(tc.shutil, "which", lambda name: None)
    with pytest.raises(VoxcError, match="needs g\\+\\+"):
        tc.compile_cublas_shim(tmp_path)


# ---- registration and validation ---------------------------------------------------------------------
def test_registered(gemm):
    assert gemm is not None and tvm_ffi.get_global_func(FN) is not None


@pytest.mark.parametrize("args, message", [
    (lambda: (cpu((2, 3, 4)), cpu((5, 4)), cpu((2, 5))), r"x must be 2-D, but has ndim 3 \(shape \[2, 3, 4\]\)"),
    (lambda: (cpu((2, 4)), cpu((5,)), cpu((2, 5))), r"w must be 2-D, but has ndim 1"),
    (lambda: (cpu((2, 4)), cpu((5, 4)), cpu((10,))), r"y must be 2-D, but has ndim 1"),
    (lambda: (cpu((2, 4)), cpu((5, 3)), cpu((2, 5))),
     r"shape mismatch: x \[2, 4\] and w \[5, 3\] must share the last dimension k"),
    (lambda: (cpu((2, 4)), cpu((5, 4)), cpu((5, 2))), r"shape mismatch: y is \[5, 2\], expected \[2, 5\]"),
    (lambda: (cpu((2, 4), "float64"), cpu((5, 4), "float64"), cpu((2, 5), "float64")),
     r"unsupported dtype float64 \(supported: float16, bfloat16, float32\)"),
    (lambda: (cpu((2, 4), "int32"), cpu((5, 4), "int32"), cpu((2, 5), "int32")), r"unsupported dtype int32"),
    (lambda: (cpu((2, 4)), cpu((5, 4), "float32"), cpu((2, 5))),
     r"dtype mismatch: x float16, w float32, y float16 \(all three must be the same\)"),
    (lambda: (cpu((2, 4), "float32"), cpu((5, 4), "float32"), cpu((2, 5), "float16")),
     r"dtype mismatch: x float32, w float32, y float16"),
    (lambda: (tvm_ffi.from_dlpack(np.zeros((4, 2), "float16").T), cpu((5, 4)), cpu((2, 5))),
     r"x must be row-major contiguous, but has strides \[1, 2\] for shape \[2, 4\]"),
    (lambda: (cpu((2, 4)), cpu((5, 4)), tvm_ffi.from_dlpack(np.zeros((2, 10), "float16")[:, :5])),
     r"y must be row-major contiguous, but has strides \[10, 1\] for shape \[2, 5\]"),
    (lambda: (fake_tensor((1, 2**31)), fake_tensor((3, 2**31)), cpu((1, 3))),
     r"sizes m=1 n=3 k=2147483648 exceed cuBLAS's 32-bit limit 2147483647"),
    (lambda: (cpu((2, 4)), cpu((5, 4)), cpu((2, 5))), r"needs all tensors on one CUDA device, but x is on cpu:0"),
    (lambda: (cuda((2, 4)), cuda((5, 4)), cpu((2, 5))), r"needs all tensors on one CUDA device, but y is on cpu:0"),
    (lambda: (cuda((2, 4)), cuda((5, 4), device_id=1), cuda((2, 5))),
     r"needs all tensors on one CUDA device, but w is on cuda:1 \(x on cuda:0\)"),
], ids=["x-ndim", "w-ndim", "y-ndim", "k", "y-shape", "float64", "int32", "dtype-w", "dtype-y",
        "x-strides", "y-strides", "int32-limit", "cpu", "y-cpu", "two-gpus"])
def test_validation_messages(gemm, args, message):
    with pytest.raises(ValueError, match=FN.replace(".", r"\.") + r":? .*" + message) as e:
        gemm(*args())
    assert "\n" not in str(e.value).strip()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_valid_cpu_tensors_get_the_device_error(gemm, dtype):
    """Shapes and dtypes that pass every check except the device: the device error, not a crash."""
    if dtype == "bfloat16":   # numpy has no bfloat16: tvm-style tensors (null strides) by hand
        x, w, y = (fake_tensor(s, code=KDLBFLOAT) for s in ((3, 8), (4, 8), (3, 4)))
    else:
        x, w, y = cpu((3, 8), dtype), cpu((4, 8), dtype), cpu((3, 4), dtype)
    with pytest.raises(ValueError, match="needs all tensors on one CUDA device, but x is on cpu:0"):
        gemm(x, w, y)


def test_size_one_dims_may_have_any_stride(gemm):
    """A [1, k] row sliced out of a bigger array (stride 3k on its size-1 dimension) is contiguous,
    as in IsContiguous of tvm_ffi and torch (numpy and torch normalize such strides when exporting)."""
    x = fake_tensor((1, 8), strides=(24, 1))
    assert x.shape == (1, 8) and x.strides == (24, 1)
    with pytest.raises(ValueError, match="needs all tensors on one CUDA device, but x is on cpu:0"):
        gemm(x, cpu((4, 8)), cpu((1, 4)))


def test_empty_batch_returns_without_cublas(gemm):
    """m == 0 on (claimed) CUDA tensors passes validation and returns before cuBLAS is touched."""
    assert gemm(cuda((0, 8)), cuda((4, 8)), cuda((0, 4))) is None


def test_missing_cublas_message(gemm):
    if _cublas_loadable():
        pytest.skip("a libcublas is installed here: the shim would run a real GEMM on fake pointers")
    with pytest.raises(RuntimeError) as e:
        gemm(cuda((2, 8)), cuda((4, 8)), cuda((2, 4)))
    assert str(e.value).strip() == NO_CUBLAS
    with pytest.raises(RuntimeError, match="no libcublas"):   # the failed load is remembered, still clean
        gemm(cuda((2, 8), bits=32), cuda((4, 8), bits=32), cuda((2, 4), bits=32))


def test_several_libraries_and_dlclose(shim_so, tmp_path):
    """Every model.so carries the shim: loading a second copy must not re-register (TVM FFI aborts on a
    duplicate name), and unloading the first must not leave the registry pointing at unmapped code."""
    copies = [shutil.copy(shim_so, tmp_path / f"copy{i}.so") for i in range(2)]
    script = textwrap.dedent(f"""
        import ctypes, _ctypes, numpy as np, tvm_ffi
        for path in {[str(c) for c in copies]!r}:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            _ctypes.dlclose(lib._handle)
        f = tvm_ffi.get_global_func({FN!r})
        x = tvm_ffi.from_dlpack(np.zeros((2, 4), "float16"))
        try:
            f(x, tvm_ffi.from_dlpack(np.zeros((3, 4), "float16")), tvm_ffi.from_dlpack(np.zeros((2, 3), "float16")))
        except ValueError as e:
            print("OK", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout and "CUDA device" in proc.stdout, proc.stdout + proc.stderr


# ---- constants against the real headers --------------------------------------------------------------
def _shim_constants() -> dict[str, int]:
    found = dict(re.findall(r"constexpr int (\w+) = (-?\d+);", CUBLAS_SHIM_SOURCE.read_text()))
    return {k: int(v) for k, v in found.items()}


def _header_texts(tmp_path: Path) -> list[str]:
    texts = []
    for wheel in sorted(glob.glob("/opt/pypi-more/files/nvidia_cublas-*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/include/" in name and name.endswith(".h"):
                    z.extract(name, tmp_path)
    texts += [p.read_text(errors="replace") for p in sorted(tmp_path.rglob("*.h"))]
    for pattern in ("/usr/local/cuda*/include/library_types.h", "/usr/local/cuda*/include/cublas_api.h",
                    "/usr/include/library_types.h", "/usr/include/cublas_api.h"):
        texts += [Path(p).read_text(errors="replace") for p in sorted(glob.glob(pattern))]
    return texts


def test_constants_match_cuda_headers(tmp_path):
    texts = _header_texts(tmp_path)
    if not texts:
        pytest.skip("neither the nvidia-cublas wheel (/opt/pypi-more/files) nor CUDA headers "
                    "(/usr/local/cuda*/include) are on this machine")
    shim = _shim_constants()
    assert {"CUBLAS_OP_N", "CUBLAS_OP_T", "CUDA_R_16F", "CUDA_R_16BF", "CUDA_R_32F", "CUBLAS_COMPUTE_32F",
            "CUBLAS_GEMM_DEFAULT_TENSOR_OP", "CUBLAS_STATUS_SUCCESS"} <= set(shim), shim
    checked = {}
    for name, value in shim.items():
        values = {int(v) for text in texts for v in re.findall(rf"\b{name}\s*=\s*(-?\d+)\s*,", text)}
        if values:
            assert values == {value}, f"{name}: shim says {value}, headers say {sorted(values)}"
            checked[name] = value
    have_cublas = any("cublasGemmEx" in t for t in texts)
    have_library_types = any("CUDA_R_16BF" in t for t in texts)
    assert set(checked) >= ({n for n in shim if n.startswith("CUBLAS_")} if have_cublas else set()) | \
        ({n for n in shim if n.startswith("CUDA_R_")} if have_library_types else set()), checked
    if have_cublas:   # the prototypes the shim declares take as many arguments as the real ones
        text = next(t for t in texts if "cublasGemmEx" in t)
        for fn, n_args in (("cublasGemmEx", 19), ("cublasCreate_v2", 1), ("cublasSetStream_v2", 2),
                           ("cublasGetStatusString", 1)):
            decl = re.search(rf"CUBLASWINAPI {fn}\(([^)]*)\)", text)
            assert decl and len(decl.group(1).split(",")) == n_args, (fn, decl and decl.group(1))
        gemm_fn = re.search(r"using GemmExFn = cublasStatus_t \(\*\)\(([^)]*)\)", CUBLAS_SHIM_SOURCE.read_text())
        assert gemm_fn and len(gemm_fn.group(1).split(",")) == 19


# ---- the build's record and the runtime's preload ------------------------------------------------

def test_quantized_cuda_kernels_record_their_cublas_call():
    """A symbolic-row quantized CUDA GEMM whose plan ends in cuBLAS records the call, the target
    collects it for the manifest; float32 tiles-only and WebGPU kernels record none."""
    import tvm

    from schedules.dequant_matmul import CUBLAS_GEMM_NT, cuda_gemm_plan, make_kernel
    from targets.cuda import NATIVE_LIBRARY_CALLS, packed_calls

    assert cuda_gemm_plan(512, 1024, "float16")[-1].form == "cublas"
    gemm = make_kernel("q4_k", 512, 1024, None, dtype="float16", target="cuda")
    gemv = make_kernel("q4_k", 512, 1024, 1, dtype="float16", target="cuda")
    big = make_kernel("q4_k", 131072, 1024, None, dtype="float16", target="cuda")   # workspace too big
    web = make_kernel("q4_k", 512, 1024, None, dtype="float32", target="webgpu")
    assert packed_calls(tvm.IRModule({"a": gemm, "b": gemv})) == {CUBLAS_GEMM_NT} == {NATIVE_LIBRARY_CALLS["cublas"]}
    assert packed_calls(tvm.IRModule({"b": gemv, "c": big, "d": web})) == set()
    assert CUBLAS_GEMM_NT.encode() in Path("targets/cuda_cublas.cc").read_bytes()   # the shim's name


def test_preload_native_errors_name_what_to_install(monkeypatch):
    from voxc.errors import VoxcError
    from voxc.runtime import tvm_runtime

    tvm_runtime.preload_native([])                       # nothing asked: nothing loaded
    with pytest.raises(VoxcError, match="native library 'cudnn', which this voxc does not know"):
        tvm_runtime.preload_native(["cudnn"])
    monkeypatch.setitem(tvm_runtime.NATIVE_LIBRARIES, "cublas",
                        (("libcublas-voxc-test.so.99",), ("nvidia/none",), "pip install nvidia-cublas"))
    monkeypatch.setattr(tvm_runtime, "_loaded_kinds", set())
    with pytest.raises(VoxcError) as err:
        tvm_runtime.preload_native(["cublas"])
    assert str(err.value) == ("the artifact calls cublas (libcublas-voxc-test.so.99), which was not found: "
                              "pip install nvidia-cublas")
