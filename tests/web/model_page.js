// Test page driver: ?bundle=<url of the bundle folder>&cases=<url of cases.json>.
// cases.json: {
//   load: {maxStreams, kvPages},             // Voxc.load options
//   streams: [{clip: "<url of float32 LE PCM, 16 kHz>", chunk: <samples per feed, 0 = all at once>,
//              delayMs, recordLogits}],
//   concurrent: [[{clip, chunk, delayMs, start: <feed round it joins>}, ...], ...],   // streams fed in turn
//                                            // (a round feeds each open stream one chunk), then finished
//   decode: [[token ids], ...],              // TokenTable/IncrementalDecoder vs voxc.tokenizer
//   framer: [{clip, chunks: [sizes...]}],    // MelFramer windows vs voxc.model.mel
//   resample: [{inRate, outRate, freq, seconds}]}
// Posts {ok, streams: [...], concurrent: [[...]], kv, decode: [...], framer: [...], resample: [...], loadMs, ...}
// to /result (kv: each key/value cache pool's pages and growths at the end, and the most pages held at once).
const params = new URLSearchParams(location.search);
const status = document.getElementById("status");
const post = (path, obj) => fetch(path, { method: "POST", body: JSON.stringify(obj) });

for (const level of ["log", "warn", "error"]) {
  const orig = console[level].bind(console);
  console[level] = (...args) => { orig(...args); post("/log", `${level}: ${args.join(" ")}`); };
}
const fail = (err) => {
  status.textContent = "FAILED: " + err;
  post("/result", { ok: false, error: String(err && err.stack ? `${err}\n${err.stack}` : err),
                    code: err && err.code });
};
window.addEventListener("error", (e) => fail(e.error ?? e.message));
window.addEventListener("unhandledrejection", (e) => fail(e.reason));

const toB64 = (a) => {
  const u8 = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
  return btoa(s);
};
const fetchF32 = async (url) => new Float32Array(await (await fetch(url)).arrayBuffer());

try {
  const bundle = new URL(params.get("bundle"), location.href).href;
  const voxcjs = await import(new URL("voxc.js", bundle).href);
  const { Voxc, MelFramer, Resampler } = voxcjs;
  const spec = await (await fetch(params.get("cases"))).json();
  const phases = [];
  const t0 = performance.now();
  const model = await Voxc.load(bundle, {
    onProgress: (r) => {
      if (phases[phases.length - 1] !== r.phase || r.phase === "pipelines") console.log(`phase ${r.phase}: ${r.text}`);
      phases.push(r.phase);
      status.textContent = r.text;
    },
    ...(spec.load ?? {}),
  });
  const kvMost = {};
  const noteKv = () => {
    for (const [name, pool] of Object.entries(model.kv)) kvMost[name] = Math.max(kvMost[name] ?? 0, pool.pagesInUse);
  };
  const loadMs = performance.now() - t0;
  const clips = {};
  const clip = async (url) => (clips[url] ??= await fetchF32(url));

  const streams = [];
  for (const c of spec.streams ?? []) {
    const pcm = await clip(c.clip);
    const s = model.stream({ delayMs: c.delayMs, recordLogits: !!c.recordLogits });
    const deltas = [];
    const t = performance.now();
    const step = c.chunk > 0 ? c.chunk : pcm.length;
    for (let i = 0; i < pcm.length; i += step) {
      deltas.push(await s.feed(pcm.subarray(i, i + step)));
      noteKv();
    }
    deltas.push(await s.finish());
    const ms = performance.now() - t;
    const logits = c.recordLogits ? s.logits.map((l) => toB64(l)) : null;
    streams.push({ clip: c.clip, chunk: c.chunk, text: deltas.join(""), deltas, tokens: s.tokens, logits, ms,
                   audioSeconds: s.stats.audioSeconds, rtf: s.realTimeFactor, stats: s.stats });
    status.textContent = `stream ${streams.length}/${spec.streams.length}`;
  }

  const concurrent = [];
  for (const group of spec.concurrent ?? []) {
    const open = [];
    const out = group.map(() => ({ deltas: [] }));
    for (let round = 0; ; round++) {
      group.forEach((c, k) => {
        if (c.start === round) open.push({ k, c, s: model.stream({ delayMs: c.delayMs }), at: 0 });
      });
      let fed = false;
      for (const o of open) {
        const pcm = await clip(o.c.clip);
        if (o.at >= pcm.length) continue;
        out[o.k].deltas.push(await o.s.feed(pcm.subarray(o.at, o.at + o.c.chunk)));
        o.at += o.c.chunk;
        fed = true;
        noteKv();
      }
      if (!fed && open.length === group.length) break;
    }
    for (const o of open) {
      out[o.k].deltas.push(await o.s.finish());
      Object.assign(out[o.k], { clip: o.c.clip, tokens: o.s.tokens, text: out[o.k].deltas.join(""), slot: o.s.slot });
    }
    concurrent.push(out);
  }
  const kv = Object.fromEntries(Object.entries(model.kv).map(([name, pool]) => [name, {
    size: pool.size, maxPages: pool.maxPages, growths: pool.growths, pagesInUse: pool.pagesInUse,
    mostInUse: kvMost[name] ?? 0, pageRows: pool.pageRows, perStream: pool.perStream,
    buffers: pool.tensors.map((t) => t.shape[0]) }]));

  const decode = (spec.decode ?? []).map((ids) => {
    const d = model.tokens.incrementalDecoder();
    const deltas = ids.map((i) => d.push(i));
    deltas.push(d.flush());
    return { whole: model.tokens.decode(ids), deltas };
  });

  const framer = [];
  for (const f of spec.framer ?? []) {
    const pcm = await clip(f.clip);
    const m = new MelFramer(model.streaming, model.streaming.mel_frames_per_token);
    const windows = [];
    let pos = 0;
    for (const n of f.chunks) {
      const w = m.push(pcm.subarray(pos, pos + n));
      pos += n;
      if (w) windows.push(toB64(w));
    }
    const w = m.flush();
    if (w) windows.push(toB64(w));
    framer.push(windows);
  }

  const resample = (spec.resample ?? []).map(({ inRate, outRate, freq, seconds, chunk }) => {
    const n = Math.round(inRate * seconds);
    const x = new Float32Array(n);
    for (let i = 0; i < n; i++) x[i] = 0.5 * Math.sin(2 * Math.PI * freq * i / inRate);
    const r = new Resampler(inRate, outRate);
    const parts = [];
    for (let i = 0; i < n; i += chunk) parts.push(r.push(x.subarray(i, i + chunk)));
    parts.push(r.flush());
    const y = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0;
    for (const p of parts) { y.set(p, o); o += p.length; }
    return { length: y.length, data_b64: toB64(y) };
  });

  const info = model.gpu.info;
  status.textContent = "done";
  await post("/result", {
    ok: true, loadMs, phases: [...new Set(phases)], streams, concurrent, kv, kvBytesInUse: model.kvBytesInUse,
    footprint: { stateBytes: model.footprint.stateBytes, maxStateBytes: model.footprint.maxStateBytes },
    decode, framer, resample,
    adapter: { vendor: info.vendor, architecture: info.architecture },
    limits: { maxStorageBufferBindingSize: model.gpu.limits.maxStorageBufferBindingSize,
              maxBufferSize: model.gpu.limits.maxBufferSize,
              maxStorageBuffersPerShaderStage: model.gpu.limits.maxStorageBuffersPerShaderStage,
              maxComputeWorkgroupStorageSize: model.gpu.limits.maxComputeWorkgroupStorageSize,
              maxComputeInvocationsPerWorkgroup: model.gpu.limits.maxComputeInvocationsPerWorkgroup },
  });
} catch (err) {
  fail(err);
}
