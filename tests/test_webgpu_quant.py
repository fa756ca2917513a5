"""Q4_K weights in the browser: ``voxc build --target webgpu --quantization q4_k`` of a small model
whose widths are multiples of 256 (so every projection and the tied token table run the WGSL Q4_K
dequant kernels of schedules/dequant_matmul.py, as the 4B model's do; the 32-wide ada-norm
projections are Q8_0, as there), streamed in headless Chromium (SwiftShader) through web/voxc.js
and compared with the Q4_K llvm build: the same token ids and text, logits close.  The token table
is built with a small block size so it is split into row blocks, as the 4B model's must be (its
Q4_K table is 226 MB, above WebGPU's 128 MiB binding limit).

Needs emcc, npm (tvmjs, built once and cached) and chromium, as tests/test_webgpu_model.py.
"""
from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "web"))
import browser_harness  # noqa: E402

from clips import sine_with_noise  # noqa: E402
from references import q4k_config  # noqa: E402
from targets import webgpu  # noqa: E402
from voxc.artifact import MANIFEST  # noqa: E402

HAVE_TOOLS = all(shutil.which(t) for t in ("emcc", "npm")) and browser_harness.find_chromium() is not None
pytestmark = pytest.mark.skipif(not HAVE_TOOLS, reason="needs emcc, npm and chromium "
                                                       "(apt-get install emscripten npm chromium)")
PAGE_DIR = Path(__file__).resolve().parent / "web"
EMBEDDING_PART_BYTES = 64 << 10   # the Q4_K table (1268 rows x 256: 185 KB) -> 3 blocks
LOGITS_RTOL = 1e-3
# (samples per feed (0: the whole clip at once), delay ms, record logits)
STREAMS = [(1280, 480, True)]   # SwiftShader runs the Q4 GEMM tiles slowly: one stream (2.5 min on 2 cores)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    out = tmp_path_factory.mktemp("webgpu_q4k")
    ckpt = make_tiny(out / "ckpt", seed=5, config=q4k_config())
    target = webgpu.WebGPUTarget(embedding_part_bytes=EMBEDDING_PART_BYTES, optimize_wasm=False)
    bundle = build(ckpt, target, out / "bundle", progress=False, quantization="q4_k")
    cpu = build(ckpt, "llvm", out / "cpu", progress=False, quantization="q4_k")
    return bundle, cpu


@pytest.fixture(scope="module")
def run(built, tmp_path_factory):
    pages = tmp_path_factory.mktemp("q4k_site")
    for f in ("model_page.html", "model_page.js"):
        shutil.copy2(PAGE_DIR / f, pages / f)
    pcm = sine_with_noise(2.3)
    (pages / "sine.f32").write_bytes(pcm.astype("<f4").tobytes())
    cases = {"streams": [{"clip": "/pages/sine.f32", "chunk": n, "delayMs": d, "recordLogits": lg}
                         for n, d, lg in STREAMS]}
    (pages / "cases.json").write_text(json.dumps(cases))
    with browser_harness.PageServer({"/pages/": pages, "/bundle/": built[0]}) as server:
        result = browser_harness.run_page(server, server.url("pages/model_page.html?bundle=/bundle/&cases=/pages/cases.json"),
                                          user_data_dir=tmp_path_factory.mktemp("q4k_profile"), timeout=300)
        assert result["ok"], result.get("error", "") + "\n" + "\n".join(server.logs[-20:])
    result["pcm"] = pcm
    return result


def test_q4k_bundle_layout(built):
    bundle, _ = built
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["quantization"] == "q4_k" and manifest["model_dtype"] == "float32"
    assert manifest["required_features"] == [] and manifest["max_workgroup_size"] <= 256
    assert manifest["gpu"]["max_storage_buffers_per_kernel"] <= 8
    params = {p["name"]: p for p in manifest["params"]}
    assert params["dec.layers.0.attention.wqkv.qweight"]["dtype"] == "uint32"
    parts = [n for n in params if n.startswith("tok_embeddings.")]
    assert manifest["embedding"]["split"] and len(parts) == 2 * manifest["embedding"]["parts"] == 6, parts
    assert all(params[n]["dtype"] == "uint32" for n in parts)
    assert sum(params[n]["shape"][0] for n in parts if n.endswith(".qweight")) == 1268
    cache = json.loads((bundle / "tensor-cache.json").read_text())
    assert all(r["nbytes"] <= EMBEDDING_PART_BYTES for s in cache["records"] for r in s["records"]
               if r["name"].startswith("tok_embeddings."))


def test_q4k_browser_streams_match_llvm(run, built):
    """Token ids and text equal the Q4_K llvm build's; logits within 1e-3 relative (the same blocks,
    dequantized in f32 by both, summed in a different order)."""
    import voxc
    from voxc.runtime.session import StreamingSession

    model = voxc.load(built[1])
    pcm = run["pcm"]
    for (chunk, delay, with_logits), got in zip(STREAMS, run["streams"]):
        s = StreamingSession(model, delay_ms=delay, left_pad_tokens=model.left_pad_tokens, record_logits=True)
        step = chunk or len(pcm)
        deltas = [s.feed(pcm[i:i + step]) for i in range(0, len(pcm), step)] + [s.finish()]
        what = f"chunk={chunk} delay={delay}"
        assert got["tokens"] == s.tokens, what
        assert got["text"] == "".join(deltas), what
        assert len(got["tokens"]) > 10, what
        if with_logits:
            assert len(got["logits"]) == len(s.logits), what
            for step_i, (g, want) in enumerate(zip(got["logits"], s.logits)):
                g = np.frombuffer(base64.b64decode(g), "<f4")
                err = float(np.max(np.abs(g - want)) / np.max(np.abs(want)))
                assert err <= LOGITS_RTOL, f"{what} step {step_i}: logits rel err {err:.2e}"
