// Run a voxc web bundle in Node.js on Dawn (npm "webgpu", the WebGPU implementation inside Chrome)
// through the same web/voxc.js the browser uses, and time it.
//
//   node bench/webgpu_dawn.mjs BUNDLE_DIR [--weights fetch|random] [--seconds 10] [--steps 200]
//        [--offline-seconds 60] [--expect expect.json] [--json out.json]
//        [--warm 5] [--encode-reps 10] [--encode-tokens 1,32]   (fewer: a quick rehearsal)
//        [--profile out.profile.json [--profile-check] [--profile-top 15]] [--pipelines async|blocking]
//
// Env: VOXC_WEBGPU_MODULE   path of the "webgpu" package (default: resolved from node_modules)
//      DAWN_FLAGS           comma-separated flags for create() (e.g. "backend=vulkan")
//
// What it measures (one JSON object on stdout, also written to --json):
//   load         seconds for manifest + wasm + weights (fetched, or random for a weight-less bundle)
//                + pipeline compilation (pipelines_s; --pipelines: Voxc.load's mode, default async),
//                and the adapter's info and limits;
//   stream       a synthetic clip (sine + noise) fed in 80 ms chunks through model.stream(): the
//                real-time factor, per-feed latency (median, p90, max) and decoder step times;
//   decode_step  model.decode() of one token, readback of the token id included (the stream's loop);
//   decode_nosync  the same steps queued without waiting for the token (GPU time per step);
//   encode       one 80 ms window (mel + encoder + adapter) and one 32-token window (--encode-tokens);
//   offline      with --offline-seconds N: a clip of N seconds given to one feed() + finish() (the
//                session encodes it in 32-token windows and decodes token by token): the offline RTF;
//   check        with --expect {clip: {file: "clip.f32"} or {seconds, freq, seed}, chunk, delay_ms, tokens}:
//                the stream's token ids against the CPU (llvm) build's for the same clip (the tiny model).
//   profile      with --profile PATH: every kernel of one decoder step (decode() with the token readback)
//                and of one 80 ms stream step (a feed of the stream above, past its prompt, that runs one
//                encoder window and one decoder step) timed with timestamp queries (Voxc.load's
//                profileKernels): per kernel (WGSL entry point) total ms, count, mean and max, largest
//                first, with the step's wall time, written to PATH; the top N go to stderr.  That feed's
//                latency is left out of stream.feed_ms.  --profile-check: exit 1 unless the profile is
//                sane (every name is one of the bundle's kernels, every time > 0, the kernels' sum
//                within the step's wall time).  Profiling turns off Dawn's timestamp quantization.
//                With it, copy: a vec4 copy kernel over --copy-mb MB (default 256), timed the same way
//                (read + write GB/s), and q4_gemv: each quantized GEMV of the decoder step's weight
//                reads in GB/s and as a share of that copy; q4_gemv_min_of_copy_bw the smallest share.
// Dawn does not accept lavapipe; on a CPU-only machine point the Vulkan loader at Chromium's
// SwiftShader (VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json) to try it out.
import { copyFileSync, createReadStream, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { extname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const bundleDir = resolve(args.find((a, i) => !a.startsWith("--") && !(i > 0 && args[i - 1].startsWith("--"))) ?? ".");
const weights = opt("weights", "fetch");
const seconds = Number(opt("seconds", "10"));
const steps = Number(opt("steps", "200"));
const offlineSeconds = Number(opt("offline-seconds", "0"));
const expectPath = opt("expect", null);
const jsonOut = opt("json", null);
const warm = Number(opt("warm", "5"));
const encodeReps = Number(opt("encode-reps", "10"));
const encodeTokens = opt("encode-tokens", null);
const profilePath = opt("profile", null);
const profileCheck = args.includes("--profile-check");
const profileTop = Number(opt("profile-top", "15"));
const pipelines = opt("pipelines", "async");
const copyMB = Number(opt("copy-mb", "256"));

// ---- WebGPU in Node: Dawn's navigator.gpu ----------------------------------------------------
const webgpuModule = process.env.VOXC_WEBGPU_MODULE
  ? pathToFileURL(join(process.env.VOXC_WEBGPU_MODULE, "index.js")).href : "webgpu";
const { create, globals } = await import(webgpuModule);
Object.assign(globalThis, globals);
const dawnFlags = (process.env.DAWN_FLAGS ?? "").split(",").filter(Boolean);
// Dawn rounds timestamps to 65.536 us unless told not to (a browser's guard against timing attacks),
// which would zero most kernels of a step.
if (profilePath && !dawnFlags.some((f) => f.includes("timestamp_quantization"))) {
  dawnFlags.push("disable-dawn-features=timestamp_quantization");
}
Object.defineProperty(globalThis, "navigator", { value: { gpu: create(dawnFlags) }, configurable: true });

// ---- the bundle over HTTP (voxc.js fetches URLs; Node's fetch has no file://) ------------------
const TYPES = { ".js": "text/javascript", ".json": "application/json", ".wasm": "application/wasm" };
const server = createServer((req, res) => {
  const path = join(bundleDir, decodeURIComponent(new URL(req.url, "http://x").pathname));
  if (!path.startsWith(bundleDir)) { res.writeHead(403).end(); return; }
  let size;
  try { size = statSync(path).size; } catch { res.writeHead(404).end(); return; }
  res.writeHead(200, { "content-type": TYPES[extname(path)] ?? "application/octet-stream", "content-length": size });
  createReadStream(path).pipe(res);
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const base = `http://127.0.0.1:${server.address().port}/`;

// tvmjs.js is UMD: in Node it is a CommonJS module.  voxc.js is an ES module with no imports; its
// file ends in .js, which Node 20 would read as CommonJS, so it is imported as a copy named .mjs.
globalThis.tvmjs = createRequire(import.meta.url)(join(bundleDir, "tvmjs.js"));
const voxcDir = mkdtempSync(join(tmpdir(), "voxc-"));
const voxcModule = join(voxcDir, "voxc.mjs");
copyFileSync(join(bundleDir, "voxc.js"), voxcModule);
const { Voxc } = await import(pathToFileURL(voxcModule).href);
rmSync(voxcDir, { recursive: true, force: true });   // imported: the copy is no longer needed

const stats = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return { n: s.length, mean: s.reduce((a, b) => a + b, 0) / Math.max(1, s.length), median: q(0.5), p90: q(0.9), max: s[s.length - 1] };
};
const round = (x) => (typeof x === "number" ? Math.round(x * 1000) / 1000 : x);
const roundAll = (o) => JSON.parse(JSON.stringify(o, (k, v) => round(v)));

// A kernel profile (Voxc.profileKernels) in the result's snake_case, kernels largest first.
function profileSummary(p, extra = {}) {
  return {
    wall_ms: p.wallMs, gpu_ms: p.gpuMs, span_ms: p.spanMs, passes: p.passes, invalid_passes: p.invalidPasses,
    ...extra,
    kernels: p.kernels.map((k) => ({ name: k.name, count: k.count, total_ms: k.totalMs, mean_ms: k.meanMs,
                                     max_ms: k.maxMs, share: p.gpuMs ? k.totalMs / p.gpuMs : 0 })),
  };
}

// What makes a step's profile implausible: names that are not the bundle's kernels, empty or
// non-positive times, the kernels' sum (or their span) above the step's wall time.
function profileProblems(step, what, bundleKernels) {
  if (!step) return [`${what}: no profile`];
  const problems = [];
  const known = new Set(bundleKernels);
  if (!(step.passes > 0)) problems.push(`${what}: no kernel was timed`);
  if (step.invalid_passes) problems.push(`${what}: ${step.invalid_passes} passes ended before they began`);
  for (const k of step.kernels) {
    if (!known.has(k.name)) problems.push(`${what}: ${k.name} is not a kernel of the bundle`);
    if (!(k.total_ms > 0)) problems.push(`${what}: ${k.name} took ${k.total_ms} ms`);
  }
  if (!(step.gpu_ms > 0)) problems.push(`${what}: the kernels' sum is ${step.gpu_ms} ms`);
  if (step.gpu_ms > step.wall_ms) problems.push(`${what}: the kernels' sum ${step.gpu_ms} ms exceeds the wall time ${step.wall_ms} ms`);
  if (step.span_ms > step.wall_ms) problems.push(`${what}: the kernels' span ${step.span_ms} ms exceeds the wall time ${step.wall_ms} ms`);
  return problems;
}

// A copy kernel's bandwidth, timed like the model's kernels (the profiler times every pass).
const COPY_WGSL = `
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn copy_vec4(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let i = g.x + g.y * n.x * 256u;
  if (i < arrayLength(&src)) { dst[i] = src[i]; }
}`;

async function copyBandwidth(model, megabytes, reps = 10) {
  const device = model.gpu.device;
  const limit = Math.min(device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize);
  const bytes = Math.floor(Math.min(megabytes * 2 ** 20, limit) / 16) * 16;
  const usage = GPUBufferUsage.STORAGE;
  const src = device.createBuffer({ size: bytes, usage });
  const dst = device.createBuffer({ size: bytes, usage });
  const pipeline = device.createComputePipeline({
    layout: "auto", compute: { module: device.createShaderModule({ code: COPY_WGSL }), entryPoint: "copy_vec4" } });
  const bindGroup = device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries: [
    { binding: 0, resource: { buffer: src } }, { binding: 1, resource: { buffer: dst } }] });
  const groups = Math.ceil(bytes / 16 / 256);
  const x = Math.min(groups, 65535);
  const run = () => {
    const encoder = device.createCommandEncoder();
    for (let r = 0; r < reps; r++) {
      const pass = encoder.beginComputePass();
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, bindGroup);
      pass.dispatchWorkgroups(x, Math.ceil(groups / x));
      pass.end();
    }
    device.queue.submit([encoder.finish()]);
    return device.queue.onSubmittedWorkDone();
  };
  await run();   // warm
  const p = await model.profileKernels(run);
  const copy = p.kernels.find((k) => k.name === "copy_vec4");
  src.destroy();
  dst.destroy();
  return { bytes, reps, mean_ms: copy.meanMs, max_ms: copy.maxMs,
           gbps_read_plus_write: (2 * bytes) / (copy.meanMs / 1e3) / 1e9 };
}

// Bits per weight of voxc's quantized kernel layouts (voxc.quant.formats): the weight bytes a GEMV reads.
const BITS_PER_WEIGHT = { q4_0: 4.5, q4_k: 4.5, q8_0: 8.5 };

// Each quantized GEMV kernel of a step (gemm_q4_k_NxK_..., gemv_...): weight GB/s and share of the copy.
function gemvBandwidth(step, copyGBps) {
  const rows = [];
  for (const k of step.kernels) {
    const m = /^gem[mv]_(q4_0|q4_k|q8_0)_(\d+)x(\d+)_/.exec(k.name);
    if (!m) continue;
    const bytes = Number(m[2]) * Number(m[3]) * BITS_PER_WEIGHT[m[1]] / 8;
    const gbps = bytes * k.count / (k.total_ms / 1e3) / 1e9;
    rows.push({ name: k.name, count: k.count, mean_us: 1e3 * k.total_ms / k.count, gbps, of_copy: gbps / copyGBps });
  }
  return rows.sort((a, b) => a.of_copy - b.of_copy);
}

function printTop(step, what) {
  const lines = [`${what}: ${step.passes} kernels, ${step.gpu_ms.toFixed(3)} ms GPU (span ${step.span_ms.toFixed(3)}, ` +
                 `wall ${step.wall_ms.toFixed(3)} ms); top ${profileTop}:`];
  for (const k of step.kernels.slice(0, profileTop)) {
    lines.push(`  ${k.total_ms.toFixed(3).padStart(9)} ms ${(100 * k.share).toFixed(1).padStart(5)}% ` +
               `x${String(k.count).padEnd(4)} ${k.name}`);
  }
  console.error(lines.join("\n"));
}

function clip({ seconds: secs, freq = 440, seed = 0 }) {
  // 0.3 sin + 0.05 noise (a linear congruential generator: reproducible in Python, see expect files)
  const n = Math.round(16000 * secs);
  const x = new Float32Array(n);
  let state = seed >>> 0;
  for (let i = 0; i < n; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    x[i] = 0.3 * Math.sin(2 * Math.PI * freq * i / 16000) + 0.05 * (state / 2 ** 32 - 0.5) * 2;
  }
  return x;
}

const out = { bundle: bundleDir, weights, node: process.version, dawn_flags: dawnFlags };
try {
  const phases = {};
  const t0 = performance.now();
  const model = await Voxc.load(base, {
    weights, logger: () => {}, profileKernels: Boolean(profilePath), pipelines,
    onProgress: (r) => { phases[r.phase] ??= (performance.now() - t0) / 1000; },
  });
  const info = model.gpu.info;
  const l = model.gpu.limits;
  out.adapter = { vendor: info.vendor, architecture: info.architecture, description: info.description,
                  features: model.gpu.features,
                  limits: { maxBufferSize: l.maxBufferSize, maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
                            maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
                            maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
                            maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize } };
  const m = model.manifest;
  out.model = { id: m.id, config: { encoder: m.config.encoder, decoder: m.config.decoder }, dtype: m.model_dtype,
                quantization: m.quantization, param_bytes: m.gpu.total_param_bytes,
                state_bytes: m.gpu.state_bytes_per_stream, embedding: m.embedding, kernels: m.gpu.num_kernels };
  out.load = { seconds: model.loadSeconds, phase_start_s: phases, weights: model.weightStats, pipelines,
               pipelines_s: phases.ready - phases.pipelines };

  // the stream, as the demo feeds a microphone: 80 ms chunks
  const spec = expectPath ? JSON.parse(readFileSync(expectPath, "utf8")) : null;
  const pcm = spec?.clip?.file   // raw float32 LE PCM at 16 kHz, next to the expect file
    ? new Float32Array(readFileSync(join(resolve(expectPath, ".."), spec.clip.file)).buffer.slice(0))
    : clip(spec?.clip ?? { seconds });
  const chunk = spec?.chunk ?? 1280;
  const s = model.stream({ delayMs: spec?.delay_ms ?? m.streaming.default_delay_ms });
  const feedMs = [];
  const stepMs = [];
  let text = "";
  let streamProfile = null;
  const ts = performance.now();
  for (let i = 0; i < pcm.length; i += chunk) {
    const piece = pcm.subarray(i, i + chunk);
    if (profilePath && !streamProfile && s.tokens.length > 0) {   // past the prompt: a steady-state step
      const before = { encode: s.stats.encodeCalls, decode: s.stats.decodeCalls };
      const p = await model.profileKernels(() => s.feed(piece));
      text += p.result;
      const calls = { encode_calls: s.stats.encodeCalls - before.encode, decode_calls: s.stats.decodeCalls - before.decode };
      if (calls.encode_calls === 1 && calls.decode_calls === 1) {
        streamProfile = profileSummary(p, { feed_index: i / chunk, ...calls });
      }
      continue;
    }
    const tf = performance.now();
    text += await s.feed(piece);
    feedMs.push(performance.now() - tf);
    stepMs.push(s.stats.lastStepMs);
  }
  const tfin = performance.now();
  text += await s.finish();
  const finishMs = performance.now() - tfin;
  const wall = (performance.now() - ts) / 1000;
  out.stream = { audio_s: pcm.length / 16000, wall_s: wall, rtf: wall / (pcm.length / 16000), chunk,
                 feed_ms: stats(feedMs), decode_step_ms: stats(stepMs.filter((x) => x > 0)), finish_ms: finishMs,
                 tokens: s.tokens.length, decode_calls: s.stats.decodeCalls, encode_calls: s.stats.encodeCalls,
                 first_tokens: s.tokens.slice(0, 24), text_chars: text.length };
  if (spec?.tokens) {
    const same = spec.tokens.length === s.tokens.length && spec.tokens.every((t, i) => t === s.tokens[i]);
    const firstDiff = spec.tokens.findIndex((t, i) => t !== s.tokens[i]);
    out.check = { pass: same, expected: spec.tokens.length, got: s.tokens.length, first_difference: same ? null : firstDiff };
  }

  // decoder steps on their own, past a prompt, in a fresh stream slot
  model.resetSlot(0, model.delayTokens(m.streaming.default_delay_ms));
  const d1 = [];
  let before = null;
  for (let i = 0; i < steps + warm; i++) {
    if (i === warm) before = model.dispatchStats();
    const t = performance.now();
    await model.decode([[1000 + (i % 200)]], [0], [50 + i]);
    if (i >= warm) d1.push(performance.now() - t);
  }
  out.decode_step = stats(d1);
  const after = model.dispatchStats();
  // per step past the warm-up: kernels dispatched, bind groups made (0 once every launch recurs), submits
  out.decode_dispatch = Object.fromEntries(Object.keys(after).map((k) => [k, (after[k] - before[k]) / steps]));
  const tq = performance.now();
  const queued = [];
  for (let i = 0; i < steps; i++) {   // not awaited one by one: the steps queue up on the GPU
    queued.push(model.decode([[1000 + (i % 200)]], [0], [50 + steps + warm + i], { readTokens: false }));
  }
  await Promise.all(queued);
  await model.dev.sync();
  out.decode_nosync = { ms_per_step: (performance.now() - tq) / steps, steps };

  if (profilePath) {
    const bundleKernels = model.kernelNames();
    const p = await model.profileKernels(() => model.decode([[1000]], [0], [50 + 2 * steps + warm]));
    const profile = { bundle: bundleDir, adapter: out.adapter.description, kernels_in_bundle: bundleKernels.length,
                      decode_step: profileSummary(p), stream_step: streamProfile };
    profile.problems = [...profileProblems(profile.decode_step, "decode step", bundleKernels),
                        ...profileProblems(profile.stream_step, "stream step", bundleKernels)];
    writeFileSync(profilePath, JSON.stringify(roundAll(profile), null, 1));
    printTop(profile.decode_step, "decode step");
    if (streamProfile) printTop(streamProfile, "80 ms stream step");
    for (const problem of profile.problems) console.error(`profile: ${problem}`);
    out.profile = { file: profilePath, decode_step_gpu_ms: profile.decode_step.gpu_ms,
                    stream_step_gpu_ms: streamProfile?.gpu_ms ?? null, problems: profile.problems.length };
    out.copy = await copyBandwidth(model, copyMB);
    out.q4_gemv = gemvBandwidth(profile.decode_step, out.copy.gbps_read_plus_write);
    out.q4_gemv_min_of_copy_bw = out.q4_gemv.length ? out.q4_gemv[0].of_copy : null;
    console.error(`copy ${out.copy.gbps_read_plus_write.toFixed(0)} GB/s; decode-step GEMVs ` +
                  out.q4_gemv.map((g) => `${g.name.split("_m_")[0]} ${(100 * g.of_copy).toFixed(0)}%`).join(", "));
  }

  // encoder windows: one 80 ms step and 32 tokens (the session's largest)
  const st = m.streaming;
  const enc = {};
  const windows = encodeTokens ? encodeTokens.split(",").map(Number) : [1, st.max_tokens_per_encode];
  for (const tokens of windows) {
    const frames = tokens * st.mel_frames_per_token;
    const win = pcm.slice(0, (frames - 1) * st.hop_length + st.window_size);
    const times = [];
    for (let i = 0; i < encodeReps + 2; i++) {
      const t = performance.now();
      await model.encodeWindow([win], [0], [1000 + i * frames / st.conv_stride]);
      await model.dev.sync();
      if (i >= 2) times.push(performance.now() - t);
    }
    enc[`tokens_${tokens}`] = stats(times);
  }
  out.encode = enc;

  if (offlineSeconds > 0) {   // the whole clip at once, as voxc transcribe does offline
    const long = clip({ seconds: offlineSeconds, freq: 330, seed: 7 });
    const so = model.stream({ delayMs: m.streaming.default_delay_ms });
    const t = performance.now();
    let otext = await so.feed(long);
    otext += await so.finish();
    const w = (performance.now() - t) / 1000;
    out.offline = { audio_s: offlineSeconds, wall_s: w, rtf: w / offlineSeconds, tokens: so.tokens.length,
                    decode_calls: so.stats.decodeCalls, encode_calls: so.stats.encodeCalls, text_chars: otext.length };
  }
  out.ok = true;
  model.dispose();
} catch (err) {
  out.ok = false;
  out.error = String(err?.stack ?? err);
}
server.close();
const result = roundAll(out);
const json = JSON.stringify(result, null, 1);
if (jsonOut) writeFileSync(jsonOut, json);
console.log(json);
const profileSane = !profileCheck || result.profile?.problems === 0;
process.exit(result.ok && (result.check?.pass ?? true) && profileSane ? 0 : 1);
