// Dawn's own verdict on whether every kernel of a web bundle runs within WebGPU's DEFAULT limits
// (16 KiB of workgroup storage, 8 storage buffers and 256 invocations per kernel), which every
// adapter grants: each kernel's WGSL (from the bundle's model.wasm) becomes a pipeline on a device
// requested without raised limits.  targets.webgpu.kernel_report reads the same limits off the WGSL
// text at build time (tests/test_webgpu_limits.py); this checks that reading where it counts.
//
//   VOXC_WEBGPU_MODULE=.../node_modules/webgpu node bench/webgpu_default_limits.mjs BUNDLE_DIR
//
// Prints {kernels, rejected: [{name, message}], limits} and exits 1 if a kernel was rejected.  A
// weight-less bundle is enough (bench/webgpu_pack.py's full_q4k).  On a CPU-only machine point the
// Vulkan loader at SwiftShader (VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const bundleDir = resolve(process.argv[2] ?? ".");
const webgpuModule = process.env.VOXC_WEBGPU_MODULE
  ? pathToFileURL(join(process.env.VOXC_WEBGPU_MODULE, "index.js")).href : "webgpu";
const { create, globals } = await import(webgpuModule);
Object.assign(globalThis, globals);
const gpu = create([]);   // held: Dawn's instance lives as long as this object
const adapter = await gpu.requestAdapter();
if (!adapter) throw new Error("no WebGPU adapter");
const device = await adapter.requestDevice();   // no requiredLimits: the defaults
const tvmjs = createRequire(import.meta.url)(join(bundleDir, "tvmjs.js"));
const wasm = readFileSync(join(bundleDir, "model.wasm"));
const tvm = await tvmjs.instantiate(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.length),
                                    tvmjs.createPolyfillWASI(), () => {});
tvm.initWebGPU(device);
tvm.beginScope();
const mod = tvm.createVirtualMachine(tvm.webgpu()).getInternalModule();
const kernels = JSON.parse(mod.getFunction("webgpu.get_fmap", true)());
const shaderOf = mod.getFunction("webgpu.get_shader");
const names = Object.keys(kernels);
const made = await Promise.allSettled(names.map((name) => device.createComputePipelineAsync({
  layout: "auto", compute: { module: device.createShaderModule({ code: shaderOf(name) }), entryPoint: name } })));
const rejected = names.map((name, i) => ({ name, reason: made[i].reason }))
  .filter((r) => r.reason !== undefined).map(({ name, reason }) => ({ name, message: String(reason?.message ?? reason) }));
const l = device.limits;
console.log(JSON.stringify({ bundle: bundleDir, adapter: adapter.info?.description, kernels: names.length, rejected,
                             limits: { maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
                                       maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
                                       maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup } },
                           null, 1));
process.exit(rejected.length ? 1 : 0);
