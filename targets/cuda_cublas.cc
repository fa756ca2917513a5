// voxc's bridge from TVM-compiled CUDA code to cuBLAS: registers the global TVM FFI function
// `voxc.cublas.gemm_nt(x, w, y)` computing y = x @ w^T (row-major, float32 accumulation).
//
// The object file built from this source (targets/cuda.py: compile_cublas_shim) is linked into
// model.so.  It deliberately neither includes cuBLAS headers nor links libcublas:
//  * model.so must load where cuBLAS is absent -- the build machine (no GPU, maybe no cuBLAS), and
//    any process that only inspects an artifact -- so libcublas is dlopen'ed at the first GEMM;
//  * the artifact then works with whichever cuBLAS major the user's torch / CUDA toolkit ships
//    (13, 12 or 11: the few entry points used here have the same ABI in all of them).
// The handful of types, constants and prototypes needed are declared below;
// tests/test_cublas_shim.py checks the constants against the real cublas_api.h / library_types.h.

#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <climits>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>

namespace voxc_cublas {

// ---- cuBLAS / CUDA declarations (values from cublas_api.h and library_types.h) ----
// Enums are passed as int: every C enum used here is int-sized, so the ABI matches.
typedef struct cublasContext* cublasHandle_t;  // opaque
typedef int cublasStatus_t;
typedef void* cudaStream_t;

constexpr int CUBLAS_STATUS_SUCCESS = 0;
constexpr int CUBLAS_OP_N = 0;
constexpr int CUBLAS_OP_T = 1;
constexpr int CUDA_R_16F = 2;
constexpr int CUDA_R_16BF = 14;
constexpr int CUDA_R_32F = 0;
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99;

using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, int transa, int transb, int m, int n, int k,
                                    const void* alpha, const void* A, int Atype, int lda,
                                    const void* B, int Btype, int ldb, const void* beta, void* C,
                                    int Ctype, int ldc, int computeType, int algo);
using StatusStringFn = const char* (*)(cublasStatus_t);
using CudaGetDeviceFn = int (*)(int*);  // cudaError_t cudaGetDevice(int*)
using CudaSetDeviceFn = int (*)(int);   // cudaError_t cudaSetDevice(int)

constexpr const char* kNoCublas =
    "voxc's CUDA build calls cuBLAS for its large matmuls, and no libcublas (.so.13/.so.12) could "
    "be loaded: pip install nvidia-cublas (or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)";

struct Api {
  bool ok = false;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  StatusStringFn status_string = nullptr;  // optional (cuBLAS >= 11.4)
  CudaGetDeviceFn get_device = nullptr;    // optional, from the libcudart TVM already loaded
  CudaSetDeviceFn set_device = nullptr;
};

// Resolve a CUDA runtime symbol without linking libcudart: TVM's CUDA runtime has loaded it already,
// either into the global scope (RTLD_DEFAULT finds it) or locally (RTLD_NOLOAD hands back its handle
// without loading anything new).
static void* FindCudart(const char* symbol) {
  if (void* p = dlsym(RTLD_DEFAULT, symbol)) return p;
  for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) {
    if (void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
      if (void* p = dlsym(lib, symbol)) return p;
    }
  }
  return nullptr;
}

// Loaded once, at the first GEMM, thread-safely (a function-local static).
static const Api& GetApi() {
  static const Api api = [] {
    Api a;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}) {
      void* lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (lib == nullptr) continue;
      a.create = reinterpret_cast<CreateFn>(dlsym(lib, "cublasCreate_v2"));
      a.set_stream = reinterpret_cast<SetStreamFn>(dlsym(lib, "cublasSetStream_v2"));
      a.gemm_ex = reinterpret_cast<GemmExFn>(dlsym(lib, "cublasGemmEx"));
      a.status_string = reinterpret_cast<StatusStringFn>(dlsym(lib, "cublasGetStatusString"));
      if (a.create && a.set_stream && a.gemm_ex) {
        a.ok = true;
        break;
      }
      a = Api();  // a library without the entry points: try the next name
    }
    a.get_device = reinterpret_cast<CudaGetDeviceFn>(FindCudart("cudaGetDevice"));
    a.set_device = reinterpret_cast<CudaSetDeviceFn>(FindCudart("cudaSetDevice"));
    return a;
  }();
  return api;
}

static std::string StatusText(const Api& api, cublasStatus_t status) {
  std::ostringstream os;
  os << "status " << status;
  if (api.status_string != nullptr) {
    if (const char* s = api.status_string(status)) os << ": " << s;
  }
  return os.str();
}

// Makes `device_id` the current CUDA device for the scope (cuBLAS binds a handle to the device that
// is current at cublasCreate and launches on the current one); restores the previous device after.
// Without cudaGetDevice/cudaSetDevice in the process it does nothing (TVM then runs single-device).
class DeviceScope {
 public:
  DeviceScope(const Api& api, int device_id) : api_(api) {
    if (api.get_device == nullptr || api.set_device == nullptr) return;
    if (api.get_device(&previous_) != 0 || previous_ == device_id) return;
    if (api.set_device(device_id) == 0) switched_ = true;
  }
  ~DeviceScope() {
    if (switched_) api_.set_device(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  const Api& api_;
  int previous_ = -1;
  bool switched_ = false;
};

// One handle per (thread, device): cuBLAS handles are not meant to be shared between threads that
// set different streams, and each is bound to one device.  Never destroyed: destroying at thread
// exit can run after the CUDA driver has shut down.
static cublasHandle_t GetHandle(const Api& api, int device_id) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  auto it = handles.find(device_id);
  if (it != handles.end()) return it->second;
  cublasHandle_t handle = nullptr;
  cublasStatus_t status = api.create(&handle);
  if (status != CUBLAS_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "cublasCreate_v2 failed (" << StatusText(api, status)
                                << ") on CUDA device " << device_id;
  }
  handles.emplace(device_id, handle);
  return handle;
}

static std::string DeviceText(DLDevice d) {
  std::ostringstream os;
  switch (d.device_type) {
    case kDLCPU: os << "cpu"; break;
    case kDLCUDA: os << "cuda"; break;
    case kDLCUDAHost: os << "cuda_host"; break;
    case kDLCUDAManaged: os << "cuda_managed"; break;
    case kDLROCM: os << "rocm"; break;
    case kDLVulkan: os << "vulkan"; break;
    case kDLMetal: os << "metal"; break;
    case kDLWebGPU: os << "webgpu"; break;
    default: os << "device_type " << static_cast<int>(d.device_type); break;
  }
  os << ":" << d.device_id;
  return os.str();
}

static std::string DtypeText(DLDataType t) {
  std::ostringstream os;
  switch (t.code) {
    case kDLFloat: os << "float"; break;
    case kDLBfloat: os << "bfloat"; break;
    case kDLInt: os << "int"; break;
    case kDLUInt: os << "uint"; break;
    case kDLBool: os << "bool"; break;
    default: os << "type_code" << static_cast<int>(t.code); break;
  }
  os << static_cast<int>(t.bits);
  if (t.lanes != 1) os << "x" << t.lanes;
  return os.str();
}

static std::string ShapeText(const tvm::ffi::TensorView& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.shape()[i];
  os << "]";
  return os.str();
}

// The cudaDataType for a tensor dtype, or -1 if voxc.cublas.gemm_nt does not handle it.
static int CudaDataType(DLDataType t) {
  if (t.lanes != 1) return -1;
  if (t.code == kDLFloat && t.bits == 16) return CUDA_R_16F;
  if (t.code == kDLBfloat && t.bits == 16) return CUDA_R_16BF;
  if (t.code == kDLFloat && t.bits == 32) return CUDA_R_32F;
  return -1;
}

static void* DataPtr(const tvm::ffi::TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// y[m, n] = x[m, k] @ w[n, k]^T.  Validation runs first (ndim, shapes, dtypes, contiguity, sizes,
// device last), so every message can be exercised with CPU tensors; loading cuBLAS comes after.
void GemmNT(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView y) {
  const char* fn = "voxc.cublas.gemm_nt";
  const std::pair<const char*, const tvm::ffi::TensorView*> args[] = {{"x", &x}, {"w", &w}, {"y", &y}};
  for (const auto& [name, t] : args) {
    if (t->ndim() != 2) {
      TVM_FFI_THROW(ValueError) << fn << ": " << name << " must be 2-D, but has ndim " << t->ndim()
                                << " (shape " << ShapeText(*t) << ")";
    }
  }
  const int64_t m = x.shape()[0], k = x.shape()[1], n = w.shape()[0];
  if (w.shape()[1] != k) {
    TVM_FFI_THROW(ValueError) << fn << ": shape mismatch: x " << ShapeText(x) << " and w "
                              << ShapeText(w) << " must share the last dimension k";
  }
  if (y.shape()[0] != m || y.shape()[1] != n) {
    TVM_FFI_THROW(ValueError) << fn << ": shape mismatch: y is " << ShapeText(y) << ", expected [" << m
                              << ", " << n << "] for x " << ShapeText(x) << " and w " << ShapeText(w);
  }
  const int type = CudaDataType(x.dtype());
  if (type < 0) {
    TVM_FFI_THROW(ValueError) << fn << ": unsupported dtype " << DtypeText(x.dtype())
                              << " (supported: float16, bfloat16, float32)";
  }
  if (x.dtype() != w.dtype() || x.dtype() != y.dtype()) {
    TVM_FFI_THROW(ValueError) << fn << ": dtype mismatch: x " << DtypeText(x.dtype()) << ", w "
                              << DtypeText(w.dtype()) << ", y " << DtypeText(y.dtype())
                              << " (all three must be the same)";
  }
  for (const auto& [name, t] : args) {
    if (!t->IsContiguous()) {  // null strides, or row-major (size-1 and empty dims excepted)
      TVM_FFI_THROW(ValueError) << fn << ": " << name << " must be row-major contiguous, but has strides ["
                                << t->strides()[0] << ", " << t->strides()[1] << "] for shape "
                                << ShapeText(*t);
    }
  }
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX) {
    TVM_FFI_THROW(ValueError) << fn << ": sizes m=" << m << " n=" << n << " k=" << k
                              << " exceed cuBLAS's 32-bit limit " << INT_MAX;
  }
  for (const auto& [name, t] : args) {
    DLDevice d = t->device();
    if (d.device_type != kDLCUDA || d.device_id != x.device().device_id) {
      TVM_FFI_THROW(ValueError) << fn << " needs all tensors on one CUDA device, but " << name
                                << " is on " << DeviceText(d) << " (x on " << DeviceText(x.device())
                                << ")";
    }
  }
  if (m == 0 || n == 0) return;  // nothing to write (and cuBLAS rejects ldc = 0)

  const Api& api = GetApi();
  if (!api.ok) TVM_FFI_THROW(RuntimeError) << kNoCublas;
  const int device_id = x.device().device_id;
  DeviceScope device_scope(api, device_id);
  cublasHandle_t handle = GetHandle(api, device_id);
  // Run on the stream TVM launches its own kernels on (TVM's current stream for this device), so the
  // GEMM is ordered with the kernels before and after it; a null stream is CUDA's legacy default.
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
  cublasStatus_t status = api.set_stream(handle, stream);
  if (status != CUBLAS_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "cublasSetStream_v2 failed (" << StatusText(api, status)
                                << ") on CUDA device " << device_id;
  }
  // cuBLAS is column-major: row-major y[m, n] is column-major y^T[n, m] = w[n, k] @ x^T[k, m], i.e.
  // op(A) = w (row-major [n, k] = column-major [k, n], transposed), B = x^T (column-major [k, m]).
  const float alpha = 1.0f, beta = 0.0f;
  const int ld_k = static_cast<int>(k > 0 ? k : 1);  // lda/ldb must be >= 1 even when k == 0
  status = api.gemm_ex(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha, DataPtr(w), type, ld_k, DataPtr(x), type, ld_k,
                       &beta, DataPtr(y), type, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  if (status != CUBLAS_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "cublasGemmEx failed (" << StatusText(api, status) << ") for m=" << m
                                << " n=" << n << " k=" << k;
  }
}

// Keeps the library holding this code loaded for the rest of the process.  The global registry
// outlives any one model: tvm_ffi dlclose()s a model.so when its module is freed, which would leave
// the registered function pointing into unmapped memory.
static void PinThisLibrary() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&PinThisLibrary), &info) != 0 && info.dli_fname != nullptr) {
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
}

}  // namespace voxc_cublas

TVM_FFI_STATIC_INIT_BLOCK() {
  // Every voxc CUDA model.so carries this shim; the first one loaded registers the function and later
  // ones reuse it (registering a name twice is an error in TVM FFI).
  if (tvm::ffi::Function::GetGlobal("voxc.cublas.gemm_nt").has_value()) return;
  voxc_cublas::PinThisLibrary();
  tvm::ffi::reflection::GlobalDef().def("voxc.cublas.gemm_nt", voxc_cublas::GemmNT);
}
