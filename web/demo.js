// The voxc demo page: loads the bundle with voxc.js and transcribes the microphone (AudioWorklet
// capture, resampled to 16 kHz) or a dropped audio file (decodeAudioData, resampled to 16 kHz),
// showing the transcript and the measured real-time factor as it goes.
import { Voxc, VoxcError, Resampler, audioBufferTo16k } from "./voxc.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const bundleUrl = new URL(query.get("bundle") ?? "./", location.href).href;
const RATE = 16000;
const FEED_SAMPLES = 1280;   // 80 ms: one decoder step per feed

const ui = {
  status: $("status"), error: $("error"), mic: $("mic"), micLabel: $("mic-label"), delay: $("delay"),
  drop: $("drop"), file: $("file"), transcript: $("transcript"), rtf: $("rtf"), step: $("step"),
  audioTime: $("audio-time"), info: $("model-info"),
  bars: {
    download: [$("download-progress"), $("download-text")],
    compile: [$("compile-progress"), $("compile-text")],
  },
};

let model = null;
let session = null;   // {stream, kind: "mic" | "file", ...}
const events = [];    // what happened, for ?report

function showError(err) {
  const message = err instanceof VoxcError || err?.name === "VoxcError" ? err.message : String(err?.message ?? err);
  ui.error.innerHTML = "";
  const title = document.createElement("strong");
  title.textContent = err?.code === "no-webgpu" || err?.code === "no-adapter" ? "WebGPU is not available"
    : err?.code === "limit" || err?.code === "memory" ? "This GPU cannot hold the model" : "Something went wrong";
  ui.error.append(title, document.createTextNode(message));
  ui.error.hidden = false;
  ui.status.textContent = "Not ready";
  events.push({ error: message, code: err?.code ?? null });
}

function setBar(which, progress, text) {
  const [bar, label] = ui.bars[which];
  bar.value = Math.max(0, Math.min(1, progress));
  label.textContent = text;
  label.title = text;
}

function onProgress(r) {
  if (r.phase === "wasm" || r.phase === "weights") {
    setBar("download", r.phase === "wasm" ? 0 : r.progress, r.phase === "wasm" ? "model code" : `${Math.round(r.progress * 100)}%`);
    ui.status.textContent = r.text;
  } else if (r.phase === "pipelines") {
    setBar("download", 1, "done");
    setBar("compile", r.progress, `${Math.round(r.progress * 100)}%`);
    ui.status.textContent = r.text;
  } else if (r.phase === "ready") {
    setBar("download", 1, "done");
    setBar("compile", 1, "done");
  } else {
    ui.status.textContent = r.text;
  }
}

// ---- transcript and live statistics ------------------------------------------------------------
function resetTranscript() {
  ui.transcript.textContent = "";
}

function appendText(delta) {
  if (!delta) return;
  ui.transcript.querySelector(".placeholder")?.remove();
  ui.transcript.append(document.createTextNode(delta));
}

function showStats(stream) {
  const { audioSeconds, lastStepMs } = stream.stats;
  const rtf = stream.realTimeFactor;
  ui.rtf.textContent = `RTF ${rtf.toFixed(2)}`;
  ui.rtf.className = rtf === 0 ? "" : rtf < 1 ? "fast" : "slow";
  ui.step.textContent = `step ${lastStepMs.toFixed(0)} ms`;
  ui.audioTime.textContent = `audio ${audioSeconds.toFixed(1)} s`;
}

function newStream() {
  const delayMs = Number(ui.delay.value);
  const stream = model.stream({ delayMs });
  resetTranscript();
  return stream;
}

// ---- microphone ------------------------------------------------------------------------------
async function startMic() {
  const media = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
  const source = ctx.createMediaStreamSource(media);
  const node = new AudioWorkletNode(ctx, "voxc-capture", {
    processorOptions: { blockFrames: Math.round(ctx.sampleRate * 0.04) },   // 40 ms blocks
  });
  const resampler = new Resampler(ctx.sampleRate, RATE);
  const stream = newStream();
  let pending = new Float32Array(0);
  let chain = Promise.resolve();
  node.port.onmessage = (e) => {
    const pcm = resampler.push(e.data);
    const joined = new Float32Array(pending.length + pcm.length);
    joined.set(pending);
    joined.set(pcm, pending.length);
    pending = joined;
    while (pending.length >= FEED_SAMPLES) {
      const chunk = pending.slice(0, FEED_SAMPLES);
      pending = pending.slice(FEED_SAMPLES);
      chain = chain.then(() => stream.feed(chunk)).then((delta) => { appendText(delta); showStats(stream); })
        .catch(showError);
    }
  };
  source.connect(node);
  session = {
    kind: "mic", stream,
    async stop() {
      media.getTracks().forEach((t) => t.stop());
      source.disconnect();
      node.disconnect();
      await ctx.close();
      const tail = resampler.flush();
      const rest = new Float32Array(pending.length + tail.length);
      rest.set(pending);
      rest.set(tail, pending.length);
      await chain;
      if (rest.length) appendText(await stream.feed(rest));
      appendText(await stream.finish());
      showStats(stream);
    },
  };
  ui.mic.classList.add("live");
  ui.micLabel.textContent = "Stop";
  ui.status.textContent = `Listening (${ctx.sampleRate} Hz microphone, resampled to 16 kHz)`;
}

async function toggleMic() {
  ui.error.hidden = true;
  if (session?.kind === "mic") {
    const s = session;
    session = null;
    ui.mic.classList.remove("live");
    ui.micLabel.textContent = "Start microphone";
    await s.stop();
    ui.status.textContent = "Ready";
    return;
  }
  if (session) return;
  try {
    await startMic();
  } catch (err) {
    session = null;
    showError(err?.name === "NotAllowedError"
      ? new VoxcError("Microphone access was denied; allow it in the address bar to transcribe live audio.")
      : err?.name === "NotFoundError" ? new VoxcError("No microphone was found.") : err);
  }
}

// ---- files -----------------------------------------------------------------------------------
async function decodeFile(bytes) {
  // decodeAudioData resamples to its context's rate: a 16 kHz context gives 16 kHz directly (a
  // 16 kHz file's samples unchanged); audioBufferTo16k then only mixes to mono (and resamples in JS
  // if a browser handed back another rate).
  let buffer;
  try {
    buffer = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(bytes);
  } catch (err) {
    throw new VoxcError(`This file could not be decoded as audio (${err?.message ?? err}).`);
  }
  return audioBufferTo16k(buffer, RATE);
}

async function transcribeBytes(bytes, name) {
  if (session) return;
  ui.error.hidden = true;
  const stream = newStream();
  session = { kind: "file", stream };
  try {
    ui.status.textContent = `Decoding ${name}…`;
    const pcm = await decodeFile(bytes);
    ui.status.textContent = `Transcribing ${name} (${(pcm.length / RATE).toFixed(1)} s)…`;
    for (let i = 0; i < pcm.length; i += FEED_SAMPLES) {
      appendText(await stream.feed(pcm.subarray(i, i + FEED_SAMPLES)));
      showStats(stream);
    }
    appendText(await stream.finish());
    showStats(stream);
    ui.status.textContent = `Done: ${name}`;
    events.push({ file: name, text: stream.text, tokens: stream.tokens, rtf: stream.realTimeFactor });
  } catch (err) {
    showError(err);
  } finally {
    session = null;
  }
}

function setupDrop() {
  const { drop, file } = ui;
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer?.files?.[0];
    if (f && model) await transcribeBytes(await f.arrayBuffer(), f.name);
  });
  file.addEventListener("change", async () => {
    const f = file.files?.[0];
    if (f && model) await transcribeBytes(await f.arrayBuffer(), f.name);
    file.value = "";
  });
}

// ---- start -----------------------------------------------------------------------------------
function enableControls() {
  const st = model.streaming;
  for (const k of st.allowed_delay_tokens) {
    const ms = k * st.ms_per_token;
    const opt = new Option(`${ms} ms`, String(ms));
    ui.delay.append(opt);
  }
  ui.delay.value = String(query.get("delay") ?? st.default_delay_ms);
  ui.delay.disabled = false;
  ui.mic.disabled = !navigator.mediaDevices?.getUserMedia;
  if (ui.mic.disabled) ui.mic.title = "This browser offers no microphone access here";
  ui.file.disabled = false;
  ui.drop.setAttribute("aria-disabled", "false");
  const m = model.manifest;
  const c = m.config;
  const size = (bytes) => {
    const mb = bytes / 2 ** 20;
    return mb >= 1024 ? `${(mb / 1024).toFixed(2)} GB` : `${mb.toFixed(mb < 10 ? 2 : 0)} MB`;
  };
  ui.info.textContent = `Model ${m.id}: encoder ${c.encoder.n_layers}×${c.encoder.dim}, decoder ` +
    `${c.decoder.n_layers}×${c.decoder.dim}, ${m.model_dtype}${m.quantization ? " " + m.quantization : ""}, ` +
    `${size(m.gpu.total_param_bytes)} of weights + ${size(model.footprint.stateBytes)} of caches on the GPU` +
    ` · GPU: ${model.gpu.info.vendor || "?"} ${model.gpu.info.architecture || ""}`;
}

async function report() {
  const target = query.get("report");
  if (!target) return;
  const visible = (el) => !!el && !el.hidden && el.getClientRects().length > 0;
  const dom = {};
  for (const id of ["mic", "drop", "file", "delay", "download-progress", "compile-progress", "transcript", "rtf",
                    "step", "status", "error", "model-info"]) {
    const el = $(id);
    dom[id] = { exists: !!el, visible: visible(el), text: el?.textContent?.trim() ?? null,
                disabled: el?.disabled ?? null, value: el?.value ?? null };
  }
  await fetch(target, { method: "POST", body: JSON.stringify({ ok: true, dom, events, title: document.title }) });
}

async function main() {
  if (location.protocol === "file:") {
    // index.html's inline script has already said what to do (a browser that runs modules from
    // file:// still cannot fetch the model or use WebGPU there); say it here if it did not.
    if (ui.error.hidden) {
      showError(new VoxcError("This page must be served over http(s): run `python3 -m http.server 8000` in its " +
                              "folder and open http://localhost:8000/."));
    }
    return;
  }
  ui.mic.addEventListener("click", toggleMic);
  setupDrop();
  try {
    model = await Voxc.load(bundleUrl, { onProgress });
  } catch (err) {
    showError(err);
    await report();
    return;
  }
  ui.status.textContent = "Ready";
  ui.status.classList.add("ready");
  enableControls();
  const clip = query.get("clip");
  if (clip) {
    const resp = await fetch(clip);
    await transcribeBytes(await resp.arrayBuffer(), clip.split("/").pop());
  }
  await report();
}

main();
