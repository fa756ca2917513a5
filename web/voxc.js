// voxc.js: load a voxc WebGPU bundle in the browser and run it (ES module, no dependencies
// besides tvmjs, which the bundle ships as tvmjs.js).
//
//   import { Voxc } from "./voxc.js";
//   const voxc = await Voxc.load("/bundle/", { onProgress: (r) => console.log(r.text) });
//   const [y] = await voxc.runFunction("forward", [{ data: x, shape: [1, 7, 64] }]);
//
// A bundle (targets/webgpu.py: write_bundle) is a folder with voxc-bundle.json (manifest),
// model.wasm, tvmjs.js and tensor-cache.json + params_shard_*.bin.  Weights are fetched shard by
// shard, kept in the Cache API (a second visit downloads nothing) under a scope named after the
// bundle's content hash, and written straight into GPU buffers: they never sit in the wasm heap.
// Every GPU read is async (mapAsync under the hood), so nothing blocks the page.

const CACHE_PREFIX = "voxc/";

export class VoxcError extends Error {
  constructor(message, { cause, code } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = "VoxcError";
    this.code = code ?? "error";
  }
}

function bytesMB(n) {
  return `${Math.round(n / (1 << 20))} MB`;
}

/**
 * Check that this browser can run a bundle, before anything is downloaded.
 * Resolves to {adapter, info, features, limits}; throws a VoxcError whose message says what is
 * missing and what to do about it.
 */
export async function checkWebGPU({
  requiredFeatures = [],
  minStorageBufferBindingSize = 0,
  minWorkgroupSize = 0,
  powerPreference = "high-performance",
} = {}) {
  if (typeof globalThis.isSecureContext === "boolean" && !globalThis.isSecureContext) {
    throw new VoxcError(
      "WebGPU needs a secure context: serve this page over https:// or from localhost.",
      { code: "insecure-context" });
  }
  const gpu = globalThis.navigator?.gpu;
  if (!gpu) {
    throw new VoxcError(
      "This browser has no WebGPU (navigator.gpu is missing). Use a current Chrome or Edge " +
      "(113+), Safari 26+, or Firefox with WebGPU enabled; on Linux Chrome may need " +
      "chrome://flags/#enable-unsafe-webgpu.", { code: "no-webgpu" });
  }
  const adapter = await gpu.requestAdapter({ powerPreference });
  if (!adapter) {
    throw new VoxcError(
      "WebGPU is present but no GPU adapter is available (requestAdapter() returned null). " +
      "The GPU may be blocklisted or disabled: check chrome://gpu, update the graphics driver, " +
      "or try chrome://flags/#enable-unsafe-webgpu.", { code: "no-adapter" });
  }
  const limits = adapter.limits;
  const info = adapter.info ?? {};
  for (const f of requiredFeatures) {
    if (!adapter.features.has(f)) {
      const why = f === "shader-f16"
        ? " This build computes in float16; use a float32 build of the model on this GPU/browser."
        : "";
      throw new VoxcError(`This GPU/browser lacks the WebGPU feature "${f}".${why}`,
        { code: "missing-feature" });
    }
  }
  if (minStorageBufferBindingSize > limits.maxStorageBufferBindingSize) {
    throw new VoxcError(
      `The model binds buffers of ${bytesMB(minStorageBufferBindingSize)}, but this GPU allows ` +
      `only ${bytesMB(limits.maxStorageBufferBindingSize)} per storage buffer binding ` +
      `(maxStorageBufferBindingSize).`, { code: "limit" });
  }
  if (minWorkgroupSize > limits.maxComputeInvocationsPerWorkgroup) {
    throw new VoxcError(
      `The model's kernels use ${minWorkgroupSize} invocations per workgroup, but this GPU allows ` +
      `${limits.maxComputeInvocationsPerWorkgroup} (maxComputeInvocationsPerWorkgroup); rebuild ` +
      `with a smaller max_workgroup_size.`, { code: "limit" });
  }
  return { adapter, info, features: [...adapter.features], limits };
}

// tvmjs.js is a UMD bundle: imported as a module it registers itself as globalThis.tvmjs.
async function importTvmjs(url) {
  if (!globalThis.tvmjs) {
    await import(url);
  }
  if (!globalThis.tvmjs) {
    throw new VoxcError(`${url} did not define tvmjs`);
  }
  return globalThis.tvmjs;
}

// Fetch through the Cache API (when there is one) with byte-level progress.
async function cachedFetch(url, scope, onBytes) {
  const cache = globalThis.caches ? await caches.open(scope) : null;
  let response = cache ? await cache.match(url) : undefined;
  if (!response) {
    response = await fetch(url);
    if (!response.ok) {
      throw new VoxcError(`GET ${url} failed: ${response.status} ${response.statusText}`);
    }
    if (cache) {
      await cache.put(url, response.clone());
    }
  }
  const total = Number(response.headers.get("content-length")) || 0;
  if (!response.body || !onBytes) {
    return new Uint8Array(await response.arrayBuffer());
  }
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    onBytes(received, total);
  }
  const out = new Uint8Array(received);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

// Old bundles' caches: a rebuilt model gets a new id, so its predecessor's weights can go.
async function dropStaleCaches(keep) {
  if (!globalThis.caches) return;
  for (const name of await caches.keys()) {
    if (name.startsWith(CACHE_PREFIX) && name !== keep) {
      await caches.delete(name);
    }
  }
}

const TYPED = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array,
  int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array,
  int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
};

function dtypeOf(data) {
  for (const [name, T] of Object.entries(TYPED)) {
    if (data instanceof T && name !== "float16") return name;
  }
  throw new VoxcError("input data must be a typed array (or give dtype)");
}

export class Voxc {
  constructor(fields) {
    Object.assign(this, fields);
  }

  /**
   * Load a bundle.  onProgress receives {phase, progress (0..1), timeElapsed (s), text}, shaped
   * like WebLLM's InitProgressReport; phases: "check", "runtime", "wasm", "weights",
   * "pipelines", "ready".
   */
  static async load(baseUrl, { onProgress = () => {}, tvmjsUrl, powerPreference = "high-performance",
                               logger = console.log } = {}) {
    const t0 = performance.now();
    const base = new URL(baseUrl, globalThis.location?.href);
    const report = (phase, progress, text) =>
      onProgress({ phase, progress, timeElapsed: (performance.now() - t0) / 1000, text });

    report("check", 0, "Checking WebGPU support");
    const manifestResp = await fetch(new URL("voxc-bundle.json", base), { cache: "no-cache" });
    if (!manifestResp.ok) {
      throw new VoxcError(`no voxc bundle at ${base}: voxc-bundle.json: ${manifestResp.status}`);
    }
    const manifest = await manifestResp.json();
    const gpuInfo = await checkWebGPU({
      requiredFeatures: manifest.required_features ?? [],
      minStorageBufferBindingSize: manifest.largest_param_bytes ?? 0,
      minWorkgroupSize: manifest.max_workgroup_size ?? 0,
      powerPreference,
    });

    report("runtime", 0, "Loading the TVM runtime");
    const tvmjs = await importTvmjs(tvmjsUrl ?? new URL("tvmjs.js", base).href);
    const scope = CACHE_PREFIX + manifest.id;
    await dropStaleCaches(scope);

    const wasmUrl = new URL(manifest.wasm ?? "model.wasm", base).href;
    const wasm = await cachedFetch(wasmUrl, scope, (got, total) =>
      report("wasm", total ? got / total : 0, `Fetching model code: ${bytesMB(got)}`));
    const tvm = await tvmjs.instantiate(wasm.buffer, tvmjs.createPolyfillWASI(), logger);

    // tvmjs asks the adapter for large buffers (1 GB, falling back to the defaults) and enables
    // shader-f16/subgroups when present.
    const gpu = await tvmjs.detectGPUDevice(powerPreference);
    if (!gpu) {
      throw new VoxcError("WebGPU device creation failed", { code: "no-device" });
    }
    tvm.initWebGPU(gpu.device);
    const dev = tvm.webgpu();

    if (manifest.has_params) {
      tvm.registerInitProgressCallback((r) => report("weights", r.progress, r.text));
      await tvm.fetchTensorCache(base.href, dev, { cacheScope: scope, cacheType: "cache" });
    }

    report("pipelines", 0, "Compiling GPU kernels");
    tvm.beginScope();
    const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(dev));
    await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
    let params = [];
    if (manifest.has_params && manifest.param_names.length) {
      const arr = tvm.getParamsFromCacheByName(manifest.param_names);
      params = manifest.param_names.map((_, i) => tvm.detachFromCurrentScope(arr.get(i)));
    }
    tvm.endScope();

    report("ready", 1, "Ready");
    return new Voxc({ tvmjs, tvm, vm, dev, params, manifest, gpu: { ...gpuInfo, device: gpu.device } });
  }

  /**
   * Call a function of the model: inputs are {data: TypedArray, shape, dtype?} (dtype defaults to
   * the array's type; float16 data is a Uint16Array with dtype "float16").  The model's
   * parameters are appended after the inputs (the Relax functions take them last) unless
   * withParams is false.  Resolves to [{data, shape, dtype}] read back from the GPU.
   */
  async runFunction(name, inputs, { withParams = true } = {}) {
    const { tvm, dev } = this;
    tvm.beginScope();
    try {
      const args = inputs.map((x) => this.#toDevice(x));
      if (withParams) args.push(...this.params);
      const fn = this.vm.getFunction(name);
      const ret = fn(...args);
      const outs = this.#flatten(ret);
      const host = outs.map((t) => {
        const cpu = tvm.empty(t.shape, t.dtype, tvm.cpu());
        cpu.copyFrom(t);  // queued GPU -> staging copy; valid after sync
        return cpu;
      });
      await dev.sync();
      return host.map((cpu) => {
        const bytes = cpu.toRawBytes();
        const T = TYPED[cpu.dtype] ?? Uint8Array;
        return { data: new T(bytes.buffer, bytes.byteOffset, bytes.byteLength / T.BYTES_PER_ELEMENT),
                 shape: [...cpu.shape], dtype: cpu.dtype };
      });
    } finally {
      tvm.endScope();
    }
  }

  #toDevice({ data, shape, dtype }) {
    const tvm = this.tvm;
    dtype = dtype ?? dtypeOf(data);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const arr = tvm.empty(shape, dtype, this.dev);
    if (bytes.length % 4 === 0) {
      arr.copyFromRawBytes(bytes);  // queue.writeBuffer straight from JS memory
    } else {  // WebGPU copies need 4-byte multiples: go through a small CPU tensor
      arr.copyFrom(tvm.empty(shape, dtype, tvm.cpu()).copyFromRawBytes(bytes));
    }
    return arr;
  }

  #flatten(ret) {
    if (ret instanceof this.tvmjs.TVMArray) {  // a tuple result
      const out = [];
      for (let i = 0; i < ret.size(); i++) out.push(...this.#flatten(ret.get(i)));
      return out;
    }
    return [ret];
  }

  dispose() {
    this.params.forEach((p) => p.dispose());
    this.vm.dispose();
    this.tvm.dispose();
  }
}
