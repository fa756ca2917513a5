// ?bundle=<url of the bundle folder>.  Cases (each a patch of the bundle's manifest, maxStreams and
// a navigator.deviceMemory value in GiB) run through bundleRequirements + checkWebGPU; posts
// {ok, limits, deviceMemory, cases: [{name, ok, code, message, requirements}]} to /result.
const params = new URLSearchParams(location.search);
const post = (obj) => fetch("/result", { method: "POST", body: JSON.stringify(obj) });
try {
  const bundle = new URL(params.get("bundle"), location.href).href;
  const { bundleRequirements, checkWebGPU } = await import(new URL("voxc.js", bundle).href);
  const manifest = await (await fetch(new URL("voxc-artifact.json", bundle))).json();
  const adapter = await navigator.gpu.requestAdapter();
  const limit = Math.min(adapter.limits.maxBufferSize, adapter.limits.maxStorageBufferBindingSize);
  const GiB = 2 ** 30;
  // one layer's decoder cache buffer of `bytes` per stream at its largest (the cache is one pool of
  // pages per layer, growing up to every stream's whole window)
  const withDecCache = (bytes) => (m) => {
    const spec = m.state.dec_cache;
    spec.tensor_bytes_per_stream = bytes;
    spec.bytes_per_stream = bytes * (spec.layers ?? 1);
    spec.tensor_bytes_per_page = bytes / spec.pages_per_stream;
    spec.bytes_per_page = spec.bytes_per_stream / spec.pages_per_stream;
  };
  // a decoder cache whose pool starts with `bytes` per stream (all layers), its whole window `most` bytes
  const withDecCacheStart = (bytes, most = bytes, pages = 1) => (m) => {
    const spec = m.state.dec_cache;
    spec.pages_per_stream = Math.max(pages, spec.pages_per_stream);
    spec.initial_pages_per_stream = 1;
    spec.bytes_per_page = bytes;
    spec.tensor_bytes_per_page = bytes / (spec.layers ?? 1);
    spec.bytes_per_stream = most;
    spec.tensor_bytes_per_stream = Math.min(most / (spec.layers ?? 1), Math.floor(limit / 4));
  };
  const cases = [
    { name: "as built" },
    { name: "as built, 1 GiB reported", deviceMemory: 1 },
    // half the adapter's buffer limit plus a little per stream: one stream fits, two do not
    { name: "cache, 1 stream", patch: withDecCache(Math.floor(limit / 2) + 4096) },
    { name: "cache, 2 streams", patch: withDecCache(Math.floor(limit / 2) + 4096), maxStreams: 2 },
    // 4 GiB of weights (many buffers) + 256 MiB of decoder cache (all layers) at load on a computer
    // reporting 2 GiB (less than 4 GiB); each buffer within SwiftShader's limits
    { name: "memory", deviceMemory: 2,
      patch: (m) => { m.gpu.total_param_bytes = 4 * GiB; withDecCacheStart(GiB / 4, GiB / 2, 2)(m); } },
    { name: "memory, 8 GiB reported (a lower bound)", deviceMemory: 8,
      patch: (m) => { m.gpu.total_param_bytes = 4 * GiB; withDecCacheStart(GiB / 4)(m); } },
    // 3.5 GiB of weights and a decoder cache of 2 MiB at load, 1 GiB at most: it starts on a computer
    // reporting 2 GiB (the caches grow with the audio heard; a full window would not fit)
    { name: "memory, caches start small", deviceMemory: 2,
      patch: (m) => { m.gpu.total_param_bytes = 3.5 * GiB; withDecCacheStart(2 << 20, GiB, 512)(m); } },
    { name: "workgroup storage", patch: (m) => { m.gpu.max_workgroup_storage_bytes = 16896; } },
    // a decoder cache and a weight tensor both above the limit: one message names both
    { name: "two buffers too large",
      patch: (m) => { withDecCache(limit + 4096)(m); m.params[0].shape = [limit / 4 + 1024]; } },
  ];
  const out = [];
  for (const c of cases) {
    const m = structuredClone(manifest);
    c.patch?.(m);
    const requirements = bundleRequirements(m, { maxStreams: c.maxStreams ?? 1 });
    try {
      await checkWebGPU({ requirements, deviceMemory: c.deviceMemory });
      out.push({ name: c.name, ok: true, requirements });
    } catch (err) {
      out.push({ name: c.name, ok: false, code: err.code, message: err.message, requirements });
    }
  }
  document.getElementById("status").textContent = "done";
  await post({ ok: true, limits: { maxBufferSize: adapter.limits.maxBufferSize,
                                   maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
                                   maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize },
               deviceMemory: navigator.deviceMemory ?? null, cases: out });
} catch (err) {
  await post({ ok: false, error: String(err && err.stack ? `${err}\n${err.stack}` : err) });
}
