// Test page driver: ?bundle=<url of the bundle folder>&cases=<url of cases.json>.
// cases.json: {"function": "forward", "cases": [{"shape": [...], "data_b64": "<float32 LE>"}]}.
// Posts {ok, outputs: [{shape, data_b64}], ...} to /result; console output goes to /log.
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

const b64ToF32 = (s) => {
  const bin = atob(s);
  const u8 = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return new Float32Array(u8.buffer);
};
const bytesToB64 = (a) => {
  const u8 = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
  return btoa(s);
};

try {
  const bundle = new URL(params.get("bundle"), location.href).href;
  const { Voxc } = await import(new URL("voxc.js", bundle).href);
  const spec = await (await fetch(params.get("cases"))).json();
  const progress = [];
  const t0 = performance.now();
  const voxc = await Voxc.load(bundle, {
    onProgress: (r) => { progress.push(r.phase); status.textContent = r.text; },
  });
  const loadMs = performance.now() - t0;
  const outputs = [];
  const runMs = [];
  for (const c of spec.cases) {
    const t = performance.now();
    const [y] = await voxc.runFunction(spec.function, [{ data: b64ToF32(c.data_b64), shape: c.shape }]);
    runMs.push(performance.now() - t);
    outputs.push({ shape: y.shape, dtype: y.dtype, data_b64: bytesToB64(y.data) });
  }
  const info = voxc.gpu.info;
  status.textContent = "done";
  await post("/result", {
    ok: true, outputs, loadMs, runMs, phases: [...new Set(progress)],
    adapter: { vendor: info.vendor, architecture: info.architecture, description: info.description },
    features: voxc.gpu.features,
    limits: { maxStorageBufferBindingSize: voxc.gpu.limits.maxStorageBufferBindingSize,
              maxComputeInvocationsPerWorkgroup: voxc.gpu.limits.maxComputeInvocationsPerWorkgroup },
  });
} catch (err) {
  fail(err);
}
