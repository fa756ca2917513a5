"""The Voxtral model on WebGPU, end to end in a real browser: ``voxc build --target webgpu`` of the tiny
model, served on 127.0.0.1, streamed in headless Chromium (SwiftShader WebGPU, float32) through
web/voxc.js, the API the demo page uses; texts, token ids and logits compared with the CPU (llvm)
build's ``voxc.load(...).stream()``.  Plus the pieces of voxc.js on their own (mel framing, UTF-8 text,
resampling), the demo page (DOM checks + a screenshot), the Cache API on a second visit, the
messages for a browser without WebGPU and for a GPU whose limits are too small (naming the buffer),
and voxc.js's check of the bundle's memory (tests/web/check_page.js: the buffers and totals per
stream count, the adapter's buffer limits, navigator.deviceMemory) before anything is downloaded.

The model is the tiny checkpoint with encoder window 8 and decoder window 16 (conftest's
``tiny_ckpt_small_windows_dir``): the rings wrap many times within a clip (the decoder's even inside
the 39-token prompt), and SwiftShader runs it fast enough.  The bundle is built with a 64 KiB
embedding block so the tiny table is split (4 blocks) as the 4B model's is.

Needs emcc, npm (tvmjs, built once and cached), chromium; espeak-ng + sox for the speech clip.
"""
from __future__ import annotations

import base64
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "web"))
import browser_harness  # noqa: E402

from clips import espeak_wav, sine_with_noise  # noqa: E402
from targets import webgpu  # noqa: E402
from voxc import artifact  # noqa: E402
from voxc.model import embedding  # noqa: E402

HAVE_TOOLS = all(shutil.which(t) for t in ("emcc", "npm")) and browser_harness.find_chromium() is not None
pytestmark = pytest.mark.skipif(not HAVE_TOOLS, reason="needs emcc, npm and chromium "
                                                       "(apt-get install emscripten npm chromium)")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PAGE_DIR = Path(__file__).resolve().parent / "web"
EMBEDDING_PART_BYTES = 64 << 10   # the tiny table (1268 x 48 x 4 B = 243 KB) -> 4 blocks
LOGITS_RTOL = 1e-4
# (clip, samples per feed (0: the whole clip in one feed), delay ms, record logits)
STREAMS = [
    ("sine", 0, 480, False),
    ("sine", 1280, 480, True),
    ("sine", 4000, 480, False),
    ("sine", 1280, 160, False),
    ("speech", 1280, 480, True),
    ("speech", 2900, 480, False),
]
# (clip, samples per feed, delay ms, feed round it joins): streams at different positions sharing the
# key/value pools, fed in turn
CONCURRENT = [("sine", 1280, 480, 0), ("speech", 2000, 160, 6), ("sine", 4000, 960, 9)]


def _f32_b64(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


@pytest.fixture(scope="module")
def built(tiny_ckpt_small_windows_dir, tmp_path_factory):
    """(web bundle, llvm artifact, seconds for the web build) of the same checkpoint, both through
    voxc.build.build: the webgpu one with the test's embedding block size and a fast wasm link."""
    from voxc.build import build

    out = tmp_path_factory.mktemp("webgpu_model")
    target = webgpu.WebGPUTarget(embedding_part_bytes=EMBEDDING_PART_BYTES, optimize_wasm=False)
    bundle = build(tiny_ckpt_small_windows_dir, target, out / "bundle", progress=False)
    cpu = build(tiny_ckpt_small_windows_dir, "llvm", out / "cpu", progress=False)
    return bundle, cpu


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """name -> 16 kHz float32 PCM: 2.3 s of sine + noise, and espeak-ng's "hello world" if available."""
    clips = {"sine": sine_with_noise(2.3)}
    if shutil.which("espeak-ng") and shutil.which("sox"):
        import soundfile

        wav = espeak_wav("hello world", tmp_path_factory.mktemp("speech") / "hello.wav")
        clips["speech"], rate = soundfile.read(wav, dtype="float32")
        assert rate == 16000
        clips["speech_wav"] = wav
    return clips


@pytest.fixture(scope="module")
def cpu_model(built):
    import voxc

    return voxc.load(built[1])


def cpu_stream(model, pcm: np.ndarray, chunk: int, delay_ms: int):
    """The CPU reference: voxc.runtime's StreamingSession fed the same chunks (logits recorded)."""
    from voxc.runtime.session import StreamingSession

    s = StreamingSession(model, delay_ms=delay_ms, left_pad_tokens=model.left_pad_tokens, record_logits=True)
    step = chunk or len(pcm)
    deltas = [s.feed(pcm[i:i + step]) for i in range(0, len(pcm), step)]
    deltas.append(s.finish())
    return s, deltas


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """One Chromium profile for the model page and then the demo: the demo's load is a second visit."""
    return tmp_path_factory.mktemp("chromium_profile")


@pytest.fixture(scope="module")
def decode_cases(cpu_model):
    """Token id sequences for the text decoders: random byte tokens (mostly invalid UTF-8, multi-byte
    characters split across tokens), control tokens in between, and a valid multi-byte string."""
    tok = cpu_model.tokenizer
    rng = np.random.default_rng(3)
    n_special, vocab = tok.num_special_tokens, tok.vocab_size
    cases = [[int(i) for i in rng.integers(n_special, vocab, size=40)] for _ in range(3)]
    mixed = [int(i) for i in rng.integers(0, vocab, size=60)]
    utf8 = [n_special + b for b in "héllo wörld – ✓ 🎤".encode()]
    split = utf8[:3] + [tok.streaming_pad_id, tok.streaming_word_id] + utf8[3:] + [n_special + 0xE2]   # a cut tail
    return cases + [mixed, utf8, split, []]


@pytest.fixture(scope="module")
def site(built, audio, tmp_path_factory):
    """One server (one origin, so one Cache API storage) for the test page, the bundle and the clips:
    /pages/ (model_page.*, cases, raw clips), /bundle/ (the web bundle, its index.html the demo),
    /clips/ (the demo's WAV)."""
    root = tmp_path_factory.mktemp("site")
    pages, clips = root / "pages", root / "clips"
    pages.mkdir()
    clips.mkdir()
    for f in ("model_page.html", "model_page.js"):
        shutil.copy2(PAGE_DIR / f, pages / f)
    for name, pcm in audio.items():
        if isinstance(pcm, np.ndarray):
            (pages / f"{name}.f32").write_bytes(pcm.astype("<f4").tobytes())
    if "speech_wav" in audio:
        shutil.copy2(audio["speech_wav"], clips / "clip.wav")
    else:
        import soundfile

        soundfile.write(clips / "clip.wav", audio["sine"], 16000, subtype="FLOAT")
    with browser_harness.PageServer({"/pages/": pages, "/bundle/": built[0], "/clips/": clips}) as server:
        server.pages = pages
        yield server


@pytest.fixture(scope="module")
def model_run(site, audio, profile, decode_cases):
    """The test page streaming every case of STREAMS (and the framer/decoder/resampler cases) in one
    browser visit."""
    streams = [s for s in STREAMS if s[0] in audio]
    framer_chunks = [[100, 150, 3000, 1, 7000, 2560, 1281], [200, 201], [36800]]
    cases = {
        # pools of one page at load (the tiny bundle's windows are one page: 8 and 16 rows): the
        # streams one after the other reuse the pages a finished stream gave back; CONCURRENT's three
        # streams make both pools grow (1 -> 2 -> 3 pages) while streams run
        "load": {"maxStreams": 3, "kvPages": 1},
        "streams": [{"clip": f"/pages/{c}.f32", "chunk": n, "delayMs": d, "recordLogits": lg}
                    for c, n, d, lg in streams],
        "concurrent": [[{"clip": f"/pages/{c}.f32", "chunk": n, "delayMs": d, "start": start}
                        for c, n, d, start in CONCURRENT if c in audio]],
        "decode": decode_cases,
        "framer": [{"clip": "/pages/sine.f32", "chunks": ch} for ch in framer_chunks],
        "resample": [{"inRate": 48000, "outRate": 16000, "freq": 1000.0, "seconds": 0.5, "chunk": 1920},
                     {"inRate": 44100, "outRate": 16000, "freq": 440.0, "seconds": 0.5, "chunk": 128},
                     {"inRate": 16000, "outRate": 16000, "freq": 440.0, "seconds": 0.1, "chunk": 1000}],
    }
    (site.pages / "cases.json").write_text(json.dumps(cases))
    site.reset_log()
    t0 = time.perf_counter()
    result = browser_harness.run_page(site, site.url("pages/model_page.html?bundle=/bundle/&cases=/pages/cases.json"),
                                      user_data_dir=profile, timeout=300)
    result["wall_s"] = time.perf_counter() - t0
    result["gets"] = site.gets("/bundle/")
    assert result["ok"], result.get("error", "") + "\n" + "\n".join(site.logs[-20:])
    result["cases"] = cases
    result["stream_specs"] = streams
    result["framer_chunks"] = framer_chunks
    return result


# ---- the bundle --------------------------------------------------------------------------------
def test_bundle_layout(built):
    bundle, _ = built
    manifest = json.loads((bundle / artifact.MANIFEST).read_text())
    for name in ("index.html", "demo.js", "demo.css", "capture-worklet.js", "voxc.js", "tvmjs.js", "model.wasm",
                 "tensor-cache.json", "tokenizer.json", "voxc-artifact.json"):
        assert (bundle / name).is_file(), name
    assert manifest["format"] == artifact.FORMAT_VERSION and manifest["kind"] == "voxtral-realtime"
    assert manifest["param_mode"] == "packed" and manifest["model_dtype"] == "float32"
    assert manifest["mel_dtype"] == "float32"
    assert manifest["required_features"] == []
    assert manifest["max_workgroup_size"] <= 256
    assert manifest["gpu"]["max_storage_buffers_per_kernel"] <= 8   # WebGPU's default limit
    assert manifest["embedding"] == {"split": True, "parts": 4}
    cache = json.loads((bundle / "tensor-cache.json").read_text())
    parts = [r for shard in cache["records"] for r in shard["records"] if r["name"].startswith("tok_embeddings.")]
    assert [r["name"] for r in parts] == [f"tok_embeddings.parts.{k}.weight" for k in range(4)]
    assert all(r["nbytes"] <= EMBEDDING_PART_BYTES for r in parts) and sum(r["shape"][0] for r in parts) == 1268
    names = [r["name"] for shard in cache["records"] for r in shard["records"]]
    assert names == manifest["param_names"]
    for shard in cache["records"]:
        assert (bundle / shard["dataPath"]).stat().st_size == shard["nbytes"]
        assert all(r["byteOffset"] % 4 == 0 for r in shard["records"])
    st = manifest["streaming"]
    assert (st["left_pad_tokens"], st["default_delay_ms"], st["samples_per_token"]) == (32, 480, 1280)
    # `voxc.load` on a web bundle says what to do with it
    import voxc
    from voxc.errors import VoxcError

    with pytest.raises(VoxcError, match="web bundle"):
        voxc.load(bundle)


def test_tokenizer_table_matches_voxc_tokenizer(built, cpu_model):
    table = json.loads((built[0] / "tokenizer.json").read_text())
    tok = cpu_model.tokenizer
    assert (table["bos_id"], table["eos_id"], table["streaming_pad_id"]) == (tok.bos_id, tok.eos_id, tok.streaming_pad_id)
    assert table["num_special"] == tok.num_special_tokens and table["vocab_size"] == tok.vocab_size
    for i in (tok.num_special_tokens, tok.num_special_tokens + 104, tok.vocab_size - 1):
        assert base64.b64decode(table["pieces"][i - tok.num_special_tokens]) == tok.token_bytes(i)


def test_split_embedding_bounds():
    rows = embedding.embedding_part_rows(131072, 3072, "float32", webgpu.EMBEDDING_PART_BYTES)
    parts = embedding.embedding_part_bounds(131072, rows)
    assert parts[0][0] == 0 and parts[-1][1] == 131072
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(e - s for s, e in parts) * 3072 * 4 <= webgpu.EMBEDDING_PART_BYTES
    assert len(parts) == 13   # 1.5 GB of f32 rows in 13 buffers of <= 128 MiB
    assert embedding.embedding_part_rows(1268, 48, "float32", webgpu.EMBEDDING_PART_BYTES) is None


# ---- streaming in the browser vs the CPU --------------------------------------------------------
def test_first_visit_fetches_each_file_once(model_run):
    heavy = [p for p in model_run["gets"] if p.endswith((".wasm", ".bin"))]
    assert sorted(heavy) == sorted(set(heavy)) and "/bundle/model.wasm" in heavy
    assert any(p.endswith("params_shard_0.bin") for p in heavy)


def test_browser_streams_match_cpu(model_run, audio, cpu_model):
    """Text and token ids equal the llvm build's for every clip, chunk size and delay; logits within
    1e-4 relative (the browser's mel is float32, the CPU's float64)."""
    assert model_run["phases"][-1] == "ready" and "weights" in model_run["phases"]
    assert model_run["adapter"]["architecture"] == "swiftshader" or model_run["adapter"]["vendor"]
    for (clip, chunk, delay, with_logits), got in zip(model_run["stream_specs"], model_run["streams"]):
        ref, deltas = cpu_stream(cpu_model, audio[clip], chunk, delay)
        what = f"{clip} chunk={chunk} delay={delay}"
        assert got["tokens"] == ref.tokens, what
        assert got["text"] == "".join(deltas), what
        assert len(got["tokens"]) > 10, what
        if with_logits:
            assert len(got["logits"]) == len(ref.logits), what
            for step, (g, want) in enumerate(zip(got["logits"], ref.logits)):
                err = float(np.max(np.abs(_f32_b64(g) - want)) / np.max(np.abs(want)))
                assert err <= LOGITS_RTOL, f"{what} step {step}: logits rel err {err:.2e}"


def test_browser_streams_share_growing_kv_pools(model_run, audio, cpu_model):
    """Three streams at different positions, fed in turn: each one's tokens and text equal the llvm
    build's for the same clip, chunking and delay; the one-page pools grew to a page per stream while
    they ran (the tiny bundle's windows are one page), and every page came back at the end."""
    group = model_run["concurrent"][0]
    specs = [c for c in CONCURRENT if c[0] in audio]
    assert len(group) == len(specs) >= 2
    for (clip, chunk, delay, _), got in zip(specs, group):
        ref, deltas = cpu_stream(cpu_model, audio[clip], chunk, delay)
        what = f"concurrent {clip} chunk={chunk} delay={delay}"
        assert got["tokens"] == ref.tokens, what
        assert got["text"] == "".join(deltas), what
    assert len({got["slot"] for got in group}) == len(group)
    for name, pool in model_run["kv"].items():
        assert pool["perStream"] == 1 and pool["maxPages"] == 3, (name, pool)
        assert pool["growths"] >= 1 and pool["size"] == pool["mostInUse"] == len(group), (name, pool)
        assert pool["buffers"] == [pool["size"]] * len(pool["buffers"]), (name, pool)   # every layer's pool grew
        assert pool["pagesInUse"] == 0, (name, pool)
    assert model_run["kvBytesInUse"] == 0
    # sequential streams ran on the first page alone: the pool grew only for the concurrent ones
    assert model_run["footprint"]["stateBytes"] < model_run["footprint"]["maxStateBytes"]


def test_browser_text_deltas_arrive_while_streaming(model_run):
    """Fed in 80 ms chunks, the text comes out as the audio goes in (not all at finish())."""
    for (clip, chunk, _, _), got in zip(model_run["stream_specs"], model_run["streams"]):
        if chunk == 1280 and got["text"]:
            assert sum(1 for d in got["deltas"][:-1] if d) >= 3, got["deltas"]


def test_mel_framer_matches_python(model_run, audio, cpu_model):
    from voxc.runtime.framing import StreamingMelFramer

    pcm = audio["sine"]
    for chunks, got in zip(model_run["framer_chunks"], model_run["framer"]):
        framer = StreamingMelFramer(cpu_model.config.audio)
        want, pos = [], 0
        for n in chunks:
            w = framer.push(pcm[pos:pos + n])
            pos += n
            if w is not None:
                want.append(w)
        w = framer.flush()
        if w is not None:
            want.append(w)
        assert len(got) == len(want), chunks
        for g, w in zip(got, want):
            np.testing.assert_array_equal(_f32_b64(g), w)


def test_text_decoding_matches_python(model_run, decode_cases, cpu_model):
    """TokenTable/IncrementalDecoder (TextDecoder, streaming) = voxc.tokenizer: same text, same deltas,
    U+FFFD for invalid UTF-8 exactly where Python puts it, nothing for special tokens."""
    tok = cpu_model.tokenizer
    for ids, got in zip(decode_cases, model_run["decode"]):
        assert got["whole"] == tok.decode(ids), ids
        inc = tok.incremental_decoder()
        assert got["deltas"] == [inc.push(i) for i in ids] + [inc.flush()], ids


def test_resampler(model_run):
    for spec, got in zip(model_run["cases"]["resample"], model_run["resample"]):
        y = _f32_b64(got["data_b64"])
        n_in = round(spec["inRate"] * spec["seconds"])
        assert got["length"] == len(y) == int(np.floor(n_in * spec["outRate"] / spec["inRate"]))
        t = np.arange(len(y)) / spec["outRate"]
        want = 0.5 * np.sin(2 * np.pi * spec["freq"] * t)
        if spec["inRate"] == spec["outRate"]:
            np.testing.assert_allclose(y, want, atol=1e-6)
            continue
        edge = 64   # the filter's start-up (silence before the stream) and the end padding
        assert float(np.max(np.abs(y[edge:-edge] - want[edge:-edge]))) < 2e-3


# ---- the demo page -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(site, audio, profile, model_run, tmp_path_factory):
    """index.html transcribing the speech clip (or the sine) as a dropped file would be, on the
    profile's second visit; the page reports its DOM and a screenshot is taken after."""
    png = tmp_path_factory.mktemp("demo_shot") / "demo.png"
    site.reset_log()
    result = browser_harness.run_page_with_screenshot(
        site, site.url("bundle/index.html?clip=/clips/clip.wav&report=/result"), png,
        window_size=(1280, 800), user_data_dir=profile, timeout=240)
    result["gets"] = site.gets("/bundle/")
    result["png"], result["clip"] = png, "speech" if "speech_wav" in audio else "sine"
    return result


def test_demo_page_transcribes_a_file(demo_run, audio, cpu_model):
    dom = demo_run["dom"]
    for el in ("mic", "drop", "delay", "download-progress", "compile-progress", "transcript", "rtf", "step",
               "status", "model-info"):
        assert dom[el]["exists"] and dom[el]["visible"], el
    assert not dom["error"]["visible"], dom["error"]["text"]
    assert dom["download-progress"]["value"] == 1 and dom["compile-progress"]["value"] == 1
    assert dom["delay"]["value"] == "480" and not dom["delay"]["disabled"]
    assert dom["status"]["text"] == "Done: clip.wav"
    assert dom["rtf"]["text"].startswith("RTF ") and dom["rtf"]["text"] != "RTF –"
    assert dom["step"]["text"].endswith(" ms") and dom["step"]["text"] != "step – ms"
    assert "swiftshader" in dom["model-info"]["text"] and "of caches on the GPU" in dom["model-info"]["text"]
    event = demo_run["events"][-1]
    ref, deltas = cpu_stream(cpu_model, audio[demo_run["clip"]], 1280, 480)
    assert event["tokens"] == ref.tokens
    assert event["text"] == "".join(deltas)
    assert dom["transcript"]["text"] == event["text"].strip()


def test_demo_screenshot(demo_run):
    data = demo_run["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1280 and 600 <= height <= 800
    assert len(data) > 20_000   # a rendered page, not a blank one


def test_second_visit_is_served_from_cache(demo_run):
    """The demo's load is the profile's second visit: weights and model code come from the Cache API."""
    heavy = [p for p in demo_run["gets"] if p.endswith((".wasm", ".bin", "tokenizer.json"))]
    assert heavy == [], demo_run["gets"]


# ---- browsers that cannot run it ----------------------------------------------------------------
def _demo_error(bundle: Path, tmp_path: Path, *, flags=None, manifest_patch=None) -> dict:
    served = bundle
    if manifest_patch:
        served = tmp_path / "bundle"
        shutil.copytree(bundle, served)
        manifest = json.loads((served / artifact.MANIFEST).read_text())
        manifest_patch(manifest)
        (served / artifact.MANIFEST).write_text(json.dumps(manifest))
    with browser_harness.PageServer({"/": served}) as server:
        result = browser_harness.run_page(server, server.url("index.html?report=/result"), flags=flags, timeout=60)
        gets = server.gets("/")
    assert result["ok"]
    assert result["dom"]["error"]["visible"]
    assert result["dom"]["mic"]["disabled"] and result["dom"]["status"]["text"] == "Not ready"
    assert not any(p.endswith(".bin") for p in gets), "nothing heavy is downloaded before the check"
    return result


def test_no_webgpu_message(built, tmp_path):
    flags = [f for f in browser_harness.CHROMIUM_FLAGS if f != "--enable-unsafe-webgpu"] + ["--disable-gpu"]
    result = _demo_error(built[0], tmp_path, flags=flags)
    code = result["events"][-1]["code"]
    assert code in ("no-adapter", "no-webgpu"), result["events"]
    assert "WebGPU" in result["dom"]["error"]["text"]


def test_gpu_limits_too_small_message(built, tmp_path):
    def huge_cache(m):   # a decoder cache whose every layer's buffer is larger than any GPU's buffers
        cache = m["state"]["dec_cache"]
        m["gpu"]["largest_state_bytes_per_stream"] = cache["tensor_bytes_per_stream"] = 1 << 40
        cache["bytes_per_stream"] = cache["layers"] << 40

    result = _demo_error(built[0], tmp_path, manifest_patch=huge_cache)
    assert result["events"][-1]["code"] == "limit"
    text = result["dom"]["error"]["text"]
    assert "maxBufferSize" in text and "1024.00 GB" in text and "key/value cache" in text, text


def test_weight_tensor_too_large_message(built, tmp_path):
    """A weight tensor above the adapter's buffer limits: the message names the tensor."""
    def huge_table(m):
        for p in m["params"]:
            if p["name"] == "tok_embeddings.parts.1.weight":
                p["shape"] = [1 << 34, 48]

    result = _demo_error(built[0], tmp_path, manifest_patch=huge_table)
    assert result["events"][-1]["code"] == "limit"
    text = result["dom"]["error"]["text"]
    assert "tok_embeddings.parts.1.weight" in text and "3072.00 GB" in text and "maxBufferSize" in text, text


@pytest.fixture(scope="module")
def check_run(built, tmp_path_factory):
    """tests/web/check_page.js: bundleRequirements + checkWebGPU on patched copies of the manifest
    (buffer sizes, stream counts, a reported device memory), nothing loaded."""
    pages = tmp_path_factory.mktemp("check_pages")
    for f in ("check_page.html", "check_page.js"):
        shutil.copy2(PAGE_DIR / f, pages / f)
    with browser_harness.PageServer({"/pages/": pages, "/bundle/": built[0]}) as server:
        result = browser_harness.run_page(server, server.url("pages/check_page.html?bundle=/bundle/"), timeout=60)
        gets = server.gets("/bundle/")
    assert result["ok"], result.get("error")
    assert not any(p.endswith((".bin", ".wasm")) for p in gets), gets
    return {c["name"]: c for c in result["cases"]}, result


def test_requirements_list_every_buffer(check_run, built):
    cases, _ = check_run
    manifest = json.loads((built[0] / artifact.MANIFEST).read_text())
    req = cases["as built"]["requirements"]
    assert cases["as built"]["ok"], cases["as built"]
    footprint = manifest["gpu"]["footprint"]   # what the manifest reports: the same numbers
    state = {k: v["bytes_per_stream"] for k, v in manifest["state"].items()}       # at most
    initial = footprint["initial_state_bytes_per_stream"]                         # at load
    for name, spec in manifest["state"].items():   # a KV cache's pool starts with its first pages
        assert initial[name] == (spec["initial_pages_per_stream"] * spec["bytes_per_page"] if spec["axis"] == "pages"
                                 else spec["bytes_per_stream"]), name
    assert req["stateBytes"] == sum(initial.values()) and req["maxStateBytes"] == sum(state.values())
    assert req["weightsBytes"] == manifest["gpu"]["total_param_bytes"]
    assert req["totalBytes"] == req["weightsBytes"] + req["stateBytes"]
    assert req["maxTotalBytes"] == req["weightsBytes"] + req["maxStateBytes"]
    assert footprint["weights_bytes"] == req["weightsBytes"] and footprint["state_bytes_per_stream"] == state
    assert footprint["total_bytes"]["1"] == req["totalBytes"] and footprint["max_total_bytes"]["1"] == req["maxTotalBytes"]
    assert footprint["total_bytes"]["2"] == req["weightsBytes"] + 2 * req["stateBytes"]
    assert footprint["largest_buffer"]["bytes"] == req["buffers"][0]["bytes"]
    # a per-layer state (a KV cache) is one buffer per layer: the limits apply to one layer's, at its largest
    assert {b["name"]: b["bytes"] for b in req["buffers"] if b["kind"] == "state"} == \
        {k: v["tensor_bytes_per_stream"] for k, v in manifest["state"].items()}
    assert {b["name"]: b["totalBytes"] for b in req["buffers"] if b["kind"] == "state"} == initial
    assert {b["name"]: b["maxTotalBytes"] for b in req["buffers"] if b["kind"] == "state"} == state
    weight = [b for b in req["buffers"] if b["kind"] == "weight"]
    assert len(weight) == 1 and weight[0]["bytes"] == manifest["largest_param_bytes"]
    assert [b["bytes"] for b in req["buffers"]] == sorted((b["bytes"] for b in req["buffers"]), reverse=True)
    # the state scales with the streams asked for; the weights do not
    two = cases["cache, 2 streams"]["requirements"]
    one = cases["cache, 1 stream"]["requirements"]
    assert two["weightsBytes"] == one["weightsBytes"] and two["stateBytes"] == 2 * one["stateBytes"]


def test_stream_count_that_does_not_fit_names_the_cache(check_run):
    cases, result = check_run
    assert cases["cache, 1 stream"]["ok"], cases["cache, 1 stream"]
    two = cases["cache, 2 streams"]
    assert not two["ok"] and two["code"] == "limit", two
    assert "key/value cache" in two["message"] and "dec_cache, 2 streams" in two["message"], two["message"]
    assert "maxStreams" in two["message"] and ("maxBufferSize" in two["message"]
                                               or "maxStorageBufferBindingSize" in two["message"])


def test_every_buffer_too_large_is_named_at_once(check_run, built):
    cases, _ = check_run
    case = cases["two buffers too large"]
    first_param = json.loads((built[0] / artifact.MANIFEST).read_text())["params"][0]["name"]
    assert not case["ok"] and case["code"] == "limit", case
    assert "key/value cache" in case["message"] and first_param in case["message"], case["message"]


def test_model_larger_than_device_memory(check_run):
    """navigator.deviceMemory (GiB, rounded down to a power of two, at most 8): 2 means less than
    4 GiB, so 4.25 GiB cannot fit; 8 is only a lower bound, so nothing is refused on it."""
    cases, _ = check_run
    assert cases["as built, 1 GiB reported"]["ok"]            # the tiny model fits in anything
    memory = cases["memory"]
    assert not memory["ok"] and memory["code"] == "memory", memory
    text = memory["message"]
    assert "4.25 GB" in text and "4.00 GB of weights" in text and "256 MB for the decoder's key/value cache" in text
    assert "4.00 GB" in text and "navigator.deviceMemory" in text, text
    assert "to 4.50 GB in all at most" in text, text      # the most its caches grow to is named too
    assert cases["memory, 8 GiB reported (a lower bound)"]["ok"]
    # the check counts what a load allocates: a cache pool that starts at 2 MiB (1 GiB at most) fits
    small = cases["memory, caches start small"]
    assert small["ok"], small
    assert small["requirements"]["maxTotalBytes"] > 4 * 2**30 > small["requirements"]["totalBytes"]


def test_workgroup_storage_above_the_adapter(check_run):
    cases, result = check_run
    case = cases["workgroup storage"]
    if result["limits"]["maxComputeWorkgroupStorageSize"] >= 16896:
        assert case["ok"]
    else:
        assert not case["ok"] and case["code"] == "limit" and "maxComputeWorkgroupStorageSize" in case["message"]
