"""WebGPU target, end to end on a toy Relax module: WGSL build, wasm link against TVM's web runtime
(built from the wheel's sources), a bundle served on 127.0.0.1, headless Chromium (SwiftShader
WebGPU) running it through web/voxc.js, and the outputs compared with the llvm build in Python.

Needs emcc (apt-get install emscripten), chromium (apt-get install chromium) and npm (tvmjs is
built once from the wheel's TypeScript).  The runtime/tvmjs builds are cached in ~/.cache/voxc
(or $VOXC_CACHE_DIR): the first run spends about 2-4 minutes there.
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
import toy_model  # noqa: E402

from targets import web_bundle, web_toolchain, webgpu  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402

HAVE_EMCC = shutil.which("emcc") is not None
HAVE_CHROMIUM = browser_harness.find_chromium() is not None
HAVE_NPM = shutil.which("npm") is not None
needs_emcc = pytest.mark.skipif(not HAVE_EMCC, reason="emcc not installed (apt-get install emscripten)")
needs_browser = pytest.mark.skipif(
    not (HAVE_EMCC and HAVE_CHROMIUM and HAVE_NPM),
    reason="browser test needs emcc, chromium and npm (apt-get install emscripten chromium npm)")
SEQS = (1, 7, 33)
TOL = 1e-5


@pytest.fixture(scope="module")
def toy():
    mod, names = toy_model.export()
    return mod, names, toy_model.random_params(names)


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, s, toy_model.DIM)).astype("float32") for s in SEQS]


@pytest.fixture(scope="module")
def llvm_outputs(toy, cases):
    import tvm
    from tvm import relax

    mod, names, params = toy
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    weights = [tvm.runtime.tensor(params[n]) for n in names]
    return [vm["forward"](tvm.runtime.tensor(x), *weights).numpy() for x in cases]


@pytest.fixture(scope="module")
def webgpu_executable(toy):
    return webgpu.compile_for_webgpu(toy[0])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, toy, webgpu_executable):
    out = tmp_path_factory.mktemp("webgpu_bundle")
    wasm = web_toolchain.export_wasm(webgpu_executable, out / "build" / "model.wasm")
    _, names, params = toy
    return web_bundle.write_bundle(out / "bundle", wasm=wasm, executable=webgpu_executable, params=params,
                               param_names=names, meta={"model": "toy"})


def test_shader_info_f32_needs_no_features(webgpu_executable):
    info = webgpu.shader_info(webgpu_executable)
    assert info["required_features"] == []
    assert 1 <= info["max_workgroup_size"] <= webgpu.WEBGPU_DEFAULT_MAX_WORKGROUP
    assert info["num_kernels"] > 5


def test_shader_info_f16_needs_shader_f16():
    mod, _ = toy_model.export("float16")
    info = webgpu.shader_info(webgpu.compile_for_webgpu(mod, max_workgroup_size=128))
    assert info["required_features"] == ["shader-f16"]
    assert info["max_workgroup_size"] <= 128


def test_missing_emcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(web_toolchain.shutil, "which", lambda name: None)
    with pytest.raises(VoxcError, match="apt-get install emscripten"):
        web_toolchain.ensure_web_runtime()


@needs_emcc
def test_export_wasm_links_a_module(tmp_path, webgpu_executable):
    """The default link (runtime objects, no binaryen) gives a wasm module holding TVM's runtime
    (megabytes, not just the model's host code)."""
    wasm = web_toolchain.export_wasm(webgpu_executable, tmp_path / "model.wasm")
    data = wasm.read_bytes()
    assert data[:8] == b"\0asm\x01\0\0\0"
    assert len(data) > 1 << 20


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


@pytest.fixture(scope="module")
def browser_runs(tmp_path_factory, bundle, cases):
    """The toy page run twice in one browser profile: a first visit and a second one."""
    pages = tmp_path_factory.mktemp("pages")
    for f in ("toy_page.html", "toy_page.js"):
        shutil.copy2(Path(__file__).parent / "web" / f, pages / f)
    (pages / "cases.json").write_text(json.dumps(
        {"function": "forward", "cases": [{"shape": list(x.shape), "data_b64": _b64(x)} for x in cases]}))
    profile = tmp_path_factory.mktemp("chromium_profile")
    runs = []
    with browser_harness.PageServer({"/": pages, "/bundle/": bundle}) as server:
        url = server.url("toy_page.html?bundle=/bundle/&cases=/cases.json")
        for _ in range(2):
            server.reset_log()
            t0 = time.perf_counter()
            result = browser_harness.run_page(server, url, user_data_dir=profile)
            result["wall_s"] = time.perf_counter() - t0
            result["gets"] = server.gets("/bundle/")
            runs.append(result)
    return runs


def _outputs(result) -> list[np.ndarray]:
    assert result["ok"], result.get("error")
    return [np.frombuffer(base64.b64decode(o["data_b64"]), "<f4").reshape(o["shape"]) for o in result["outputs"]]


@needs_browser
def test_browser_matches_llvm(browser_runs, llvm_outputs):
    first = browser_runs[0]
    outs = _outputs(first)
    assert first["adapter"]["architecture"] == "swiftshader" or first["adapter"]["vendor"], first["adapter"]
    assert first["phases"][-1] == "ready" and "weights" in first["phases"]
    for seq, got, want in zip(SEQS, outs, llvm_outputs):
        assert got.shape == want.shape
        err = float(np.max(np.abs(got - want)))
        assert err <= TOL, f"seq={seq}: max |webgpu - llvm| = {err:.3g}"


@needs_browser
def test_browser_second_visit_is_served_from_cache(browser_runs, llvm_outputs):
    first, second = browser_runs
    heavy = lambda gets: [p for p in gets if p.endswith((".wasm", ".bin")) or p.endswith("tensor-cache.json")]
    # first visit: each artifact fetched exactly once (the Cache API add, then reads from the cache)
    assert sorted(heavy(first["gets"])) == sorted(set(heavy(first["gets"])))
    assert any(p.endswith("params_shard_0.bin") for p in first["gets"])
    assert "/bundle/model.wasm" in first["gets"]
    # second visit: only the manifest (always revalidated) and the small scripts hit the network
    assert heavy(second["gets"]) == [], second["gets"]
    for got, want in zip(_outputs(second), llvm_outputs):
        assert float(np.max(np.abs(got - want))) <= TOL


@needs_browser
def test_screenshot(tmp_path, bundle, cases, llvm_outputs):
    """A screenshot of the toy page once it ran the bundle under test (the page reports its outputs
    first, so the picture shows the state whose numbers are checked here)."""
    pages = tmp_path / "pages"
    pages.mkdir()
    for f in ("toy_page.html", "toy_page.js"):
        shutil.copy2(Path(__file__).parent / "web" / f, pages / f)
    (pages / "cases.json").write_text(json.dumps(
        {"function": "forward", "cases": [{"shape": list(x.shape), "data_b64": _b64(x)} for x in cases]}))
    with browser_harness.PageServer({"/": pages, "/bundle/": bundle}) as server:
        result = browser_harness.run_page_with_screenshot(
            server, server.url("toy_page.html?bundle=/bundle/&cases=/cases.json"), tmp_path / "shot.png",
            window_size=(640, 400))
        assert "/bundle/model.wasm" in server.gets("/bundle/")
    for got, want in zip(_outputs(result), llvm_outputs):
        assert float(np.max(np.abs(got - want))) <= TOL
    data = (tmp_path / "shot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 640 and 200 <= height <= 400   # the window less the browser's own bars
