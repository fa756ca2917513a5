// voxc.js: Voxtral Realtime in the browser on WebGPU (ES module; its only dependency is tvmjs,
// which the bundle ships as tvmjs.js).
//
//   import { Voxc } from "./voxc.js";
//   const model = await Voxc.load("./", { onProgress: (r) => console.log(r.phase, r.progress, r.text) });
//   const s = model.stream({ delayMs: 480 });
//   let text = await s.feed(float32Array16k);   // the text delta of this chunk (any length)
//   text += await s.finish();                   // end of audio: the rest of the transcript
//
// The stream is voxc/runtime/session.py's StreamingSession line for line: the same mel framing
// (MelFramer = voxc.runtime.framing.StreamingMelFramer, with its start reflection and end flush), the
// left padding of silence, the prompt [BOS] + [STREAMING_PAD] * (left_pad + delay), one decoder
// step per 80 ms of audio, the right padding at finish(), the end one position before the audio
// ends (or at EOS), incremental UTF-8 decoding of token bytes and no special tokens in the text.
// The state (conv contexts, encoder/decoder ring caches, audio embeddings) stays in GPU buffers
// between calls; each step reads back only the next token id (4 bytes), asynchronously.  The ring
// caches are paged (KvPages = voxc.runtime.kv_pages.KvPages): pools of pages that grow with the audio
// the streams have heard, not a whole window per stream up front.
//
// A bundle (`voxc build --target webgpu`) is a folder with voxc-artifact.json (the manifest, whose
// contract voxc/artifact.py defines: every shape, constant and default below comes from it),
// model.wasm, tvmjs.js, tokenizer.json and tensor-cache.json + params_shard_*.bin.  Weights are
// fetched shard by shard (none near the 2 GB ArrayBuffer limit), kept in the Cache API under a
// scope named after the bundle's content hash (a second visit downloads nothing) and written
// straight into GPU buffers: they never sit in the 4 GB wasm heap.  No GPU read is synchronous.

const CACHE_PREFIX = "voxc/";
const BUNDLE_MANIFEST = "voxc-artifact.json";

export class VoxcError extends Error {
  constructor(message, { cause, code } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = "VoxcError";
    this.code = code ?? "error";
  }
}

function bytesMB(n) {
  return n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GB` : `${Math.round(n / (1 << 20))} MB`;
}

// ---- what the GPU must offer --------------------------------------------------------------------

/**
 * Pages of a paged state entry (a key/value cache: the manifest's axis "pages") for `streams` streams:
 * {initial, max} (the pool a model starts with, and the most it grows to: every stream's whole window).
 * `initial`: a first size asked for (Voxc.load's kvPages), else every stream's first seconds.
 */
export function kvPoolPages(spec, streams, initial = null) {
  const max = spec.pages_per_stream * streams;
  return { initial: Math.max(1, Math.min(max, initial ?? spec.initial_pages_per_stream * streams)), max };
}

/** Voxc.load's kvPages option for the cache `name`: a number (every pool), {name: pages}, or null. */
function kvPagesOption(kvPages, name) {
  if (kvPages == null) return null;
  const n = typeof kvPages === "number" ? kvPages : kvPages[name];
  if (n == null) return null;
  if (!Number.isInteger(n) || n < 1) throw new VoxcError(`kvPages must be whole numbers >= 1, not ${JSON.stringify(kvPages)}`);
  return n;
}

/**
 * What a bundle needs from the GPU (from its manifest), for `maxStreams` concurrent streams:
 * features and kernel limits, and its memory: every buffer voxc allocates that can approach a
 * limit (the largest weight tensor, each state buffer with one slot per stream: a per-layer state,
 * a key/value cache, is one buffer per layer), the weights' and the state's totals.  `buffers` is
 * sorted largest first; each is {name, what, bytes (one buffer at its largest), totalBytes (all of its
 * buffers as allocated at load), maxTotalBytes (all of its buffers at their largest)}.  The key/value
 * caches are pools of pages that start small and grow as streams go (up to every stream's whole
 * window): `stateBytes`/`totalBytes` are what a load allocates, `maxStateBytes`/`maxTotalBytes` the
 * most the caches grow to; a buffer's limit applies to its largest size (it must be able to grow).
 */
export function bundleRequirements(manifest, { maxStreams = 1, kvPages = null } = {}) {
  const gpu = manifest.gpu ?? {};
  const streams = Math.max(1, maxStreams | 0);
  const sizeOf = (p) => p.shape.reduce((a, b) => a * b, 1) * (DTYPE_BYTES[p.dtype] ?? 4);
  const buffers = [];
  let weightsBytes = gpu.total_param_bytes ?? 0;
  if (manifest.params?.length) {
    let largest = manifest.params[0];
    for (const p of manifest.params) if (sizeOf(p) > sizeOf(largest)) largest = p;
    buffers.push({ name: largest.name, kind: "weight", what: `the weight tensor ${largest.name}`,
                   bytes: sizeOf(largest) });
    weightsBytes ||= manifest.params.reduce((a, p) => a + sizeOf(p), 0);
  } else if (manifest.largest_param_bytes) {
    buffers.push({ name: "weights", kind: "weight", what: "a weight tensor", bytes: manifest.largest_param_bytes });
  }
  let stateBytes = 0;
  let maxStateBytes = 0;
  const poolPages = {};   // a key/value cache's pages at load
  for (const [name, spec] of Object.entries(manifest.state ?? {})) {
    const tensorBytes = spec.tensor_bytes_per_stream ?? spec.bytes_per_stream;
    const maxTotalBytes = spec.bytes_per_stream * streams;
    if (spec.axis === "pages") poolPages[name] = kvPoolPages(spec, streams, kvPagesOption(kvPages, name)).initial;
    const totalBytes = spec.axis === "pages" ? poolPages[name] * spec.bytes_per_page : maxTotalBytes;
    stateBytes += totalBytes;
    maxStateBytes += maxTotalBytes;
    const per = streams > 1 ? `, ${streams} streams of ${bytesMB(tensorBytes)}` : "";
    const layer = spec.layers ? `one layer of ${spec.layers}: ` : "";
    buffers.push({ name, kind: "state", bytes: tensorBytes * streams, totalBytes, maxTotalBytes,
                   what: `${STATE_HELP[name] ?? `the state buffer ${name}`} (${layer}${name}${per})` });
  }
  if (!manifest.state && gpu.largest_state_bytes_per_stream) {   // a manifest without its state section
    const bytes = gpu.largest_state_bytes_per_stream * streams;
    stateBytes = maxStateBytes = (gpu.state_bytes_per_stream ?? 0) * streams;
    buffers.push({ name: "state", kind: "state", what: "the model's state", bytes });
  }
  buffers.sort((a, b) => b.bytes - a.bytes);
  const largest = buffers[0] ?? { what: "a weight tensor", bytes: 0 };
  return {
    largestName: largest.what,
    requiredFeatures: manifest.required_features ?? [],
    maxBufferSize: largest.bytes,
    maxStorageBufferBindingSize: largest.bytes,
    maxComputeInvocationsPerWorkgroup: manifest.max_workgroup_size ?? 0,
    maxStorageBuffersPerShaderStage: gpu.max_storage_buffers_per_kernel ?? 0,
    maxComputeWorkgroupStorageSize: gpu.max_workgroup_storage_bytes ?? 0,
    buffers,
    maxStreams: streams,
    weightsBytes,
    stateBytes,
    totalBytes: weightsBytes + stateBytes,
    maxStateBytes,
    maxTotalBytes: weightsBytes + maxStateBytes,
    poolPages,
  };
}

const DTYPE_BYTES = { float32: 4, float16: 2, uint32: 4, int32: 4, uint8: 1, int8: 1, uint16: 2 };

// How messages name each paged cache (voxc/runtime/model.py's KV_CACHE_NAMES).
const KV_CACHE_NAMES = { enc_cache: "the encoder's key/value cache", dec_cache: "the decoder's key/value cache" };

const STATE_HELP = {
  dec_cache: "the decoder's key/value cache (decoder layers x window x kv heads, pages shared by the streams)",
  enc_cache: "the encoder's key/value cache (pages shared by the streams)",
  audio_ring: "the audio embeddings between encoder and decoder",
};

const LIMIT_HELP = {
  maxComputeInvocationsPerWorkgroup: "invocations per workgroup",
  maxStorageBuffersPerShaderStage: "storage buffers per kernel",
  maxComputeWorkgroupStorageSize: "workgroup memory per kernel",
};

const BUFFER_LIMITS = {
  maxBufferSize: "the largest GPU buffer",
  maxStorageBufferBindingSize: "the largest buffer one kernel binds",
};

/**
 * The memory this computer is known to have, in bytes, or null: navigator.deviceMemory (Chrome,
 * Edge: the RAM in GiB rounded down to a power of two, at most 8) bounds it from above by twice
 * its value below 8.  WebGPU exposes no GPU memory size; an integrated GPU (most laptops) shares
 * this memory, so a model larger than it cannot load.  `deviceMemory` (GiB) overrides the browser's.
 */
function memoryUpperBound(deviceMemory = globalThis.navigator?.deviceMemory) {
  if (typeof deviceMemory !== "number" || !(deviceMemory > 0) || deviceMemory >= 8) return null;
  return 2 * deviceMemory * 2 ** 30;
}

/**
 * Check that this browser can run a bundle, before anything large is downloaded.
 * Resolves to {adapter, info, features, limits, memory}; throws a VoxcError whose message says
 * what is missing and what to do about it: code "limit" for a kernel limit or a buffer larger than
 * the adapter allows (the message names the buffer), "memory" for a model larger than the memory
 * the browser reports (navigator.deviceMemory; `deviceMemory` in GiB overrides it).
 */
export async function checkWebGPU({ requirements = {}, powerPreference = "high-performance", deviceMemory } = {}) {
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
  for (const f of requirements.requiredFeatures ?? []) {
    if (!adapter.features.has(f)) {
      const why = f === "shader-f16"
        ? " This build computes in float16; use a float32 build of the model on this GPU/browser."
        : "";
      throw new VoxcError(`This GPU/browser lacks the WebGPU feature "${f}".${why}`,
        { code: "missing-feature" });
    }
  }
  for (const [name, what] of Object.entries(LIMIT_HELP)) {
    const need = requirements[name] ?? 0;
    if (need > limits[name]) {
      const amount = (n) => (name.endsWith("Size") ? bytesMB(n) : String(n));
      throw new VoxcError(
        `The model needs ${amount(need)} for ${what} (${name}), but this GPU/browser allows ${amount(limits[name])}. ` +
        (name.endsWith("Size") ? "Use a GPU/browser with higher limits." : "Rebuild the model for smaller workgroups or fewer bindings."),
        { code: "limit" });
    }
  }
  // every large buffer against both buffer limits, largest first: one message names every buffer
  // that does not fit (a user who fixes one should not meet the next on the following try)
  const buffers = requirements.buffers ??
    [{ what: requirements.largestName ?? "a buffer", bytes: requirements.maxBufferSize ?? 0 }];
  const tooLarge = buffers
    .map((buf) => ({ buf, above: Object.keys(BUFFER_LIMITS).filter((name) => buf.bytes > limits[name]) }))
    .filter(({ above }) => above.length);
  if (tooLarge.length) {
    const needs = tooLarge.map(({ buf, above }) =>
      `a ${bytesMB(buf.bytes)} buffer for ${buf.what}, above ${above.join(" and ")}`);
    const allows = Object.entries(BUFFER_LIMITS)
      .filter(([name]) => tooLarge.some(({ above }) => above.includes(name)))
      .map(([name, what]) => `${bytesMB(limits[name])} for ${what} (${name})`);
    const streams = (requirements.maxStreams ?? 1) > 1 && tooLarge.some(({ buf }) => /stream/.test(buf.what))
      ? ` Fewer streams at once (maxStreams, now ${requirements.maxStreams}) need less.` : "";
    throw new VoxcError(
      `The model needs ${needs.join("; ")}, but this GPU/browser allows ${allows.join(" and ")}.${streams} ` +
      "Use a GPU/browser with higher limits (Chrome or Edge on a discrete GPU allow 2 GB or more), or a " +
      "smaller build of the model.", { code: "limit" });
  }
  const memory = memoryUpperBound(deviceMemory);
  if (memory !== null && (requirements.totalBytes ?? 0) > memory) {
    const parts = [`${bytesMB(requirements.weightsBytes ?? 0)} of weights`,
                   ...buffers.filter((b) => b.kind === "state" && (b.totalBytes ?? b.bytes) >= 1 << 20)
                     .map((b) => `${bytesMB(b.totalBytes ?? b.bytes)} for ${STATE_HELP[b.name] ?? `the state ${b.name}`}`)];
    const most = (requirements.maxTotalBytes ?? 0) > requirements.totalBytes
      ? ` (its key/value caches grow with the audio heard, to ${bytesMB(requirements.maxTotalBytes)} in all at most)` : "";
    throw new VoxcError(
      `The model needs ${bytesMB(requirements.totalBytes)} of GPU memory to start (${parts.join(", ")})${most}, but ` +
      `this computer reports less than ${bytesMB(memory)} of memory (navigator.deviceMemory). ` +
      "Use a computer with more memory or a discrete GPU, or a smaller build of the model.",
      { code: "memory" });
  }
  return { adapter, info, features: [...adapter.features], limits, memory };
}

// The device voxc asks for: the adapter's own maxima for the limits a model leans on (tvmjs's
// detectGPUDevice caps buffers at 1 GB, below what the 4B model's decoder cache needs), and
// shader-f16 only when the build uses it; timestamp-query only for kernel profiling.
async function requestDevice(adapter, requirements, { profileKernels = false } = {}) {
  const l = adapter.limits;
  const requiredLimits = {
    maxBufferSize: l.maxBufferSize,
    maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
    maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
    maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
    maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
    maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
  };
  const requiredFeatures = (requirements.requiredFeatures ?? []).filter((f) => adapter.features.has(f));
  if (profileKernels) {
    if (!adapter.features.has("timestamp-query")) {
      throw new VoxcError('kernel profiling needs the WebGPU feature "timestamp-query", which this GPU/browser ' +
                          "does not offer (Chrome: chrome://flags/#enable-webgpu-developer-features)",
                          { code: "missing-feature" });
    }
    requiredFeatures.push("timestamp-query");
  }
  try {
    return await adapter.requestDevice({ requiredLimits, requiredFeatures });
  } catch (err) {
    throw new VoxcError(`WebGPU device creation failed: ${err.message ?? err}`, { cause: err, code: "no-device" });
  }
}

// ---- kernel profiling (opt-in: Voxc.load(url, { profileKernels: true })) ------------------------

// WebGPU's largest query set: 2048 passes of two timestamps each; more passes take more sets.
const QUERIES_PER_SET = 4096;

/**
 * GPU time per kernel, from timestamp queries.  tvmjs encodes every kernel dispatch as a compute
 * pass of its own, so the timestamps a pass writes at its beginning and end time one kernel, and
 * the pass's pipeline names it (the entry point: the kernel's name in the bundle's WGSL).  The
 * profiler wraps the device's pipeline and encoder creation, so it must be installed before tvmjs
 * creates either; a model loaded without profiling never installs it and pays nothing.
 * Between start() and stop() every pass is timed.  Time between passes (launch gaps, host work)
 * belongs to no kernel: the kernels' sum is at most the wall time of what ran.
 */
export class KernelProfiler {
  constructor(device) {
    this.device = device;
    this.kernelOf = new WeakMap();    // GPUComputePipeline -> kernel name
    this.querySets = [];              // kept between profiles
    this.passKernels = [];            // kernel name of each timed pass, in submission order
    this.recording = false;
    this.#wrapDevice();
  }

  #wrapDevice() {
    const device = this.device;
    const createPipeline = device.createComputePipeline.bind(device);
    const createPipelineAsync = device.createComputePipelineAsync.bind(device);
    const remember = (desc, pipeline) => {
      this.kernelOf.set(pipeline, desc.compute?.entryPoint ?? desc.label ?? "(unnamed)");
      return pipeline;
    };
    device.createComputePipeline = (desc) => remember(desc, createPipeline(desc));
    device.createComputePipelineAsync = (desc) => createPipelineAsync(desc).then((p) => remember(desc, p));
    this.createUntimedEncoder = device.createCommandEncoder.bind(device);
    device.createCommandEncoder = (desc) => {
      const encoder = this.createUntimedEncoder(desc);
      const beginPass = encoder.beginComputePass.bind(encoder);
      encoder.beginComputePass = (passDesc) => (this.recording ? this.#timedPass(beginPass, passDesc) : beginPass(passDesc));
      return encoder;
    };
  }

  #timedPass(beginPass, passDesc = {}) {
    const index = this.passKernels.length;
    const set = Math.floor((2 * index) / QUERIES_PER_SET);
    if (set === this.querySets.length) {
      this.querySets.push(this.device.createQuerySet({ type: "timestamp", count: QUERIES_PER_SET }));
    }
    const first = (2 * index) % QUERIES_PER_SET;
    const pass = beginPass({ ...passDesc, timestampWrites: {
      querySet: this.querySets[set], beginningOfPassWriteIndex: first, endOfPassWriteIndex: first + 1 } });
    this.passKernels.push("(no pipeline)");
    const setPipeline = pass.setPipeline.bind(pass);
    pass.setPipeline = (pipeline) => {
      this.passKernels[index] = this.kernelOf.get(pipeline) ?? pipeline.label ?? "(unnamed)";
      setPipeline(pipeline);
    };
    return pass;
  }

  start() {
    if (this.recording) throw new VoxcError("a kernel profile is already being recorded");
    this.passKernels = [];
    this.recording = true;
  }

  /**
   * Stop timing and read the timestamps back.  The caller has submitted every timed pass first
   * (tvmjs holds dispatches in a pending encoder until a sync).  Resolves to {passes, gpuMs (the
   * kernels' sum), spanMs (first pass's beginning to last pass's end), invalidPasses (an end
   * before its beginning: timestamps are not guaranteed monotonic), kernels: [{name, count,
   * totalMs, meanMs, maxMs}] largest total first}.
   */
  async stop() {
    this.recording = false;
    const passes = this.passKernels.length;
    const queries = 2 * passes;
    const result = { passes, gpuMs: 0, spanMs: 0, invalidPasses: 0, kernels: [] };
    if (!passes) return result;
    const bytes = queries * 8;
    const resolved = this.device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
    const readable = this.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const encoder = this.createUntimedEncoder();
    for (let set = 0; set * QUERIES_PER_SET < queries; set++) {
      const count = Math.min(QUERIES_PER_SET, queries - set * QUERIES_PER_SET);
      encoder.resolveQuerySet(this.querySets[set], 0, count, resolved, set * QUERIES_PER_SET * 8);
    }
    encoder.copyBufferToBuffer(resolved, 0, readable, 0, bytes);
    this.device.queue.submit([encoder.finish()]);
    await readable.mapAsync(GPUMapMode.READ);
    const ticks = new BigUint64Array(readable.getMappedRange().slice(0));   // nanoseconds
    readable.unmap();
    readable.destroy();
    resolved.destroy();
    const byKernel = new Map();
    let first = null;
    let last = null;
    for (let i = 0; i < passes; i++) {
      const begin = ticks[2 * i];
      const end = ticks[2 * i + 1];
      if (end < begin) {
        result.invalidPasses++;
        continue;
      }
      if (first === null || begin < first) first = begin;
      if (last === null || end > last) last = end;
      const ms = Number(end - begin) / 1e6;
      const k = byKernel.get(this.passKernels[i]) ?? { name: this.passKernels[i], count: 0, totalMs: 0, maxMs: 0 };
      k.count++;
      k.totalMs += ms;
      k.maxMs = Math.max(k.maxMs, ms);
      byKernel.set(k.name, k);
      result.gpuMs += ms;
    }
    result.spanMs = first === null ? 0 : Number(last - first) / 1e6;
    result.kernels = [...byKernel.values()].map((k) => ({ ...k, meanMs: k.totalMs / k.count }))
      .sort((a, b) => b.totalMs - a.totalMs);
    return result;
  }

  dispose() {
    this.querySets.forEach((q) => q.destroy());
    this.querySets = [];
  }
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
      try {
        await cache.put(url, response.clone());
      } catch (err) {  // QuotaExceededError, private windows: run without caching
        console.warn(`voxc: could not cache ${url}: ${err}`);
      }
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

// A response for url from the Cache API, else from the network (and then stored in the cache while
// it streams: the body is teed, not read into memory first).
async function cachedResponse(url, scope) {
  const cache = globalThis.caches ? await caches.open(scope) : null;
  const hit = cache ? await cache.match(url) : undefined;
  if (hit) return { response: hit, cached: true };
  const response = await fetch(url);
  if (!response.ok) {
    throw new VoxcError(`GET ${url} failed: ${response.status} ${response.statusText}`);
  }
  if (!cache) return { response, cached: false };
  const stored = cache.put(url, response.clone()).catch((err) => {   // QuotaExceededError, private windows
    console.warn(`voxc: could not cache ${url}: ${err}`);
  });
  return { response, cached: false, stored };
}

/** Reads a response body record by record: only the bytes of the record being assembled are held. */
class BodyCursor {
  constructor(response) {
    this.reader = response.body ? response.body.getReader() : null;
    this.response = response;
    this.chunk = new Uint8Array(0);
    this.offset = 0;   // body offset of chunk[0]
  }

  async #more() {
    if (!this.reader) {   // no streams (old runtimes): the whole body at once
      if (this.response) {
        this.chunk = new Uint8Array(await this.response.arrayBuffer());
        this.response = null;
        return true;
      }
      return false;
    }
    const { done, value } = await this.reader.read();
    if (done) return false;
    this.offset += this.chunk.length;
    this.chunk = value;
    return true;
  }

  /** The bytes [start, start + n) of the body (start never goes back), copied into one array. */
  async read(start, n, onBytes) {
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const from = start + filled - this.offset;
      if (from >= 0 && from < this.chunk.length) {
        const take = Math.min(n - filled, this.chunk.length - from);
        out.set(this.chunk.subarray(from, from + take), filled);
        filled += take;
        continue;
      }
      const before = this.offset + this.chunk.length;
      if (!(await this.#more())) throw new VoxcError("a weight shard ended early (truncated download?)");
      onBytes?.(this.offset + this.chunk.length - before);
    }
    return out;
  }

  async drain(onBytes) {
    const before = this.offset + this.chunk.length;
    while (await this.#more()) onBytes?.(this.chunk.length);
    return this.offset + this.chunk.length - before;
  }
}

/**
 * Weights into GPU buffers, registered in tvmjs's tensor cache by name.  Shards (tvmjs's
 * tensor-cache.json format) are streamed: each record's bytes go to queue.writeBuffer as soon as
 * they have arrived, so neither a shard nor the model is ever held whole in JS or wasm memory
 * (each record stays below 128 MiB by construction of the bundle).  Three shards download at once.
 * mode "random" fills the parameters with small pseudo-random values instead (benchmarks of
 * weight-less bundles): float32 tensors uniform in +-0.02; quantized ones (uint32) random packed
 * levels in ``*.qweight`` and, in ``*.scales``, f16 halves in [2^-11, 2^-10) (finite Q4_K/Q8_0
 * scales and mins, whatever the header layout).
 */
async function loadWeights(tvm, dev, base, manifest, scope, report) {
  const t0 = performance.now();
  if (manifest.weights_mode === "none" || !manifest.has_params) {
    const specs = manifest.params ?? [];
    const block = new Float32Array(1 << 18);
    const words = new Uint32Array(block.length);
    const halves = new Uint32Array(block.length);
    let seed = 12345;
    for (let i = 0; i < block.length; i++) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      block[i] = ((seed >>> 8) / (1 << 24) - 0.5) * 0.04;
      words[i] = (seed ^ (seed << 13) ^ (i * 2654435761)) >>> 0;
      halves[i] = ((0x1000 | (words[i] & 0x3ff)) | ((0x1000 | ((words[i] >>> 16) & 0x3ff)) << 16)) >>> 0;
    }
    const total = specs.reduce((a, p) => a + p.shape.reduce((x, y) => x * y, 1) * 4, 0);
    let done = 0;
    for (const p of specs) {
      if (p.dtype !== "float32" && p.dtype !== "uint32") {
        throw new VoxcError(`random weights support float32 and uint32 (quantized) only (${p.name}: ${p.dtype})`);
      }
      const n = p.shape.reduce((x, y) => x * y, 1);
      const src = p.dtype === "float32" ? block : p.name.endsWith(".scales") ? halves : words;
      const data = p.dtype === "float32" ? new Float32Array(n) : new Uint32Array(n);
      for (let off = 0; off < n; off += block.length) data.set(src.subarray(0, Math.min(block.length, n - off)), off);
      tvm.beginScope();
      const t = tvm.empty(p.shape, p.dtype, dev);
      t.copyFromRawBytes(new Uint8Array(data.buffer));
      tvm.tensorCacheUpdate(p.name, t, true);
      tvm.endScope();
      done += n * 4;
      report("weights", done / total, `Random weights: ${bytesMB(done)} of ${bytesMB(total)}`);
    }
    await dev.sync();
    return { bytes: total, seconds: (performance.now() - t0) / 1000, fromCache: false };
  }
  const index = JSON.parse(new TextDecoder().decode(
    await cachedFetch(new URL(manifest.weights, base).href, scope)));
  const shards = index.records;
  const total = shards.reduce((a, s) => a + s.nbytes, 0);
  let received = 0;
  let fromCache = true;
  const onBytes = (n) => {
    received += n;
    report("weights", total ? received / total : 1,
           `${fromCache ? "Loading" : "Downloading"} weights: ${bytesMB(received)} of ${bytesMB(total)}`);
  };
  const opened = [];
  const open = (i) => (opened[i] ??= cachedResponse(new URL(shards[i].dataPath, base).href, scope));
  const pending = [];
  for (let i = 0; i < shards.length; i++) {
    for (let j = i; j < Math.min(shards.length, i + 3); j++) open(j);
    const { response, cached, stored } = await open(i);
    fromCache &&= cached;
    if (stored) pending.push(stored);
    const cursor = new BodyCursor(response);
    const records = [...shards[i].records].sort((a, b) => a.byteOffset - b.byteOffset);
    for (const rec of records) {
      if (rec.format !== "raw") throw new VoxcError(`weight record ${rec.name}: unsupported format ${rec.format}`);
      const bytes = await cursor.read(rec.byteOffset, rec.nbytes, onBytes);
      tvm.beginScope();
      const t = tvm.empty(rec.shape, rec.dtype, dev);
      if (bytes.length % 4 === 0) {
        t.copyFromRawBytes(bytes);   // queue.writeBuffer from JS memory: never through the wasm heap
      } else {
        t.copyFrom(tvm.empty(rec.shape, rec.dtype, tvm.cpu()).copyFromRawBytes(bytes));
      }
      tvm.tensorCacheUpdate(rec.name, t, true);
      tvm.endScope();
    }
    await cursor.drain(onBytes);
  }
  await Promise.all(pending);
  await dev.sync();
  return { bytes: total, seconds: (performance.now() - t0) / 1000, fromCache };
}

/**
 * The model's state buffers, one slot per stream (`maxStreams` slots, the manifest's null axis; a
 * key/value cache's null axis counts pages: its pool starts with kvPoolPages().initial of them),
 * allocated inside an out-of-memory error scope: a GPU that cannot hold one fails with a
 * VoxcError (code "memory") naming it.  A per-layer state (the manifest's `layers`: the key/value
 * caches) is an array of one separately allocated buffer per layer: each layer's kernels bind only
 * their own, within the browser's limit on one binding.  WebGPU zero-fills new buffers; the caches need no clearing
 * (positions before a stream's start are masked; the page tables start all 0: unreached rows point at
 * page 0), the conv contexts are zeroed per stream in resetSlot.
 */
async function allocateState(tvm, dev, device, manifest, requirements) {
  const state = {};
  const scoped = typeof device.pushErrorScope === "function";
  tvm.beginScope();
  try {
    for (const [name, spec] of Object.entries(manifest.state)) {
      const rows = spec.axis === "pages" ? requirements.poolPages[name] : requirements.maxStreams;
      const shape = spec.shape.map((s) => (s === null ? rows : s));
      if (scoped) device.pushErrorScope("out-of-memory");
      const tensors = Array.from({ length: spec.layers ?? 1 },
                                 () => tvm.detachFromCurrentScope(tvm.empty(shape, spec.dtype, dev)));
      state[name] = spec.layers ? tensors : tensors[0];
      const err = scoped ? await device.popErrorScope() : null;
      if (err) {
        for (const t of Object.values(state).flat()) t.dispose();
        const buf = requirements.buffers.find((b) => b.name === name);
        throw new VoxcError(
          `The GPU is out of memory for ${buf?.what ?? name} (${bytesMB(buf?.totalBytes ?? 0)}; the model needs ` +
          `${bytesMB(requirements.totalBytes)} in all to start): ${err.message} Close other GPU-heavy tabs, ` +
          "use fewer streams (maxStreams), or a GPU with more memory.", { code: "memory" });
      }
    }
  } finally {
    tvm.endScope();
  }
  return state;
}

/**
 * One tower's paged key/value cache: voxc/runtime/kv_pages.py's KvPages, on the model's state (its
 * pool `state[name]`, one buffer per layer of [pages, 2, page_rows, heads, head_dim], and its page
 * table `state[spec.page_table]`, [maxStreams, pages_per_stream] int32; both from the manifest).  Ring
 * row r of the stream in slot s is row r % page_rows of page table[s][floor(r / page_rows)].  Before a
 * step, ensure() gives pages to the ring rows the step writes (growing the pool when none is free) and
 * writes the table to the GPU when it changed; release() gives a stream's pages back.  The pool
 * grows by the pages missing plus its size over the manifest's growth_headroom (a bundle without
 * one: plus its size), up to every stream's whole window: per layer a larger buffer, the old pages
 * copied into its start (copyBufferToBuffer), the old buffer freed; the new pages are WebGPU's zeros.
 */
class KvPages {
  constructor({ tvm, dev, device, state, name, spec, maxStreams, initialPages, what, createView, Scalar }) {
    Object.assign(this, { tvm, dev, device, state, name, spec, what, createView, Scalar });
    this.pageRows = spec.page_rows;
    this.window = spec.window;
    this.perStream = spec.pages_per_stream;
    this.pageBytes = spec.tensor_bytes_per_page;   // one page of one layer
    this.layers = spec.layers ?? 1;
    const { initial, max } = kvPoolPages(spec, maxStreams, initialPages);
    this.maxPages = max;
    this.size = initial;
    this.hostTable = new Int32Array(maxStreams * this.perStream);
    this.held = new Uint8Array(maxStreams * this.perStream);
    this.count = new Int32Array(maxStreams);
    this.free = Array.from({ length: initial }, (_, i) => initial - 1 - i);   // popped from the end: lowest first
    this.dirty = false;
    this.growths = 0;
  }

  get tensors() {
    return this.state[this.name];
  }

  get table() {
    return this.state[this.spec.page_table];
  }

  get pagesInUse() {
    return this.count.reduce((a, b) => a + b, 0);
  }

  get bytesInUse() {
    return this.pagesInUse * this.pageBytes * this.layers;
  }

  get bytesAllocated() {
    return this.size * this.pageBytes * this.layers;
  }

  pagesOf(slot) {
    const out = [];
    for (let j = 0; j < this.perStream; j++) {
      if (this.held[slot * this.perStream + j]) out.push(this.hostTable[slot * this.perStream + j]);
    }
    return out;
  }

  /** Table indices of the ring rows a step of n positions from start writes. */
  #pagesWritten(start, n) {
    const m = Math.min(n, this.window);
    if (m <= 0) return [];
    const range = (a, b) => Array.from({ length: Math.max(0, b - a) }, (_, i) => a + i);
    if (m === this.window) return range(0, this.perStream);
    const first = (start + n - m) % this.window;
    const last = first + m - 1;
    if (last < this.window) return range(Math.floor(first / this.pageRows), Math.floor(last / this.pageRows) + 1);
    return [...range(Math.floor(first / this.pageRows), this.perStream),
            ...range(0, Math.floor((last - this.window) / this.pageRows) + 1)];
  }

  async ensure(slots, starts, n) {
    const wanted = [];
    slots.forEach((slot, i) => {
      if (this.count[slot] === this.perStream) return;   // wrapped: holds its whole ring
      for (const j of this.#pagesWritten(starts[i], n)) {
        if (!this.held[slot * this.perStream + j]) wanted.push([slot, j]);
      }
    });
    if (wanted.length > this.free.length) await this.#grow(wanted.length);
    for (const [slot, j] of wanted) {
      const k = slot * this.perStream + j;
      this.hostTable[k] = this.free.pop();
      this.held[k] = 1;
      this.count[slot]++;
      this.dirty = true;
    }
    this.upload();
  }

  release(slot) {
    if (!this.count[slot]) return;
    for (let j = 0; j < this.perStream; j++) {
      const k = slot * this.perStream + j;
      if (this.held[k]) this.free.push(this.hostTable[k]);
      this.hostTable[k] = 0;
      this.held[k] = 0;
    }
    this.count[slot] = 0;
    this.free.sort((a, b) => b - a);
    this.dirty = true;
  }

  /** The page table to the GPU (queue.writeBuffer) if it changed since the last upload. */
  upload() {
    if (!this.dirty) return;
    this.dirty = false;
    this.table.copyFromRawBytes(new Uint8Array(this.hostTable.buffer));
  }

  /** Room for `wanted` free pages: grow the pool by what is missing plus its size over the manifest's
   * growth_headroom (voxc/runtime/kv_pages.py), up to its maximum; if the GPU has no memory for that,
   * by an eighth (or what is missing) only.  Throws (code "memory") if it cannot. */
  async #grow(wanted) {
    const more = wanted - this.free.length;
    const headroom = this.spec.growth_headroom ?? 1;
    const target = Math.min(this.maxPages, this.size + more + Math.floor(this.size / headroom));
    try {
      await this.#growTo(target);
    } catch (err) {
      const modest = Math.min(this.maxPages, this.size + Math.max(more, Math.floor(this.size / 8)));
      if (modest >= target) throw err;
      await this.#growTo(modest);
    }
    if (this.free.length < wanted) {
      throw new VoxcError(`${this.what} is full: all ${this.maxPages} of its pages (${this.pageRows} rows each) are ` +
                          `held by streams, ${wanted - this.free.length} more needed`, { code: "memory" });
    }
  }

  async #growTo(target) {
    if (target <= this.size) return;
    const { tvm, device } = this;
    const scoped = typeof device.pushErrorScope === "function";
    const pageShape = this.spec.shape.slice(1);
    const layers = this.tensors;
    for (let i = 0; i < layers.length; i++) {
      const old = layers[i];
      if (old.shape[0] >= target) continue;   // grown by an earlier, failed growth (each layer's size is its own)
      tvm.beginScope();
      try {
        if (scoped) device.pushErrorScope("out-of-memory");
        const bigger = tvm.detachFromCurrentScope(tvm.empty([target, ...pageShape], this.spec.dtype, this.dev));
        const err = scoped ? await device.popErrorScope() : null;
        if (err) {
          bigger.dispose();
          throw new VoxcError(
            `The GPU is out of memory for ${this.what}: its pages could not grow from ${this.size} to ${target} ` +
            `(${bytesMB((target - this.size) * this.pageBytes)} more for each of its ${this.layers} layers): ` +
            `${err.message} Fewer streams at once need less.`, { code: "memory" });
        }
        const prefix = this.createView(bigger, tvm.makeShapeTuple(old.shape), old.dtype, new this.Scalar(0, "int"));
        prefix.copyFrom(old);   // copyBufferToBuffer into the larger buffer's start
        old.dispose();          // (tvmjs submits the pending copy before it destroys the buffer)
        layers[i] = bigger;
      } finally {
        tvm.endScope();
      }
    }
    for (let page = this.size; page < target; page++) this.free.push(page);
    this.free.sort((a, b) => b - a);
    this.size = target;
    this.growths++;
  }
}

const PIPELINE_MODES = ["async", "blocking"];

/**
 * Every kernel's compute pipeline, created before the first call (tvmjs would otherwise create each
 * at its first dispatch, blocking), each registered with the VM as a KernelDispatcher submitter.
 * "async": createComputePipelineAsync for all kernels at once, so the browser may compile them in
 * parallel while the page stays responsive.  "blocking": createComputePipeline, one kernel after the
 * other, on this thread; in Dawn for Node.js on SwiftShader (2 cores) it took half the async path's
 * time (every kernel's WGSL differs, so there are no modules or pipelines to share either way).
 */
async function createPipelines(tvm, vm, mode, report, dispatcher) {
  tvm.beginScope();
  let kernels, shaderOf, usePipeline;
  try {
    const mod = vm.getInternalModule();
    kernels = JSON.parse(mod.getFunction("webgpu.get_fmap", true)());
    shaderOf = tvm.detachFromCurrentScope(mod.getFunction("webgpu.get_shader"));
    usePipeline = tvm.detachFromCurrentScope(mod.getFunction("webgpu.update_prebuild"));
  } finally {
    tvm.endScope();
  }
  const names = Object.keys(kernels);
  let done = 0;
  const create = async (name) => {
    const kernel = dispatcher.prepare(kernels[name], shaderOf(name));
    const pipeline = mode === "async"
      ? await dispatcher.device.createComputePipelineAsync(kernel.pipelineDescriptor)
      : dispatcher.device.createComputePipeline(kernel.pipelineDescriptor);
    tvm.beginScope();
    try {
      usePipeline(name, dispatcher.submitter(kernel, pipeline));
    } finally {
      tvm.endScope();
    }
    done++;
    report("pipelines", done / names.length, `Compiling GPU kernels: ${done} of ${names.length}`);
  };
  try {
    if (mode === "async") {
      await Promise.all(names.map(create));
    } else {
      for (const name of names) await create(name);
    }
  } finally {
    shaderOf.dispose();
    usePipeline.dispose();
  }
}

const DISPATCHES_PER_SUBMIT = 64;     // the GPU starts on a step's first kernels while the rest are encoded
const MAX_CACHED_BIND_GROUPS = 8192;

/**
 * Kernel dispatch for tvmjs's WebGPU context with less CPU per dispatch than its own submitShader,
 * which costs about 40 us per kernel in Dawn (a decode step's 433 kernels: 17 ms of CPU against
 * 10.6 ms of GPU time, measured on an H100): for every dispatch it begins and ends a compute pass,
 * writes the launch's scalar arguments to a uniform buffer (queue.writeBuffer) and creates a bind
 * group, and it submits only at the next readback, so the GPU idles while a step is encoded.
 * Here a dispatch's bind group and its uniform buffer (written once, at creation) are cached by
 * kernel, buffers and scalar arguments, which recur every step (the VM's memory plan reuses its
 * buffers); consecutive dispatches share one compute pass (WebGPU orders them: each dispatch is its
 * own usage scope); and every DISPATCHES_PER_SUBMIT dispatches are submitted.  While a
 * KernelProfiler records, each dispatch keeps a pass of its own (its timestamps are per pass).
 * tvmjs's own encoder (pendingEncoder: its copies, its flush before every readback, write and free)
 * stays the one command stream: the shared pass is ended before tvmjs encodes anything else.
 */
class KernelDispatcher {
  constructor(context, device, profiler = null) {
    this.context = context;
    this.device = device;
    this.profiler = profiler;
    this.pass = null;
    this.sinceSubmit = 0;
    this.bindGroups = new Map();
    this.uniforms = new Map();      // the launch scalars' bytes -> a uniform buffer holding them
    this.bufferIds = new WeakMap();
    this.nextBufferId = 1;
    this.kernelCount = 0;
    this.stats = { dispatches: 0, bindGroupsCreated: 0, submits: 0 };
    // tvmjs calls these through `this`, so the instance's own properties take over
    const flush = context.flushCommands.bind(context);
    context.flushCommands = () => {
      this.#endPass();
      if (context.pendingEncoder) this.stats.submits++;
      flush();
      this.sinceSubmit = 0;
      this.#trimCache();
    };
    const copyWithin = context.deviceCopyWithinGPU.bind(context);
    context.deviceCopyWithinGPU = (...args) => {
      this.#endPass();
      copyWithin(...args);
    };
  }

  #endPass() {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
  }

  // after a submit: buffers destroyed now are freed once the submitted work is done
  #trimCache() {
    if (this.bindGroups.size <= MAX_CACHED_BIND_GROUPS) return;
    for (const buffer of this.uniforms.values()) buffer.destroy();
    this.uniforms.clear();
    this.bindGroups.clear();
  }

  #bufferId(buffer) {
    let id = this.bufferIds.get(buffer);
    if (id === undefined) {
      id = this.nextBufferId++;
      this.bufferIds.set(buffer, id);
    }
    return id;
  }

  /** A kernel's launch layout (from tvmjs's function info) and its pipeline descriptor. */
  prepare(info, code) {
    const toDim = [];
    let writes = [];
    for (const tag of info.launch_param_tags) {
      const axis = "xyz".indexOf(tag.at(-1));   // launch dims: blockIdx x/y/z, then threadIdx x/y/z
      if (tag.startsWith("blockIdx.")) toDim.push(axis);
      else if (tag.startsWith("threadIdx.")) toDim.push(axis + 3);
      else if (tag.startsWith("paramWriteAccess:")) writes = JSON.parse(tag.substring(17));
      else throw new VoxcError(`kernel ${info.name}: unknown launch parameter ${tag}`);
    }
    const buffers = [];
    const scalars = [];
    info.arg_types.forEach((dtype, i) => {
      if (dtype === "handle") buffers.push(i);
      else if (/^(u?int|float)/.test(dtype)) scalars.push(i);
      else throw new VoxcError(`kernel ${info.name}: unsupported argument type ${dtype}`);
    });
    const entries = buffers.map((_, binding) => ({
      binding, visibility: GPUShaderStage.COMPUTE,
      buffer: { type: writes[binding] ? "storage" : "read-only-storage" } }));
    entries.push({ binding: buffers.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } });
    const layout = this.device.createBindGroupLayout({ entries });
    const module = this.device.createShaderModule({ code });
    return {
      id: this.kernelCount++, info, toDim, buffers, scalars, layout,
      pipelineDescriptor: { layout: this.device.createPipelineLayout({ bindGroupLayouts: [layout] }),
                            compute: { module, entryPoint: info.name } },
    };
  }

  /** The function the VM calls for every launch of the kernel: (buffers and scalars..., launch dims...). */
  submitter(kernel, pipeline) {
    const { info, toDim, buffers, scalars, layout } = kernel;
    const context = this.context;
    const nargs = buffers.length + scalars.length;
    return (...args) => {
      const dims = [1, 1, 1, 1, 1, 1];
      for (let i = 0; i < toDim.length; i++) dims[toDim[i]] = args[nargs + i];
      // WebGPU grids stop at 65535 per dimension: fold blockIdx.x into z as TVM's WGSL expects
      // (the kernel skips the workgroups past packGridDimX)
      const packedX = dims[0];
      while (dims[0] >= 65536) {
        dims[0] = Math.ceil(dims[0] / 2);
        dims[2] *= 2;
      }
      const gpuBuffers = buffers.map((i) => context.gpuBufferFromPtr(args[i]));
      const values = scalars.map((i) => args[i]);
      const key = `${kernel.id}|${gpuBuffers.map((b) => this.#bufferId(b)).join(",")}|${values.join(",")}|${packedX}`;
      let bindGroup = this.bindGroups.get(key);
      if (bindGroup === undefined) {
        bindGroup = this.#bindGroup(info, layout, gpuBuffers, scalars, values, packedX);
        this.bindGroups.set(key, bindGroup);
        this.stats.bindGroupsCreated++;
      }
      this.stats.dispatches++;
      if (!context.pendingEncoder) context.pendingEncoder = this.device.createCommandEncoder();
      const ownPass = this.profiler?.recording;
      if (ownPass) this.#endPass();
      if (!this.pass) this.pass = context.pendingEncoder.beginComputePass();
      this.pass.setPipeline(pipeline);
      this.pass.setBindGroup(0, bindGroup);
      this.pass.dispatchWorkgroups(dims[0], dims[1], dims[2]);
      if (ownPass) this.#endPass();
      if (++this.sinceSubmit >= DISPATCHES_PER_SUBMIT) context.flushCommands();
    };
  }

  #bindGroup(info, layout, gpuBuffers, scalars, values, packedX) {
    const words = new ArrayBuffer(4 * Math.ceil((scalars.length + 1) / 4) * 4);
    const i32 = new Int32Array(words);
    const u32 = new Uint32Array(words);
    const f32 = new Float32Array(words);
    scalars.forEach((argIndex, i) => {
      const dtype = info.arg_types[argIndex];
      if (dtype.startsWith("int")) i32[i] = values[i];
      else if (dtype.startsWith("uint")) u32[i] = values[i];
      else f32[i] = values[i];
    });
    u32[scalars.length] = packedX;       // the PODArgs struct ends with packGridDimX
    // few distinct launch scalars recur (sizes, grid widths): one buffer each, written once
    const contents = u32.join(",");
    let uniform = this.uniforms.get(contents);
    if (uniform === undefined) {
      uniform = this.device.createBuffer({ size: words.byteLength, usage: GPUBufferUsage.UNIFORM, mappedAtCreation: true });
      new Uint8Array(uniform.getMappedRange()).set(new Uint8Array(words));
      uniform.unmap();
      this.uniforms.set(contents, uniform);
    }
    const entries = gpuBuffers.map((buffer, binding) => ({ binding, resource: { buffer } }));
    entries.push({ binding: gpuBuffers.length, resource: { buffer: uniform, size: 4 * (scalars.length + 1) } });
    return this.device.createBindGroup({ layout, entries });
  }
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

// ---- audio framing: voxc.runtime.framing.StreamingMelFramer ------------------------------------------

function concatF32(a, b) {
  if (a.length === 0) return b.slice();
  if (b.length === 0) return a;
  const out = new Float32Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/**
 * Cuts a PCM stream into LogMel input windows so that streaming frames equal the offline
 * (center=True) ones: the port of voxc.runtime.framing.StreamingMelFramer (see its docstring).
 * push(chunk) returns null or a Float32Array window of samplesForFrames(k * framesPerStep)
 * samples; flush() ends the stream and returns the window of the remaining frames (or null).
 */
export class MelFramer {
  constructor({ window_size: windowSize, hop_length: hop }, framesPerStep) {
    if (!(framesPerStep >= 1)) throw new VoxcError(`framesPerStep must be positive, got ${framesPerStep}`);
    this.window = windowSize;
    this.hop = hop;
    this.framesPerStep = framesPerStep;
    this.half = windowSize >> 1;
    this.pending = new Float32Array(0);  // padded stream from the next frame's first sample on
    this.started = false;                // left reflection prepended yet?
    this.tail = new Float32Array(0);     // last window/2 + 1 stream samples, for the end reflection
    this.samplesReceived = 0;
    this.framesEmitted = 0;
    this.finished = false;
  }

  validFrameCount(n) {
    return n < this.window ? 0 : Math.floor((n - this.window) / this.hop) + 1;
  }

  samplesForFrames(n) {
    return (n - 1) * this.hop + this.window;
  }

  push(pcm) {
    if (this.finished) throw new VoxcError("MelFramer: push() after flush()");
    if (pcm.length === 0) return null;
    this.samplesReceived += pcm.length;
    const tail = concatF32(this.tail, pcm);
    this.tail = tail.slice(Math.max(0, tail.length - (this.half + 1)));
    this.pending = concatF32(this.pending, pcm);
    if (!this.started) {
      if (this.pending.length <= this.half) return null;
      const refl = new Float32Array(this.half);   // pending[half:0:-1]
      for (let i = 0; i < this.half; i++) refl[i] = this.pending[this.half - i];
      this.pending = concatF32(refl, this.pending);
      this.started = true;
    }
    const ready = this.validFrameCount(this.pending.length);
    return this.take(Math.floor(ready / this.framesPerStep) * this.framesPerStep);
  }

  flush() {
    if (this.finished) throw new VoxcError("MelFramer: flush() called twice");
    this.finished = true;
    if (!this.started) {
      throw new VoxcError(`stream of ${this.samplesReceived} samples is too short for the centred STFT: ` +
                          `need more than ${this.half}`);
    }
    const n = Math.min(this.half, Math.max(0, this.tail.length - 1));   // tail[-2::-1][:half]
    const refl = new Float32Array(n);
    for (let i = 0; i < n; i++) refl[i] = this.tail[this.tail.length - 2 - i];
    this.pending = concatF32(this.pending, refl);
    return this.take(Math.floor(this.samplesReceived / this.hop) - this.framesEmitted);
  }

  take(nFrames) {
    if (nFrames <= 0) return null;
    const window = this.pending.slice(0, this.samplesForFrames(nFrames));
    this.pending = this.pending.slice(nFrames * this.hop);
    this.framesEmitted += nFrames;
    return window;
  }
}

// ---- text: voxc.tokenizer (token bytes, incremental UTF-8) --------------------------------------

function b64ToBytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Token ids -> bytes, from the bundle's tokenizer.json (special/control ids have no bytes). */
export class TokenTable {
  constructor(table) {
    Object.assign(this, {
      vocabSize: table.vocab_size, numSpecial: table.num_special, bosId: table.bos_id,
      eosId: table.eos_id, streamingPadId: table.streaming_pad_id, streamingWordId: table.streaming_word_id,
    });
    this.pieces = table.pieces;
    this.decoded = new Array(table.pieces.length);
  }

  isSpecial(id) {
    return id >= 0 && id < this.numSpecial;
  }

  tokenBytes(id) {
    if (!(id >= 0 && id < this.vocabSize)) {
      throw new VoxcError(`token id ${id} is outside the vocabulary (0..${this.vocabSize - 1})`);
    }
    if (this.isSpecial(id)) return new Uint8Array(0);
    const k = id - this.numSpecial;
    return (this.decoded[k] ??= b64ToBytes(this.pieces[k]));
  }

  /** Text of a whole id sequence (bytes joined across control tokens, invalid UTF-8 -> U+FFFD). */
  decode(ids) {
    const d = this.incrementalDecoder();
    return ids.map((i) => d.push(i)).join("") + d.flush();
  }

  incrementalDecoder() {
    return new IncrementalDecoder(this);
  }
}

/** Token ids in, text deltas out, always whole characters (voxc.tokenizer.IncrementalDecoder). */
export class IncrementalDecoder {
  constructor(table) {
    this.table = table;
    this.utf8 = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
    this.text = "";
  }

  push(id) {
    const delta = this.utf8.decode(this.table.tokenBytes(id), { stream: true });
    this.text += delta;
    return delta;
  }

  flush() {
    const delta = this.utf8.decode();
    this.text += delta;
    return delta;
  }
}

// ---- resampling to 16 kHz --------------------------------------------------------------------

/**
 * Streaming windowed-sinc resampler (Blackman window, `halfTaps` input samples each side, cut-off
 * at the lower Nyquist frequency).  push(Float32Array at inRate) -> Float32Array at outRate;
 * flush() returns the last samples (the input padded with silence).
 */
export class Resampler {
  constructor(inRate, outRate = 16000, { halfTaps = 32 } = {}) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate;                 // input samples per output sample
    this.cutoff = Math.min(1, outRate / inRate);  // relative to the input Nyquist
    this.half = Math.ceil(halfTaps / this.cutoff);
    this.buffer = new Float32Array(this.half);    // history: starts with silence before the stream
    this.offset = -this.half;                     // stream index of buffer[0]
    this.next = 0;                                // next output sample index
    this.passthrough = inRate === outRate;
  }

  kernel(x) {
    if (x === 0) return this.cutoff;
    const w = Math.abs(x) >= this.half ? 0
      : 0.42 + 0.5 * Math.cos(Math.PI * x / this.half) + 0.08 * Math.cos(2 * Math.PI * x / this.half);
    const t = Math.PI * this.cutoff * x;
    return this.cutoff * Math.sin(t) / t * w;
  }

  push(input) {
    if (this.passthrough) return Float32Array.from(input);
    this.buffer = concatF32(this.buffer, input);
    const out = [];
    for (;;) {
      const center = this.next * this.step;
      const lo = Math.floor(center) - this.half + 1;
      const hi = Math.floor(center) + this.half;
      if (hi - this.offset >= this.buffer.length) break;
      let acc = 0;
      for (let k = lo; k <= hi; k++) acc += this.buffer[k - this.offset] * this.kernel(center - k);
      out.push(acc);
      this.next++;
    }
    const keep = Math.floor(this.next * this.step) - this.half + 1 - this.offset;  // first sample still needed
    if (keep > 0) {
      this.buffer = this.buffer.slice(keep);
      this.offset += keep;
    }
    return Float32Array.from(out);
  }

  flush() {
    if (this.passthrough) return new Float32Array(0);
    const total = Math.floor((this.offset + this.buffer.length) / this.step);   // outputs the input covers
    const pad = new Float32Array(this.half + 1);
    const out = this.push(pad);
    return out.slice(0, Math.max(0, total - (this.next - out.length)));
  }
}

/** Mono 16 kHz PCM of a whole AudioBuffer (decodeAudioData's result): channels averaged, resampled. */
export function audioBufferTo16k(buffer, outRate = 16000) {
  const n = buffer.length;
  const mono = new Float32Array(n);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const ch = buffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += ch[i] / buffer.numberOfChannels;
  }
  const r = new Resampler(buffer.sampleRate, outRate);
  return concatF32(r.push(mono), r.flush());
}

// ---- the model --------------------------------------------------------------------------------

function checkPcm(pcm) {
  if (pcm == null) return new Float32Array(0);
  if (!(pcm instanceof Float32Array || pcm instanceof Float64Array || Array.isArray(pcm))) {
    if (pcm instanceof Int16Array || pcm instanceof Int32Array) {
      throw new VoxcError("feed() takes float PCM in [-1, 1]; convert Int16Array with x / 32768");
    }
    throw new VoxcError("feed() takes mono 16 kHz PCM as a Float32Array");
  }
  const out = pcm instanceof Float32Array ? pcm : Float32Array.from(pcm);
  for (let i = 0; i < out.length; i++) {
    if (!Number.isFinite(out[i])) throw new VoxcError("audio chunk contains NaN or infinite samples");
  }
  return out;
}

export class Voxc {
  constructor(fields) {
    Object.assign(this, fields);
  }

  /**
   * Load a bundle.  onProgress receives {phase, progress (0..1), timeElapsed (s), text}, shaped
   * like WebLLM's InitProgressReport; phases: "check", "runtime", "wasm", "weights",
   * "pipelines", "ready".  maxStreams: how many streams may be open at once (their state is
   * allocated up front).  weights: "fetch" (the bundle's shards, through the Cache API) or "random"
   * (small pseudo-random values, for benchmarks of weight-less bundles).  profileKernels: time every
   * kernel with timestamp queries (needs the "timestamp-query" feature; see profileKernels()).
   * pipelines: "async" (default) or "blocking", how the kernels' pipelines are created (see
   * createPipelines).  kvPages: the key/value caches' first size in pages (a number for every pool,
   * or {enc_cache, dec_cache}; default: every stream's first seconds); they grow as streams need.
   */
  static async load(baseUrl, { onProgress = () => {}, tvmjsUrl, powerPreference = "high-performance",
                               logger = console.log, maxStreams = 1, weights = "fetch", deviceMemory,
                               profileKernels = false, pipelines = "async", kvPages = null } = {}) {
    const t0 = performance.now();
    if (!PIPELINE_MODES.includes(pipelines)) {   // before anything is downloaded
      throw new VoxcError(`pipelines must be one of ${PIPELINE_MODES.join(", ")}, not ${JSON.stringify(pipelines)}`);
    }
    const base = new URL(baseUrl, globalThis.location?.href);
    const report = (phase, progress, text) =>
      onProgress({ phase, progress, timeElapsed: (performance.now() - t0) / 1000, text });

    report("check", 0, "Checking WebGPU support");
    const manifestResp = await fetch(new URL(BUNDLE_MANIFEST, base), { cache: "no-cache" });
    if (!manifestResp.ok) {
      throw new VoxcError(`no voxc bundle at ${base}: ${BUNDLE_MANIFEST}: ${manifestResp.status}`);
    }
    const manifest = await manifestResp.json();
    const requirements = bundleRequirements(manifest, { maxStreams, kvPages });
    const gpuInfo = await checkWebGPU({ requirements, powerPreference, deviceMemory });

    report("runtime", 0, "Loading the TVM runtime");
    const tvmjs = await importTvmjs(tvmjsUrl ?? new URL("tvmjs.js", base).href);
    const scope = CACHE_PREFIX + manifest.id;
    await dropStaleCaches(scope);

    const wasmUrl = new URL(manifest.wasm ?? "model.wasm", base).href;
    const wasm = await cachedFetch(wasmUrl, scope, (got, total) =>
      report("wasm", total ? got / total : 0, `Fetching model code: ${bytesMB(got)}`));
    const tokenizerPromise = manifest.tokenizer_table
      ? cachedFetch(new URL(manifest.tokenizer_table.file, base).href, scope)
        .then((b) => new TokenTable(JSON.parse(new TextDecoder().decode(b))))
      : null;
    const tvm = await tvmjs.instantiate(wasm.buffer, tvmjs.createPolyfillWASI(), logger);

    const device = await requestDevice(gpuInfo.adapter, requirements, { profileKernels });
    const profiler = profileKernels ? new KernelProfiler(device) : null;   // before tvmjs sees the device
    let lost = null;
    device.lost.then((info) => {
      lost = info;
      console.error(`voxc: the GPU device was lost (${info.reason}): ${info.message}`);
    });
    tvm.initWebGPU(device);
    const dispatcher = new KernelDispatcher(tvm.lib.webGPUContext, device, profiler);
    const dev = tvm.webgpu();
    // The state buffers (the caches: the largest allocations) before the download, so that a GPU
    // without the memory for them fails now, naming the buffer, rather than after gigabytes.
    const state = manifest.kind === "voxtral-realtime"
      ? await allocateState(tvm, dev, device, manifest, requirements) : null;

    let phase = "weights";
    tvm.registerInitProgressCallback((r) => report(phase, r.progress, r.text));
    let weightStats = null;
    try {
      weightStats = await loadWeights(tvm, dev, base,
                                      weights === "random" ? { ...manifest, weights_mode: "none" } : manifest,
                                      scope, report);
    } catch (err) {
      const quota = /quota/i.test(String(err?.name ?? "") + String(err?.message ?? err));
      throw new VoxcError(
        (quota ? "The browser's storage quota is too small for the model's weights " +
                 `(${bytesMB(requirements.totalBytes)}); free some space or allow more storage. `
               : "Loading the weights failed. ") + (lost ? `The GPU device was lost: ${lost.message}` : String(err?.message ?? err)),
        { cause: err, code: quota ? "quota" : lost ? "device-lost" : "weights" });
    }

    phase = "pipelines";
    report("pipelines", 0, "Compiling GPU kernels");
    tvm.beginScope();
    const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(dev));
    await createPipelines(tvm, vm, pipelines, report, dispatcher);
    let params = [];
    let packedParams = null;
    if (manifest.param_names?.length) {
      const arr = tvm.getParamsFromCacheByName(manifest.param_names);
      if (manifest.param_mode === "packed") {
        packedParams = tvm.detachFromCurrentScope(arr);
      } else {
        params = manifest.param_names.map((_, i) => tvm.detachFromCurrentScope(arr.get(i)));
      }
    }
    tvm.endScope();
    const tokens = tokenizerPromise ? await tokenizerPromise : null;

    const footprint = { weightsBytes: requirements.weightsBytes, stateBytes: requirements.stateBytes,
                        totalBytes: requirements.totalBytes, maxStateBytes: requirements.maxStateBytes,
                        maxTotalBytes: requirements.maxTotalBytes, maxStreams: requirements.maxStreams,
                        buffers: requirements.buffers.map(({ name, kind, bytes }) => ({ name, kind, bytes })) };
    const model = new Voxc({ tvmjs, tvm, vm, dev, params, packedParams, manifest, tokens, requirements,
                             maxStreams: requirements.maxStreams, weightStats,
                             loadSeconds: 0, gpu: { ...gpuInfo, device }, deviceLost: () => lost, state, footprint,
                             profiler, dispatcher });
    if (manifest.kind === "voxtral-realtime") {
      model.#initState();
    }
    model.loadSeconds = (performance.now() - t0) / 1000;
    report("ready", 1, "Ready");
    return model;
  }

  // ---- kernel profiling ------------------------------------------------------------------------

  /** Kernel dispatches, bind groups created and command buffers submitted since the load (counts). */
  dispatchStats() {
    return { ...this.dispatcher.stats };
  }

  /** The names of the bundle's GPU kernels (the WGSL entry points, as profiles name them). */
  kernelNames() {
    const { tvm } = this;
    tvm.beginScope();
    try {
      return Object.keys(JSON.parse(this.vm.getInternalModule().getFunction("webgpu.get_fmap", true)()));
    } finally {
      tvm.endScope();
    }
  }

  /**
   * Runs `fn` (async: e.g. one decode() or one stream feed()) with every kernel it dispatches timed
   * on the GPU.  Resolves to KernelProfiler.stop()'s report plus wallMs (from the first dispatch
   * queued to the last one done, as the host saw it) and `result`, fn's own.  Needs a model loaded
   * with { profileKernels: true }.  Work queued before the call is finished first, untimed.
   */
  async profileKernels(fn) {
    if (!this.profiler) throw new VoxcError("load the model with { profileKernels: true } to profile its kernels");
    await this.dev.sync();
    this.profiler.start();
    const t0 = performance.now();
    let result;
    let failure = null;
    try {
      result = await fn();
      await this.dev.sync();
    } catch (err) {
      failure = err;
    }
    const wallMs = performance.now() - t0;
    const report = await this.profiler.stop();   // also after a failure: recording must end
    if (failure) throw failure;
    return { ...report, wallMs, result };
  }

  // ---- generic calls (any bundle) -------------------------------------------------------------

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
      if (withParams) args.push(...this.#paramArgs());
      const ret = this.vm.getFunction(name)(...args);
      const host = this.#flatten(ret).map((t) => {
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

  #paramArgs() {
    return this.packedParams ? [this.packedParams] : this.params;
  }

  /** ``data`` as a device array.  With ``role`` (e.g. "decode.tokens") the array is kept and
   * overwritten by the next call of that role and shape: a new GPU buffer per input per call costs a
   * buffer creation and destruction, and a kernel launch that reads it misses KernelDispatcher's
   * bind-group cache.  (tvmjs submits the queued kernels before it writes, so those still read the
   * previous contents.) */
  #toDevice({ data, shape, dtype }, role = null) {
    const tvm = this.tvm;
    dtype = dtype ?? dtypeOf(data);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (role !== null && bytes.length % 4 === 0) {
      this.inputs ??= new Map();
      const key = `${role}|${shape.join("x")}|${dtype}`;
      let kept = this.inputs.get(key);
      if (kept === undefined) {
        kept = tvm.detachFromCurrentScope(tvm.empty(shape, dtype, this.dev));
        this.inputs.set(key, kept);
      }
      kept.copyFromRawBytes(bytes);
      return kept;
    }
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

  // ---- Voxtral streaming (voxc.runtime.model.CompiledModel) ------------------------------------

  #initState() {
    const { tvm, manifest } = this;
    this.config = manifest.config;
    this.streaming = manifest.streaming;
    // weights built from an ONNX export fix the delay (voxc.artifact.FIXED_DELAY_FIELD)
    this.fixedDelayMs = manifest.fixed_delay_ms ?? null;
    this.freeSlots = [...Array(this.maxStreams).keys()];
    tvm.beginScope();
    this.fns = {};
    for (const name of ["mel", "encode", "set_delay", "decode"]) {   // kept for the model's life
      this.fns[name] = tvm.detachFromCurrentScope(this.vm.getFunction(name));
    }
    this.fns.createView = tvm.detachFromCurrentScope(tvm.getGlobalFunc("runtime.TVMTensorCreateView"));
    tvm.endScope();
    this.lock = Promise.resolve();
    // the paged key/value caches (the manifest's state entries with axis "pages")
    this.kv = {};
    for (const [name, spec] of Object.entries(manifest.state)) {
      if (spec.axis !== "pages") continue;
      this.kv[name] = new KvPages({ tvm, dev: this.dev, device: this.gpu.device, state: this.state, name, spec,
                                    maxStreams: this.maxStreams, initialPages: this.requirements.poolPages[name],
                                    what: KV_CACHE_NAMES[name] ?? name,
                                    createView: this.fns.createView, Scalar: this.tvmjs.Scalar });
    }
  }

  /** Bytes of key/value-cache pages the streams hold now, and of the pools on the GPU (all layers). */
  get kvBytesInUse() {
    return Object.values(this.kv ?? {}).reduce((a, pool) => a + pool.bytesInUse, 0);
  }

  get kvBytesAllocated() {
    return Object.values(this.kv ?? {}).reduce((a, pool) => a + pool.bytesAllocated, 0);
  }

  /** A new transcription stream (StreamingSession); delayMs defaults to the model's (480). */
  stream({ delayMs, leftPadTokens, recordLogits = false, onStep } = {}) {
    if (!this.streaming) throw new VoxcError("this bundle is not a Voxtral model");
    return new VoxcStream(this, {
      delayMs: delayMs ?? this.streaming.default_delay_ms,
      leftPadTokens: leftPadTokens ?? this.streaming.left_pad_tokens, recordLogits, onStep,
    });
  }

  /** Whole-clip transcription: a stream fed all audio at once (same numbers as streaming). */
  async transcribe(pcm, opts = {}) {
    const s = this.stream(opts);
    const text = await s.feed(pcm);
    return text + (await s.finish());
  }

  delayTokens(delayMs) {
    const n = delayMs / this.streaming.ms_per_token;
    const k = Math.round(n);
    if (Math.abs(n - k) > 1e-9 || !this.streaming.allowed_delay_tokens.includes(k)) {
      throw new VoxcError(`delay ${delayMs} ms is not supported: use 80..1200 ms in steps of ` +
                          `${this.streaming.ms_per_token} ms, or 2400 ms`);
    }
    if (this.fixedDelayMs !== null && k !== Math.round(this.fixedDelayMs / this.streaming.ms_per_token)) {
      throw new VoxcError(`this model works only with a ${this.fixedDelayMs} ms delay, not ${delayMs} ms: it was ` +
                          "built from an ONNX export that folds the delay into its weights");
    }
    return k;
  }

  /** Runs fn with the model to itself: GPU work of different streams never interleaves. */
  exclusive(fn) {
    const run = this.lock.then(fn);
    this.lock = run.catch(() => {});
    return run;
  }

  acquireSlot() {
    if (!this.freeSlots.length) {
      throw new VoxcError("all stream slots of this model are in use; finish() a stream or load with a larger maxStreams");
    }
    return this.freeSlots.shift();
  }

  releaseSlot(slot) {
    for (const pool of Object.values(this.kv)) pool.release(slot);
    this.freeSlots.push(slot);
  }

  #checkDevice() {
    const lost = this.deviceLost();
    if (lost) {
      throw new VoxcError(`the GPU device was lost (${lost.reason || "unknown reason"}): ${lost.message}. ` +
                          "The model may not fit in GPU memory; reload the page to try again.", { code: "device-lost" });
    }
  }

  /** A new stream starts from silence: zero the conv-stem context of its slot, and condition its
   * decoder on its delay (in tokens). */
  resetSlot(slot, delayTokens) {
    for (const pool of Object.values(this.kv)) pool.release(slot);   // a previous stream's pages
    this.setDelay([slot], [delayTokens]);
    for (const name of ["conv0_state", "conv1_state"]) {
      const t = this.state[name];
      const rowShape = t.shape.slice(1);
      const rowElems = rowShape.reduce((a, b) => a * b, 1);
      const bytes = new Uint8Array(rowElems * 4);
      this.tvm.beginScope();
      try {
        const view = this.fns.createView(
          t, this.tvm.makeShapeTuple(rowShape), t.dtype, new this.tvmjs.Scalar(slot * rowElems * 4, "int"));
        view.copyFromRawBytes(bytes);
      } finally {
        this.tvm.endScope();
      }
    }
  }

  #i32(values, role = null) {
    return this.#toDevice({ data: Int32Array.from(values), shape: [values.length], dtype: "int32" }, role);
  }

  /** Stream slots as a device array; a slot outside 0..maxStreams-1 would read and write another
   * stream's state (WebGPU clamps, it does not fail), so it is refused here. */
  #slotArg(slots, role = null) {
    this.#checkSlots(slots);
    return this.#i32(slots, role);
  }

  #checkSlots(slots) {
    for (const s of slots) {
      if (!Number.isInteger(s) || s < 0 || s >= this.maxStreams) {
        throw new VoxcError(`stream slot ${s} is not one of this model's slots 0..${this.maxStreams - 1}`);
      }
    }
  }

  /** Entry calls that wait (for KV pages, for a readback) run one after another in call order, also
   * when they are not awaited: a TVM scope held across an await would otherwise interleave with
   * another call's, and a step's kernels must be queued after the pages it was given. */
  #exclusive(fn) {
    const run = this.#queue.then(fn);
    this.#queue = run.catch(() => {});
    return run;
  }

  #queue = Promise.resolve();

  /** A state entry as an entry point takes it: a per-layer entry (an array) as a tuple. */
  #stateArg(name) {
    const value = this.state[name];
    return Array.isArray(value) ? this.tvm.makeTVMArray(value) : value;
  }

  /** Keep an entry point's returned state entry (a per-layer entry comes back as a tuple). */
  #replaceState(name, returned) {
    const old = [this.state[name]].flat();
    const fresh = Array.isArray(this.state[name])
      ? Array.from({ length: returned.size() }, (_, i) => returned.get(i)) : [returned];
    const kept = fresh.map((t) => this.tvm.detachFromCurrentScope(t));
    this.state[name] = Array.isArray(this.state[name]) ? kept : kept[0];
    old.forEach((t, i) => { if (t !== kept[i]) t.dispose(); });
  }

  /** mel + encode of one PCM window for the streams `slots` (one window each): the audio ring gains
   * the window's audio embeddings.  Resolves to the number of mel frames. */
  encodeWindow(windows, slots, starts) {
    this.#checkSlots(slots);
    return this.#exclusive(() => this.#encodeWindow(windows, slots, starts));
  }

  async #encodeWindow(windows, slots, starts) {
    this.#checkDevice();
    const { tvm, state } = this;
    const n = windows[0].length;
    const st = this.streaming;
    const melFrames = Math.floor((n - st.window_size) / st.hop_length) + 1;
    await this.kv.enc_cache.ensure(slots, starts, Math.floor(melFrames / st.conv_stride));
    const flat = new Float32Array(windows.length * n);
    windows.forEach((w, i) => flat.set(w, i * n));
    tvm.beginScope();
    try {
      const samples = this.#toDevice({ data: flat, shape: [windows.length, n], dtype: "float32" }, "encode.samples");
      const mel = this.fns.mel(samples, ...this.#paramArgs());
      if (mel.shape[2] !== melFrames) {   // the pages above were given for melFrames
        throw new VoxcError(`a window of ${n} samples gave ${mel.shape[2]} mel frames, not ${melFrames}`);
      }
      const ret = this.fns.encode(mel, state.conv0_state, state.conv1_state, this.#stateArg("enc_cache"),
                                  state.enc_pages, state.audio_ring, this.#slotArg(slots, "encode.slots"),
                                  this.#i32(starts, "encode.starts"),
                                  ...this.#paramArgs());
      ["conv0_state", "conv1_state", "enc_cache", "audio_ring"].forEach((k, i) => this.#replaceState(k, ret.get(i)));
      return mel.shape[2];
    } finally {
      tvm.endScope();
    }
  }

  /** The per-layer delay scales of streams `slots` for their delays (in tokens), which every later
   * decode call of theirs reads (voxc.model.graph: set_delay). */
  setDelay(slots, delays) {
    this.#checkDevice();
    const { tvm, state } = this;
    tvm.beginScope();
    try {
      const delayIn = this.#toDevice({ data: Float32Array.from(delays), shape: [delays.length], dtype: "float32" });
      this.#replaceState("delay_scales", this.fns.set_delay(delayIn, state.delay_scales, this.#slotArg(slots),
                                                            ...this.#paramArgs()));
    } finally {
      tvm.endScope();
    }
  }

  /** One decoder call; resolves to {tokens: Int32Array (greedy next token per stream), logits?}.
   * Only the token ids (4 bytes a stream) come back unless withLogits.  Calls run one after another
   * in call order (#exclusive), also when they are not awaited. */
  decode(tokens, slots, starts, options = {}) {
    this.#checkSlots(slots);
    return this.#exclusive(() => this.#decode(tokens, slots, starts, options));
  }

  async #decode(tokens, slots, starts, { readTokens = true, withLogits = false } = {}) {
    this.#checkDevice();
    const { tvm, state } = this;
    const b = tokens.length;
    const n = tokens[0].length;
    await this.kv.dec_cache.ensure(slots, starts, n);
    const flat = new Int32Array(b * n);
    tokens.forEach((t, i) => flat.set(t, i * n));
    tvm.beginScope();
    let hostTokens = null;
    let hostLogits = null;
    try {
      const tokIn = this.#toDevice({ data: flat, shape: [b, n], dtype: "int32" }, "decode.tokens");
      const ret = this.fns.decode(tokIn, state.audio_ring, state.delay_scales, this.#stateArg("dec_cache"),
                                  state.dec_pages, this.#slotArg(slots, "decode.slots"), this.#i32(starts, "decode.starts"),
                                  ...this.#paramArgs());
      this.#replaceState("dec_cache", ret.get(2));
      if (readTokens) {
        hostTokens = tvm.empty([b], "int32", tvm.cpu());
        hostTokens.copyFrom(ret.get(1));
      }
      if (withLogits) {
        const logits = ret.get(0);
        hostLogits = tvm.empty(logits.shape, logits.dtype, tvm.cpu());
        hostLogits.copyFrom(logits);
      }
      if (hostTokens || hostLogits) {
        await this.dev.sync();   // mapAsync of the staging buffer: never a synchronous readback
      }
      this.#checkDevice();
      return {
        tokens: hostTokens ? new Int32Array(hostTokens.toRawBytes().buffer.slice(0)) : null,
        logits: hostLogits ? new Float32Array(hostLogits.toRawBytes().buffer.slice(0)) : null,
      };
    } finally {
      tvm.endScope();
    }
  }

  dispose() {
    for (const t of Object.values(this.state ?? {}).flat()) t.dispose();
    for (const t of this.inputs?.values() ?? []) t.dispose();
    for (const f of Object.values(this.fns ?? {})) f.dispose();
    this.packedParams?.dispose();
    this.params.forEach((p) => p.dispose());
    this.vm.dispose();
    this.tvm.dispose();
    this.profiler?.dispose();
    this.gpu.device.destroy();
  }
}

/**
 * One transcription stream: voxc.runtime.session.StreamingSession (a batch of one).
 * feed()/finish() calls are queued, so they may be called without awaiting the previous one.
 */
export class VoxcStream {
  constructor(model, { delayMs, leftPadTokens, recordLogits = false, onStep } = {}) {
    const st = model.streaming;
    this.model = model;
    this.samplesPerToken = st.samples_per_token;
    this.delay = model.delayTokens(delayMs);
    if (!(leftPadTokens >= 0)) throw new VoxcError(`leftPadTokens must be >= 0, got ${leftPadTokens}`);
    this.leftPadTokens = leftPadTokens;
    const tok = model.tokens;
    this.prompt = [tok.bosId, ...Array(leftPadTokens + this.delay).fill(tok.streamingPadId)];
    this.eosId = tok.eosId;
    this.textDecoder = tok.incrementalDecoder();
    this.recordLogits = recordLogits;
    this.onStep = onStep;
    this.logits = [];
    this.tokens = [];
    this.stats = { audioSeconds: 0, computeSeconds: 0, encodeCalls: 0, decodeCalls: 0, lastStepMs: 0 };

    this.slot = model.acquireSlot();
    model.resetSlot(this.slot, this.delay);
    this.framer = new MelFramer(st, st.mel_frames_per_token);
    this.windows = [];            // framed PCM waiting for the encoder
    this.pendingText = [];
    this.encoderFrames = 0;       // encoder positions consumed so far
    this.audioTokens = 0;         // audio embeddings in this stream's ring so far
    this.position = 0;            // next decoder position
    this.lastToken = null;
    this.samplesFed = 0;
    this.finalTokens = null;      // total audio tokens, known at finish()
    this.ended = false;           // EOS seen
    this.finished = false;
    this.closing = false;
    this.#queue(new Float32Array(leftPadTokens * this.samplesPerToken), true);
  }

  /** Add 16 kHz mono float PCM (any length); resolves to the text decoded since the last call. */
  feed(pcm) {
    if (this.closing) throw new VoxcError("this stream is finished; start a new one with model.stream()");
    const chunk = checkPcm(pcm).slice();   // copied now: the caller may reuse its buffer
    return this.model.exclusive(async () => {
      const t0 = performance.now();
      this.#queue(chunk, false);
      await this.#advance();
      this.stats.audioSeconds += chunk.length / this.model.streaming.sampling_rate;
      this.stats.computeSeconds += (performance.now() - t0) / 1000;
      return this.#takeText();
    });
  }

  /** End of audio: flush the tail and resolve to the remaining text. */
  finish() {
    if (this.closing) throw new VoxcError("finish() was already called on this stream");
    this.closing = true;
    return this.model.exclusive(async () => {
      const t0 = performance.now();
      try {
        if (this.finalTokens === null) this.#end();
        await this.#advance();
      } finally {
        this.finished = true;
        this.model.releaseSlot(this.slot);
      }
      this.stats.computeSeconds += (performance.now() - t0) / 1000;
      return this.#takeText() + this.textDecoder.flush();
    });
  }

  /** Everything transcribed so far. */
  get text() {
    return this.textDecoder.text;
  }

  /** Compute time over audio time (below 1: faster than real time). */
  get realTimeFactor() {
    return this.stats.audioSeconds ? this.stats.computeSeconds / this.stats.audioSeconds : 0;
  }

  #queue(pcm, padding) {
    if (this.finished || this.finalTokens !== null) {
      throw new VoxcError("this stream is finished; start a new one with model.stream()");
    }
    if (!padding) this.samplesFed += pcm.length;
    const step = this.model.streaming.max_tokens_per_encode * this.samplesPerToken;
    for (let begin = 0; begin < pcm.length; begin += step) {
      const window = this.framer.push(pcm.subarray(begin, begin + step));
      if (window !== null) this.windows.push(window);
    }
  }

  #end() {
    const spt = this.samplesPerToken;
    const st = this.model.streaming;
    const rightPad = (((-this.samplesFed) % spt) + spt) % spt + (this.delay + 1 + st.right_pad_buffer_tokens) * spt;
    this.#queue(new Float32Array(rightPad), true);
    this.finalTokens = Math.floor((this.leftPadTokens * spt + this.samplesFed + rightPad) / spt);
    const window = this.framer.flush();
    if (window !== null) this.windows.push(window);
  }

  #takeText() {
    const text = this.pendingText.join("");
    this.pendingText = [];
    return text;
  }

  #nextWindowTokens() {
    if (!this.windows.length) return 0;
    const st = this.model.streaming;
    let tokens = Math.floor((this.windows[0].length - st.window_size) / st.hop_length) + 1;
    tokens = Math.floor(tokens / st.mel_frames_per_token);
    if (this.audioTokens + tokens - this.position > st.audio_ring_rows) return 0;
    return tokens;
  }

  #decodeLimit() {
    if (this.ended) return this.position;
    if (this.finalTokens === null) return this.audioTokens;
    return Math.min(this.audioTokens, this.finalTokens - 1);
  }

  #decodeInput() {
    const p = this.position;
    const promptLen = this.prompt.length;
    if (p < promptLen) {
      const run = Math.min(promptLen, this.#decodeLimit()) - p;
      return [this.prompt.slice(p, p + run), run];
    }
    return [[this.lastToken], 1];
  }

  #accept(run, logits, token) {
    this.position += run;
    if (this.position < this.prompt.length) return;
    if (this.recordLogits) this.logits.push(logits);
    this.tokens.push(token);
    this.lastToken = token;
    let delta = "";
    if (token === this.eosId) {
      this.ended = true;
    } else {
      delta = this.textDecoder.push(token);
      this.pendingText.push(delta);
    }
    this.onStep?.({ token, delta, position: this.position, ms: this.stats.lastStepMs });
  }

  // voxc.runtime.session.advance for one stream: encode what is ready, decode what is ready, repeat.
  async #advance() {
    const model = this.model;
    const st = model.streaming;
    for (;;) {
      let progressed = false;
      if (this.#nextWindowTokens()) {
        const window = this.windows.shift();
        const melFrames = await model.encodeWindow([window], [this.slot], [this.encoderFrames]);
        const frames = Math.floor(melFrames / st.conv_stride);
        this.encoderFrames += frames;
        this.audioTokens += Math.floor(frames / st.downsample_factor);
        this.stats.encodeCalls++;
        progressed = true;
      }
      if (this.position < this.#decodeLimit()) {
        const [tokens, run] = this.#decodeInput();
        const needed = this.position + run >= this.prompt.length;   // a token comes out of this call
        const t0 = performance.now();
        const out = await model.decode([tokens], [this.slot], [this.position],
                                        { readTokens: needed, withLogits: needed && this.recordLogits });
        this.stats.lastStepMs = performance.now() - t0;
        this.stats.decodeCalls++;
        this.#accept(run, out.logits, out.tokens ? out.tokens[0] : -1);
        progressed = true;
      }
      if (!progressed) return;
    }
  }
}
