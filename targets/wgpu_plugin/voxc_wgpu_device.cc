// voxc's native WebGPU device for TVM's runtime, backed by wgpu-native (Vulkan, Metal, DX12).
//
// TVM's WebGPU codegen emits WGSL kernels plus host code that launches them through a module of
// kind "webgpu"; in a browser, tvmjs provides that module and the "webgpu" DeviceAPI.  This plugin
// provides both natively, so a model compiled with the WebGPU device target and an llvm host runs
// in the ordinary Relax VM (voxc/runtime/wgpu_device.py loads it, targets/vulkan.py builds it):
//
//   * device_api.webgpu: buffers (a tensor's data pointer is its WGPUBuffer), copies, sync;
//   * ffi.Module.load_from_bytes.webgpu: the fmap/smap bytes TVM serializes into the library (the
//     same bytes tvmjs reads), each kernel launched as tvmjs launches it: one storage buffer per
//     handle argument (read-only unless paramWriteAccess says written), then a uniform holding the
//     scalar arguments and packGridDimX; blockIdx.x beyond 65535 folded into z;
//   * voxc.wgpu.open / voxc.wgpu.stats: open the adapter (clear errors) and count submissions.
//
// Launches are recorded into one command encoder and submitted together when the host reads a
// result, writes a buffer, or syncs (as tvmjs batches them), with the scalar arguments of the whole
// batch in one uniform ring written just before the submit.
#include <webgpu.h>
#include <wgpu.h>

#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "src/runtime/metadata.h"
#include "src/support/bytes_io.h"

namespace voxc_wgpu {

using tvm::runtime::FunctionInfo;
namespace ffi = tvm::ffi;

constexpr int kDLWebGPUDevice = 15;
// Scalar arguments of the launches of one batch; a full ring submits the batch.
constexpr uint64_t kUniformRingBytes = 1 << 20;
// WebGPU: copies and buffer sizes are multiples of 4 bytes.
constexpr uint64_t kCopyAlign = 4;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
uint64_t AlignDown(uint64_t v, uint64_t a) { return v / a * a; }
std::string FromView(WGPUStringView s) {
  if (s.data == nullptr) return "";
  return s.length == WGPU_STRLEN ? std::string(s.data) : std::string(s.data, s.length);
}
WGPUStringView ToView(const std::string& s) { return WGPUStringView{s.data(), s.size()}; }

// Adds the seconds of its scope to a counter.
class Timer {
 public:
  explicit Timer(double* total) : total_(total), start_(std::chrono::steady_clock::now()) {}
  ~Timer() { *total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  double* total_;
  std::chrono::steady_clock::time_point start_;
};

// A compiled kernel: pipeline + bind group layout and how the host's arguments map onto them.
struct Kernel {
  std::string name;
  WGPUComputePipeline pipeline = nullptr;
  WGPUBindGroupLayout layout = nullptr;
  std::vector<int> buffer_args;      // argument index of each storage binding
  std::vector<int> pod_args;         // argument index of each PODArgs field
  std::vector<uint8_t> pod_codes;    // DLDataTypeCode of each PODArgs field (int, uint, float)
  std::vector<int> launch_dims;      // per launch argument: 0-2 blockIdx.xyz, 3-5 threadIdx.xyz
  uint64_t uniform_bytes = 0;        // PODArgs size: 4 bytes per scalar + packGridDimX
};

class Context {
 public:
  static Context* Global() {
    static Context* inst = new Context();  // never destroyed: buffers may be freed at exit
    return inst;
  }

  // Opens the adapter and device once; throws a one-line error when there is none.
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    OpenLocked();
  }

  // Opens the device on ``backend`` ("vulkan", "metal" or "any") and describes it as JSON.
  std::string Describe(const std::string& backend) {
    std::lock_guard<std::mutex> lock(mu_);
    if (device_ == nullptr && open_error_.empty()) {
      if (backend == "vulkan") {
        backends_ = WGPUInstanceBackend_Vulkan;
      } else if (backend == "metal") {
        backends_ = WGPUInstanceBackend_Metal;
      } else if (backend != "any") {
        TVM_FFI_THROW(ValueError) << "voxc-wgpu: unknown backend " << backend << " (vulkan, metal or any)";
      }
      backend_wanted_ = backend;
    } else if (backend != backend_wanted_ && backend != "any") {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: this process opened the " << backend_wanted_
                                  << " backend already; load a " << backend << " artifact in a new process";
    }
    OpenLocked();
    namespace json = ffi::json;
    json::Object obj;
    obj.Set("vendor", vendor_);
    obj.Set("device", device_name_);
    obj.Set("description", description_);
    obj.Set("backend", backend_);
    obj.Set("adapter_type", adapter_type_);
    json::Array features;
    if (has_f16_) features.push_back(ffi::String("shader-f16"));
    obj.Set("features", std::move(features));
    json::Object limits;
    limits.Set("max_buffer_size", static_cast<int64_t>(limits_.maxBufferSize));
    limits.Set("max_storage_buffer_binding_size", static_cast<int64_t>(limits_.maxStorageBufferBindingSize));
    limits.Set("max_storage_buffers_per_shader_stage", static_cast<int64_t>(limits_.maxStorageBuffersPerShaderStage));
    limits.Set("max_compute_invocations_per_workgroup",
               static_cast<int64_t>(limits_.maxComputeInvocationsPerWorkgroup));
    limits.Set("max_compute_workgroup_storage_size", static_cast<int64_t>(limits_.maxComputeWorkgroupStorageSize));
    limits.Set("max_compute_workgroups_per_dimension",
               static_cast<int64_t>(limits_.maxComputeWorkgroupsPerDimension));
    obj.Set("limits", std::move(limits));
    obj.Set("wgpu_native_version", static_cast<int64_t>(wgpuGetVersion()));
    return std::string(json::Stringify(obj));
  }

  std::string Stats() {
    std::lock_guard<std::mutex> lock(mu_);
    std::ostringstream os;
    os << "{\"dispatches\": " << dispatches_ << ", \"submits\": " << submits_ << ", \"buffers\": " << live_buffers_
       << ", \"buffer_bytes\": " << live_bytes_ << ", \"launch_seconds\": " << launch_seconds_
       << ", \"wait_seconds\": " << wait_seconds_ << "}";
    return os.str();
  }

  bool Exists() {
    try {
      Open();
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }

  const WGPULimits& limits() {
    Open();
    return limits_;
  }
  const std::string& description() {
    Open();
    return description_;
  }

  // ---- memory -------------------------------------------------------------------------------
  void* Alloc(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    OpenLocked();
    // Kernels bind whole buffers, so a buffer over the binding limit could never be used.
    uint64_t limit = std::min<uint64_t>(limits_.maxBufferSize, limits_.maxStorageBufferBindingSize);
    if (nbytes > limit) {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: a buffer of " << nbytes << " bytes is over this adapter's limit of "
                                  << limit << " bytes (maxStorageBufferBindingSize "
                                  << limits_.maxStorageBufferBindingSize << ", maxBufferSize "
                                  << limits_.maxBufferSize << ") on " << description_;
    }
    WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
    desc.usage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;
    desc.size = AlignUp(std::max<size_t>(nbytes, 1), kCopyAlign);
    WGPUBuffer buf = wgpuDeviceCreateBuffer(device_, &desc);
    CheckErrors("allocating a buffer");
    if (buf == nullptr) TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: out of GPU memory allocating " << nbytes << " bytes";
    ++live_buffers_;
    live_bytes_ += desc.size;
    return buf;
  }

  void Free(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    WGPUBuffer buf = static_cast<WGPUBuffer>(ptr);
    // Release, not destroy: commands not yet submitted may still use it (wgpu keeps it alive).
    live_bytes_ -= wgpuBufferGetSize(buf);
    --live_buffers_;
    wgpuBufferRelease(buf);
  }

  void Write(void* dst, uint64_t offset, const void* src, uint64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    WriteLocked(static_cast<WGPUBuffer>(dst), offset, src, n);
  }

  void Read(const void* src, uint64_t offset, void* dst, uint64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    ReadLocked(static_cast<WGPUBuffer>(const_cast<void*>(src)), offset, dst, n);
  }

  void CopyWithin(const void* src, uint64_t src_offset, void* dst, uint64_t dst_offset, uint64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    if (n == 0) return;
    WGPUBuffer from = static_cast<WGPUBuffer>(const_cast<void*>(src)), to = static_cast<WGPUBuffer>(dst);
    if (src_offset % kCopyAlign || dst_offset % kCopyAlign || n % kCopyAlign) {
      std::vector<uint8_t> staging(n);  // an unaligned copy goes through the host
      ReadLocked(from, src_offset, staging.data(), n);
      WriteLocked(to, dst_offset, staging.data(), n);
      return;
    }
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), from, src_offset, to, dst_offset, n);
  }

  void Sync() {
    std::lock_guard<std::mutex> lock(mu_);
    if (device_ == nullptr) return;
    Submit();
    {
      Timer timer(&wait_seconds_);
      wgpuDevicePoll(device_, true, nullptr);
    }
    CheckErrors("running kernels");
  }

  // ---- kernels ------------------------------------------------------------------------------
  std::shared_ptr<Kernel> CreateKernel(const FunctionInfo& info, const std::string& wgsl) {
    std::lock_guard<std::mutex> lock(mu_);
    OpenLocked();
    auto k = std::make_shared<Kernel>();
    k->name = info->name;
    std::vector<int> write_access;
    for (const ffi::String& tag : info->launch_param_tags) {
      std::string t = tag;
      if (t.rfind("paramWriteAccess:", 0) == 0) {
        for (char c : t.substr(17)) {
          if (c == '0' || c == '1') write_access.push_back(c - '0');
        }
      } else if (t.rfind("blockIdx.", 0) == 0 && t.size() == 10) {
        k->launch_dims.push_back(t[9] - 'x');
      } else if (t.rfind("threadIdx.", 0) == 0 && t.size() == 11) {
        k->launch_dims.push_back(3 + t[10] - 'x');
      } else {
        TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: kernel " << k->name << " has a launch tag " << t
                                    << " this runtime does not know";
      }
    }
    std::vector<WGPUBindGroupLayoutEntry> entries;
    for (size_t i = 0; i < info->arg_types.size(); ++i) {
      DLDataType t = info->arg_types[i];
      if (t.code == kDLOpaqueHandle) {
        size_t slot = k->buffer_args.size();
        WGPUBindGroupLayoutEntry e = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
        e.binding = static_cast<uint32_t>(slot);
        e.visibility = WGPUShaderStage_Compute;
        bool written = slot < write_access.size() ? write_access[slot] : true;
        e.buffer.type = written ? WGPUBufferBindingType_Storage : WGPUBufferBindingType_ReadOnlyStorage;
        entries.push_back(e);
        k->buffer_args.push_back(static_cast<int>(i));
      } else if ((t.code == kDLInt || t.code == kDLUInt || t.code == kDLFloat) && t.bits <= 32 && t.lanes == 1) {
        k->pod_args.push_back(static_cast<int>(i));
        k->pod_codes.push_back(t.code);
      } else {
        TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: kernel " << k->name << " takes an argument of type "
                                    << ffi::DLDataTypeToString(t) << " WGSL cannot receive";
      }
    }
    k->uniform_bytes = AlignUp(4 * (k->pod_args.size() + 1), 16);
    WGPUBindGroupLayoutEntry pods = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
    pods.binding = static_cast<uint32_t>(k->buffer_args.size());
    pods.visibility = WGPUShaderStage_Compute;
    pods.buffer.type = WGPUBufferBindingType_Uniform;
    entries.push_back(pods);
    if (k->buffer_args.size() > limits_.maxStorageBuffersPerShaderStage) {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: kernel " << k->name << " binds " << k->buffer_args.size()
                                  << " storage buffers, over this adapter's maxStorageBuffersPerShaderStage of "
                                  << limits_.maxStorageBuffersPerShaderStage;
    }

    WGPUBindGroupLayoutDescriptor layout_desc = WGPU_BIND_GROUP_LAYOUT_DESCRIPTOR_INIT;
    layout_desc.entryCount = entries.size();
    layout_desc.entries = entries.data();
    k->layout = wgpuDeviceCreateBindGroupLayout(device_, &layout_desc);
    WGPUPipelineLayoutDescriptor pl_desc = WGPU_PIPELINE_LAYOUT_DESCRIPTOR_INIT;
    pl_desc.bindGroupLayoutCount = 1;
    pl_desc.bindGroupLayouts = &k->layout;
    WGPUPipelineLayout pipeline_layout = wgpuDeviceCreatePipelineLayout(device_, &pl_desc);

    WGPUShaderSourceWGSL source = WGPU_SHADER_SOURCE_WGSL_INIT;
    source.code = ToView(wgsl);
    WGPUShaderModuleDescriptor sm_desc = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    sm_desc.nextInChain = &source.chain;
    sm_desc.label = ToView(k->name);
    WGPUShaderModule module = wgpuDeviceCreateShaderModule(device_, &sm_desc);
    CheckErrors(("compiling the WGSL of kernel " + k->name).c_str());

    WGPUComputePipelineDescriptor cp_desc = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    cp_desc.label = ToView(k->name);
    cp_desc.layout = pipeline_layout;
    cp_desc.compute.module = module;
    cp_desc.compute.entryPoint = ToView(k->name);
    k->pipeline = wgpuDeviceCreateComputePipeline(device_, &cp_desc);
    wgpuShaderModuleRelease(module);
    wgpuPipelineLayoutRelease(pipeline_layout);
    CheckErrors(("creating the pipeline of kernel " + k->name).c_str());
    return k;
  }

  void Launch(const Kernel& k, ffi::PackedArgs args) {
    std::lock_guard<std::mutex> lock(mu_);
    Timer timer(&launch_seconds_);
    size_t num_main = k.buffer_args.size() + k.pod_args.size();
    if (static_cast<size_t>(args.size()) != num_main + k.launch_dims.size()) {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: kernel " << k.name << " expects " << num_main + k.launch_dims.size()
                                  << " arguments, got " << args.size();
    }
    uint64_t grid[6] = {1, 1, 1, 1, 1, 1};
    for (size_t i = 0; i < k.launch_dims.size(); ++i) grid[k.launch_dims[i]] = args[num_main + i].cast<int64_t>();
    if (grid[2] != 1) TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: blockIdx.z is reserved (kernel " << k.name << ")";
    if (grid[0] == 0 || grid[1] == 0) return;
    // blockIdx.x is limited to 65535 workgroups: halve it into z until it fits, as tvmjs does; the
    // shader skips the padding workgroups by comparing against packGridDimX.
    uint64_t pack_x = grid[0], wx = grid[0], wz = 1;
    while (wx >= (1u << 16)) {
      wx = (wx + 1) / 2;
      wz *= 2;
    }
    uint32_t max_dim = limits_.maxComputeWorkgroupsPerDimension;
    if (wx > max_dim || grid[1] > max_dim || wz > max_dim) {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: kernel " << k.name << " needs a grid of (" << wx << ", " << grid[1]
                                  << ", " << wz << ") workgroups, over this adapter's limit of " << max_dim;
    }

    uint64_t stride = AlignUp(k.uniform_bytes, uniform_align_);
    if (ring_used_ + stride > kUniformRingBytes) Submit();
    uint64_t uniform_offset = ring_used_;
    ring_used_ += stride;
    uint8_t* pods = ring_host_.data() + uniform_offset;
    std::memset(pods, 0, k.uniform_bytes);
    for (size_t j = 0; j < k.pod_args.size(); ++j) {
      const ffi::AnyView& v = args[k.pod_args[j]];
      if (k.pod_codes[j] == kDLFloat) {
        float f = static_cast<float>(v.cast<double>());
        std::memcpy(pods + 4 * j, &f, 4);
      } else if (k.pod_codes[j] == kDLUInt) {
        uint32_t u = static_cast<uint32_t>(v.cast<int64_t>());
        std::memcpy(pods + 4 * j, &u, 4);
      } else {
        int32_t s = static_cast<int32_t>(v.cast<int64_t>());
        std::memcpy(pods + 4 * j, &s, 4);
      }
    }
    uint32_t packed = static_cast<uint32_t>(pack_x);
    std::memcpy(pods + 4 * k.pod_args.size(), &packed, 4);

    std::vector<WGPUBindGroupEntry> entries(k.buffer_args.size() + 1, WGPU_BIND_GROUP_ENTRY_INIT);
    for (size_t b = 0; b < k.buffer_args.size(); ++b) {
      WGPUBuffer buf = static_cast<WGPUBuffer>(args[k.buffer_args[b]].cast<void*>());
      entries[b].binding = static_cast<uint32_t>(b);
      entries[b].buffer = buf;
      entries[b].offset = 0;
      entries[b].size = wgpuBufferGetSize(buf);
    }
    WGPUBindGroupEntry& pod_entry = entries.back();
    pod_entry.binding = static_cast<uint32_t>(k.buffer_args.size());
    pod_entry.buffer = ring_;
    pod_entry.offset = uniform_offset;
    pod_entry.size = k.uniform_bytes;
    WGPUBindGroupDescriptor bg_desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
    bg_desc.layout = k.layout;
    bg_desc.entryCount = entries.size();
    bg_desc.entries = entries.data();
    WGPUBindGroup group = wgpuDeviceCreateBindGroup(device_, &bg_desc);

    WGPUComputePassEncoder pass = Pass();
    wgpuComputePassEncoderSetPipeline(pass, k.pipeline);
    wgpuComputePassEncoderSetBindGroup(pass, 0, group, 0, nullptr);
    wgpuComputePassEncoderDispatchWorkgroups(pass, static_cast<uint32_t>(wx), static_cast<uint32_t>(grid[1]),
                                             static_cast<uint32_t>(wz));
    wgpuBindGroupRelease(group);  // the pass holds its own reference
    ++dispatches_;
    if (!errors_.empty()) CheckErrors(("launching kernel " + k.name).c_str());
  }

 private:
  Context() = default;

  void OpenLocked() {
    if (device_ != nullptr) return;
    if (!open_error_.empty()) TVM_FFI_THROW(RuntimeError) << open_error_;
    WGPUInstanceExtras extras = {};
    extras.chain.sType = static_cast<WGPUSType>(WGPUSType_InstanceExtras);
    extras.backends = backends_;
    WGPUInstanceDescriptor inst_desc = WGPU_INSTANCE_DESCRIPTOR_INIT;
    inst_desc.nextInChain = &extras.chain;
    instance_ = wgpuCreateInstance(&inst_desc);
    if (instance_ == nullptr) Fail("voxc-wgpu: wgpu-native could not create an instance");

    struct AdapterResult {
      bool done = false;
      WGPUAdapter adapter = nullptr;
      std::string message;
    } ar;
    WGPURequestAdapterOptions options = WGPU_REQUEST_ADAPTER_OPTIONS_INIT;
    options.powerPreference = WGPUPowerPreference_HighPerformance;
    WGPURequestAdapterCallbackInfo acb = WGPU_REQUEST_ADAPTER_CALLBACK_INFO_INIT;
    acb.mode = WGPUCallbackMode_AllowSpontaneous;
    acb.callback = [](WGPURequestAdapterStatus status, WGPUAdapter adapter, WGPUStringView message, void* ud1,
                      void*) {
      auto* r = static_cast<AdapterResult*>(ud1);
      r->adapter = status == WGPURequestAdapterStatus_Success ? adapter : nullptr;
      r->message = FromView(message);
      r->done = true;
    };
    acb.userdata1 = &ar;
    wgpuInstanceRequestAdapter(instance_, &options, acb);
    for (int i = 0; !ar.done && i < 1000; ++i) wgpuInstanceProcessEvents(instance_);
    if (ar.adapter == nullptr) {
      Fail("voxc-wgpu: wgpu found no " + (backend_wanted_ == "any" ? std::string("GPU") : backend_wanted_) +
           " adapter" + (ar.message.empty() ? std::string() : " (" + ar.message + ")"));
    }
    adapter_ = ar.adapter;

    WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
    wgpuAdapterGetInfo(adapter_, &info);
    vendor_ = FromView(info.vendor);
    device_name_ = FromView(info.device);
    description_ = device_name_.empty() ? vendor_ : device_name_;
    std::string desc_text = FromView(info.description);
    if (!desc_text.empty()) description_ += " (" + desc_text + ")";
    backend_ = BackendName(info.backendType);
    adapter_type_ = info.adapterType == WGPUAdapterType_CPU             ? "cpu"
                    : info.adapterType == WGPUAdapterType_DiscreteGPU   ? "discrete-gpu"
                    : info.adapterType == WGPUAdapterType_IntegratedGPU ? "integrated-gpu"
                                                                        : "unknown";
    wgpuAdapterInfoFreeMembers(info);

    WGPULimits adapter_limits = WGPU_LIMITS_INIT;
    wgpuAdapterGetLimits(adapter_, &adapter_limits);
    // Ask for everything the adapter offers that the kernels use: WebGPU's defaults (128 MiB
    // bindings, 256 invocations, 8 storage buffers) are far below what a model needs.
    WGPULimits required = WGPU_LIMITS_INIT;
    required.maxBufferSize = adapter_limits.maxBufferSize;
    required.maxStorageBufferBindingSize = adapter_limits.maxStorageBufferBindingSize;
    required.maxStorageBuffersPerShaderStage = adapter_limits.maxStorageBuffersPerShaderStage;
    required.maxComputeInvocationsPerWorkgroup = adapter_limits.maxComputeInvocationsPerWorkgroup;
    required.maxComputeWorkgroupSizeX = adapter_limits.maxComputeWorkgroupSizeX;
    required.maxComputeWorkgroupSizeY = adapter_limits.maxComputeWorkgroupSizeY;
    required.maxComputeWorkgroupSizeZ = adapter_limits.maxComputeWorkgroupSizeZ;
    required.maxComputeWorkgroupStorageSize = adapter_limits.maxComputeWorkgroupStorageSize;
    required.maxComputeWorkgroupsPerDimension = adapter_limits.maxComputeWorkgroupsPerDimension;
    has_f16_ = wgpuAdapterHasFeature(adapter_, WGPUFeatureName_ShaderF16);
    WGPUFeatureName f16 = WGPUFeatureName_ShaderF16;

    struct DeviceResult {
      bool done = false;
      WGPUDevice device = nullptr;
      std::string message;
    } dr;
    WGPUDeviceDescriptor dev_desc = WGPU_DEVICE_DESCRIPTOR_INIT;
    dev_desc.label = ToView("voxc");
    dev_desc.requiredFeatureCount = has_f16_ ? 1 : 0;
    dev_desc.requiredFeatures = &f16;
    dev_desc.requiredLimits = &required;
    dev_desc.uncapturedErrorCallbackInfo.callback = [](WGPUDevice const*, WGPUErrorType, WGPUStringView message,
                                                       void* ud1, void*) {
      auto* ctx = static_cast<Context*>(ud1);
      if (ctx->errors_.size() < 4000) ctx->errors_ += (ctx->errors_.empty() ? "" : "; ") + FromView(message);
    };
    dev_desc.uncapturedErrorCallbackInfo.userdata1 = this;
    dev_desc.deviceLostCallbackInfo.mode = WGPUCallbackMode_AllowSpontaneous;
    dev_desc.deviceLostCallbackInfo.callback = [](WGPUDevice const*, WGPUDeviceLostReason reason,
                                                  WGPUStringView message, void* ud1, void*) {
      if (reason == WGPUDeviceLostReason_Destroyed || reason == WGPUDeviceLostReason_CallbackCancelled) return;
      auto* ctx = static_cast<Context*>(ud1);
      ctx->errors_ += "the GPU device was lost: " + FromView(message);
    };
    dev_desc.deviceLostCallbackInfo.userdata1 = this;
    WGPURequestDeviceCallbackInfo dcb = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
    dcb.mode = WGPUCallbackMode_AllowSpontaneous;
    dcb.callback = [](WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView message, void* ud1, void*) {
      auto* r = static_cast<DeviceResult*>(ud1);
      r->device = status == WGPURequestDeviceStatus_Success ? device : nullptr;
      r->message = FromView(message);
      r->done = true;
    };
    dcb.userdata1 = &dr;
    wgpuAdapterRequestDevice(adapter_, &dev_desc, dcb);
    for (int i = 0; !dr.done && i < 1000; ++i) wgpuInstanceProcessEvents(instance_);
    if (dr.device == nullptr) Fail("voxc-wgpu: the adapter " + description_ + " refused a device: " + dr.message);
    device_ = dr.device;
    queue_ = wgpuDeviceGetQueue(device_);
    limits_ = WGPU_LIMITS_INIT;
    wgpuDeviceGetLimits(device_, &limits_);
    uniform_align_ = std::max<uint64_t>(limits_.minUniformBufferOffsetAlignment, 16);

    WGPUBufferDescriptor ring_desc = WGPU_BUFFER_DESCRIPTOR_INIT;
    ring_desc.usage = WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst;
    ring_desc.size = kUniformRingBytes;
    ring_ = wgpuDeviceCreateBuffer(device_, &ring_desc);
    ring_host_.assign(kUniformRingBytes, 0);
    CheckErrors("opening the device");
  }

  [[noreturn]] void Fail(const std::string& message) {
    open_error_ = message;  // every later use reports the same cause
    TVM_FFI_THROW(RuntimeError) << message;
  }

  static const char* BackendName(WGPUBackendType t) {
    switch (t) {
      case WGPUBackendType_Vulkan: return "vulkan";
      case WGPUBackendType_Metal: return "metal";
      case WGPUBackendType_D3D12: return "d3d12";
      case WGPUBackendType_OpenGL: return "opengl";
      default: return "other";
    }
  }

  void CheckErrors(const char* what) {
    if (errors_.empty()) return;
    std::string msg = errors_;
    errors_.clear();
    TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: error " << what << ": " << msg;
  }

  WGPUCommandEncoder Encoder() {
    if (encoder_ == nullptr) {
      WGPUCommandEncoderDescriptor desc = WGPU_COMMAND_ENCODER_DESCRIPTOR_INIT;
      encoder_ = wgpuDeviceCreateCommandEncoder(device_, &desc);
    }
    return encoder_;
  }

  WGPUComputePassEncoder Pass() {
    if (pass_ == nullptr) {
      WGPUComputePassDescriptor desc = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
      pass_ = wgpuCommandEncoderBeginComputePass(Encoder(), &desc);
    }
    return pass_;
  }

  void EndPass() {
    if (pass_ == nullptr) return;
    wgpuComputePassEncoderEnd(pass_);
    wgpuComputePassEncoderRelease(pass_);
    pass_ = nullptr;
  }

  // Submits the recorded launches and copies.  Their scalar arguments go into the ring first:
  // writeBuffer is ordered before this submit and after the previous one on the queue.
  void Submit() {
    if (encoder_ == nullptr) return;
    EndPass();
    if (ring_used_ > 0) wgpuQueueWriteBuffer(queue_, ring_, 0, ring_host_.data(), ring_used_);
    WGPUCommandBufferDescriptor desc = WGPU_COMMAND_BUFFER_DESCRIPTOR_INIT;
    WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder_, &desc);
    wgpuCommandEncoderRelease(encoder_);
    encoder_ = nullptr;
    wgpuQueueSubmit(queue_, 1, &commands);
    wgpuCommandBufferRelease(commands);
    ring_used_ = 0;
    ++submits_;
    CheckErrors("submitting kernels");
  }

  void WriteLocked(WGPUBuffer dst, uint64_t offset, const void* src, uint64_t n) {
    if (n == 0) return;
    Submit();  // queued writes land before unsubmitted commands: submit those first
    if (offset % kCopyAlign || n % kCopyAlign) {
      uint64_t begin = AlignDown(offset, kCopyAlign), end = AlignUp(offset + n, kCopyAlign);
      std::vector<uint8_t> span(end - begin);
      ReadLocked(dst, begin, span.data(), span.size());
      std::memcpy(span.data() + (offset - begin), src, n);
      wgpuQueueWriteBuffer(queue_, dst, begin, span.data(), span.size());
    } else {
      wgpuQueueWriteBuffer(queue_, dst, offset, src, n);
    }
    CheckErrors("writing a buffer");
  }

  void ReadLocked(WGPUBuffer src, uint64_t offset, void* dst, uint64_t n) {
    if (n == 0) return;
    uint64_t begin = AlignDown(offset, kCopyAlign), end = AlignUp(offset + n, kCopyAlign);
    uint64_t span = end - begin;
    if (staging_ == nullptr || wgpuBufferGetSize(staging_) < span) {
      if (staging_ != nullptr) wgpuBufferRelease(staging_);
      WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
      desc.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
      desc.size = std::max<uint64_t>(AlignUp(span, 256), 1 << 16);
      staging_ = wgpuDeviceCreateBuffer(device_, &desc);
    }
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), src, begin, staging_, 0, span);
    Submit();

    struct MapResult {
      bool done = false;
      WGPUMapAsyncStatus status = WGPUMapAsyncStatus_Error;
      std::string message;
    } mr;
    WGPUBufferMapCallbackInfo cb = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowSpontaneous;
    cb.callback = [](WGPUMapAsyncStatus status, WGPUStringView message, void* ud1, void*) {
      auto* r = static_cast<MapResult*>(ud1);
      r->status = status;
      r->message = FromView(message);
      r->done = true;
    };
    cb.userdata1 = &mr;
    wgpuBufferMapAsync(staging_, WGPUMapMode_Read, 0, span, cb);
    {
      Timer timer(&wait_seconds_);
      while (!mr.done) wgpuDevicePoll(device_, true, nullptr);
    }
    CheckErrors("reading a buffer");
    if (mr.status != WGPUMapAsyncStatus_Success) {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: reading a buffer back failed: " << mr.message;
    }
    const uint8_t* mapped = static_cast<const uint8_t*>(wgpuBufferGetConstMappedRange(staging_, 0, span));
    std::memcpy(dst, mapped + (offset - begin), n);
    wgpuBufferUnmap(staging_);
  }

  std::mutex mu_;
  // Primary backends (Vulkan, Metal, DX12) unless the artifact names one: wgpu's GL fallback lacks
  // what the kernels need.
  WGPUInstanceBackend backends_ = WGPUInstanceBackend_Primary;
  std::string backend_wanted_ = "any";
  WGPUInstance instance_ = nullptr;
  WGPUAdapter adapter_ = nullptr;
  WGPUDevice device_ = nullptr;
  WGPUQueue queue_ = nullptr;
  WGPULimits limits_ = WGPU_LIMITS_INIT;
  bool has_f16_ = false;
  std::string vendor_, device_name_, description_, backend_, adapter_type_;
  std::string open_error_;
  std::string errors_;  // validation errors since the last check (uncaptured-error callback)

  WGPUCommandEncoder encoder_ = nullptr;
  WGPUComputePassEncoder pass_ = nullptr;
  WGPUBuffer ring_ = nullptr;
  std::vector<uint8_t> ring_host_;
  uint64_t ring_used_ = 0;
  uint64_t uniform_align_ = 256;
  WGPUBuffer staging_ = nullptr;

  int64_t dispatches_ = 0, submits_ = 0, live_buffers_ = 0, live_bytes_ = 0;
  // host time spent recording launches, and waiting for the GPU (read-backs, syncs)
  double launch_seconds_ = 0, wait_seconds_ = 0;
};

class WgpuDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  static WgpuDeviceAPI* Global() {
    static WgpuDeviceAPI* inst = new WgpuDeviceAPI();
    return inst;
  }

  void SetDevice(tvm::Device) final {}

  void GetAttr(tvm::Device dev, tvm::runtime::DeviceAttrKind kind, ffi::Any* rv) final {
    using namespace tvm::runtime;
    Context* ctx = Context::Global();
    if (kind == kExist) {
      *rv = static_cast<int>(dev.device_id == 0 && ctx->Exists());
      return;
    }
    if (!ctx->Exists()) return;
    const WGPULimits& l = ctx->limits();
    switch (kind) {
      case kMaxThreadsPerBlock: *rv = static_cast<int64_t>(l.maxComputeInvocationsPerWorkgroup); break;
      case kWarpSize: *rv = 1; break;
      case kMaxSharedMemoryPerBlock: *rv = static_cast<int64_t>(l.maxComputeWorkgroupStorageSize); break;
      case kDeviceName: *rv = ffi::String(ctx->description()); break;
      case kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << l.maxComputeWorkgroupSizeX << ", " << l.maxComputeWorkgroupSizeY << ", "
           << l.maxComputeWorkgroupSizeZ << "]";
        *rv = ffi::String(os.str());
        break;
      }
      default: break;
    }
  }

  void* AllocDataSpace(tvm::Device, size_t nbytes, size_t, DLDataType) final {
    return Context::Global()->Alloc(nbytes);
  }

  void FreeDataSpace(tvm::Device, void* ptr) final { Context::Global()->Free(ptr); }

  void StreamSync(tvm::Device, TVMStreamHandle) final { Context::Global()->Sync(); }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size,
                      tvm::Device dev_from, tvm::Device dev_to, DLDataType, TVMStreamHandle) final {
    Context* ctx = Context::Global();
    bool from_gpu = static_cast<int>(dev_from.device_type) == kDLWebGPUDevice;
    bool to_gpu = static_cast<int>(dev_to.device_type) == kDLWebGPUDevice;
    if (from_gpu && to_gpu) {
      ctx->CopyWithin(from, from_offset, to, to_offset, size);
    } else if (from_gpu && dev_to.device_type == kDLCPU) {
      ctx->Read(from, from_offset, static_cast<uint8_t*>(to) + to_offset, size);
    } else if (dev_from.device_type == kDLCPU && to_gpu) {
      ctx->Write(to, to_offset, static_cast<const uint8_t*>(from) + from_offset, size);
    } else {
      TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: can only copy between the CPU and the WebGPU device";
    }
  }
};

class WgpuModuleNode final : public ffi::ModuleObj {
 public:
  WgpuModuleNode(std::unordered_map<std::string, std::string> smap, ffi::Map<ffi::String, FunctionInfo> fmap)
      : smap_(std::move(smap)), fmap_(std::move(fmap)) {}

  const char* kind() const final { return "webgpu"; }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto source = smap_.find(name);
    auto info = fmap_.Get(name);
    if (source == smap_.end() || !info.has_value()) return std::nullopt;
    std::shared_ptr<Kernel> kernel = Context::Global()->CreateKernel(info.value(), source->second);
    return ffi::Function::FromPacked(
        [kernel](ffi::PackedArgs args, ffi::Any*) { Context::Global()->Launch(*kernel, args); });
  }

  int GetPropertyMask() const final { return ffi::Module::kBinarySerializable; }

  ffi::Bytes SaveToBytes() const final {
    TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: a loaded WebGPU module cannot be saved again";
  }

  ffi::String InspectSource(const ffi::String&) const final {
    std::string all;
    for (const auto& kv : smap_) all += "// Function: " + kv.first + "\n" + kv.second + "\n";
    return all;
  }

 private:
  std::unordered_map<std::string, std::string> smap_;
  ffi::Map<ffi::String, FunctionInfo> fmap_;
};

ffi::Module LoadFromBytes(const ffi::Bytes& bytes) {
  tvm::support::BytesInStream stream(bytes);
  ffi::Map<ffi::String, FunctionInfo> fmap;
  std::unordered_map<std::string, std::string> smap;
  if (!stream.Read(&fmap) || !stream.Read(&smap)) {
    TVM_FFI_THROW(RuntimeError) << "voxc-wgpu: the library's WebGPU module is damaged";
  }
  return ffi::Module(ffi::make_object<WgpuModuleNode>(std::move(smap), std::move(fmap)));
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("ffi.Module.load_from_bytes.webgpu", LoadFromBytes)
      .def_packed("device_api.webgpu",
                  [](ffi::PackedArgs, ffi::Any* rv) { *rv = static_cast<void*>(WgpuDeviceAPI::Global()); })
      .def("voxc.wgpu.describe",
           [](const ffi::String& backend) { return ffi::String(Context::Global()->Describe(backend)); })
      .def("voxc.wgpu.stats", []() { return ffi::String(Context::Global()->Stats()); });
}

}  // namespace voxc_wgpu
