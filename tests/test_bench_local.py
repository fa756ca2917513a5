"""The benchmark and device scripts of bench/ in their local modes: the tiny model, on this machine's
CPU (llvm) where the real run needs a GPU, build-only for CUDA (nvcc, no GPU), so a broken device
script fails here instead of on the GPU machine.  Also: bench/ uses voxc's public API only.

The CUDA builds are skipped without nvcc, the web runs without emcc, npm, node or Chromium's
SwiftShader Vulkan driver.  About 3-4 minutes on 2 cores, most of it the web run (SwiftShader).
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HAVE_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
SWIFTSHADER = Path(os.environ.get("VK_ICD_FILENAMES", "/usr/lib/chromium/vk_swiftshader_icd.json"))
HAVE_WEB = all(shutil.which(t) for t in ("emcc", "npm", "node"))
needs_web = pytest.mark.skipif(not HAVE_WEB, reason="needs emcc, npm and node (apt-get install emscripten npm)")

sys.path.insert(0, str(BENCH))


def run(cmd, *, env=None, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run a bench script with this Python and this checkout; fail with its output's tail."""
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


# ---- bench/ uses the public API only -------------------------------------------------------------------
PROJECT = ("voxc", "targets", "schedules")
PRIVATE_MODEL_ATTRS = {"_decode", "_encode", "_encode_stages", "_mel", "_set_delay", "_decode_single", "_encode_single"}


def _bench_sources():
    return sorted(p for p in BENCH.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _bench_sources(), ids=lambda p: str(p.relative_to(BENCH)))
def test_bench_uses_public_names_and_patches_nothing(path):
    """No private name of voxc/targets/schedules imported or read, no attribute of a project module
    assigned (monkeypatching), no model internals (``model._decode = ...``)."""
    tree = ast.parse(path.read_text())
    modules = set()   # local names bound to project modules
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
            problems += [f"line {node.lineno}: imports {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    problems += [f"line {node.lineno}: imports {a.name}"] if any(
                        p.startswith("_") for p in a.name.split(".")) else []
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in modules and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                problems.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
            if node.attr in PRIVATE_MODEL_ATTRS:
                problems.append(f"line {node.lineno}: .{node.attr}")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in modules:
                problems.append(f"line {target.lineno}: assigns {target.value.id}.{target.attr}")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


# ---- pure parts, no build ------------------------------------------------------------------------------
def test_random_quantized_weights_decode_to_finite_values():
    """bench/cuda_build.py's random weights for a Q4_K and a Q8_0 weight: any level bits, scales that are
    small positive float16 values (so no random bit pattern dequantizes to inf/NaN)."""
    from cuda_build import random_params
    from voxc.quant.formats import QType, from_kernel_layout, kernel_layout_shapes

    for qtype in (QType.Q4_K, QType.Q8_0):
        shapes = kernel_layout_shapes(qtype, 8, 512)
        params = [{"name": "dec.layers.0.w1.qweight", "shape": list(shapes["qweight"]), "dtype": "uint32"},
                  {"name": "dec.layers.0.w1.scales", "shape": list(shapes["scales"]), "dtype": "uint32"},
                  {"name": "dec.norm.weight", "shape": [8], "dtype": "float32"},
                  {"name": "mel_frontend.filters", "shape": [201, 128], "dtype": "float32"}]
        arrays = dict(random_params(params, seed=1))
        halves = arrays["dec.layers.0.w1.scales"].view(np.float16)
        assert np.isfinite(halves).all() and (halves > 0).all()
        dense = from_kernel_layout({"qweight": arrays["dec.layers.0.w1.qweight"],
                                    "scales": arrays["dec.layers.0.w1.scales"]}, qtype, (8, 512)).dequantize()
        assert np.isfinite(dense).all() and np.abs(dense).max() > 0
        assert (arrays["dec.norm.weight"] == 1).all() and (arrays["mel_frontend.filters"] >= 0).all()


def test_kernel_census_counts_launches_and_graphs():
    from cuda_build import kernel_census

    text = "\n".join(["@decode:", "  call  vm.builtin.alloc_storage in: %0", "  call  fused_a in: %1",
                      "  call  NT_matmul in: %2", "  call  vm.builtin.cuda_graph.run_or_capture in: %3",
                      "@decode_cuda_graph_capture_func_0:", "  call  fused_b in: %0"])
    # each kernel declared, then defined; fused_a launches two kernels, NT_matmul one of its three tiers
    kernels = (("fused_a", ""), ("fused_a", "_1"), ("NT_matmul", ""), ("NT_matmul", "_1"), ("NT_matmul", "_2"),
               ("fused_b", ""))
    source = "\n".join(f'extern "C" __global__ void __launch_bounds__(256) {name}_kernel{suffix}(float* x){end}'
                       for end in (";", " {}") for name, suffix in kernels)
    census = kernel_census(text, source, {"NT_matmul"})
    assert census == {"decode": {"vm_instructions": 4, "function_calls": 2, "kernel_launches": 3,
                                 "graph_replays": 1, "kernels_in_graphs": 1}}


def test_cuda_bench_numpy_parts():
    import cuda_bench

    s = cuda_bench.stats([1.0, 2.0, 3.0, 4.0])
    assert s["median_ms"] == 2.5 and s["n"] == 4
    device = cuda_bench.Device("cpu")
    assert device.copy_bandwidth() > 0 and device.free_bytes() > 0 and device.used_gb() > 0


def test_tiny_check_pairs_each_cuda_build_with_its_llvm_twin(tmp_path):
    sys.path.insert(0, str(BENCH / "device"))
    import tiny_check

    for name in ("tiny_cuda", "tiny_cuda_graph", "tiny_cuda_q4k", "tiny_cuda_f16", "tiny_llvm", "tiny_llvm_q4k"):
        (tmp_path / name).mkdir()
    assert list(tiny_check.device_pairs(tmp_path)) == [
        ("tiny_cuda", "tiny_llvm", tiny_check.LOGIT_RTOL), ("tiny_cuda_graph", "tiny_llvm", tiny_check.LOGIT_RTOL),
        ("tiny_cuda_q4k", "tiny_llvm_q4k", tiny_check.TOLERANCE["q4k"])]   # no tiny_llvm_f16: skipped
    assert [p[:2] for p in tiny_check.local_pairs(tmp_path)] == [("tiny_llvm", "tiny_llvm"),
                                                                 ("tiny_llvm_q4k", "tiny_llvm_q4k")]


def test_tiny_check_pairs_each_vulkan_build_with_its_own_llvm_twin(tmp_path):
    """pack.sh names a vulkan variant's twin tiny_llvm_vulkan_<kind>, so a cuda variant of the same kind
    keeps its own twin; float16 anywhere in the kind sets the float16 tolerance."""
    sys.path.insert(0, str(BENCH / "device"))
    import tiny_check

    for name in ("tiny_vulkan_f16", "tiny_vulkan_q4kf16", "tiny_vulkan_q4k", "tiny_llvm_vulkan_f16",
                 "tiny_llvm_vulkan_q4kf16", "tiny_llvm_f16", "tiny_cuda_f16"):
        (tmp_path / name).mkdir()
    assert list(tiny_check.vulkan_pairs(tmp_path)) == [
        ("tiny_vulkan_f16", "tiny_llvm_vulkan_f16", tiny_check.TOLERANCE["f16"]),
        ("tiny_vulkan_q4kf16", "tiny_llvm_vulkan_q4kf16", tiny_check.TOLERANCE["f16"])]   # no twin for q4k
    assert list(tiny_check.device_pairs(tmp_path)) == [("tiny_cuda_f16", "tiny_llvm_f16", tiny_check.TOLERANCE["f16"])]


def test_vulkan_vs_cuda_ratios_pair_artifacts_by_name():
    """full_vulkan<x> over full_cuda<x> (full_llvm<x> locally): each side's default entries (static ones
    where it has them) and both generic; batched decode per stream count both have (a child process's
    figures come through JSON, with string keys)."""
    import cuda_bench

    def figures(decode, stream, static=None, batched=None):
        res = {"decode_b1_generic_pos100": {"median_ms": decode}, "stream_80ms_generic": {"median_ms": stream},
               "batched_decode_pos1000": batched or {}}
        if static is not None:
            res["decode_b1_static_b1n1_pos100"] = {"median_ms": static}
            res["stream_80ms_static_b1n1"] = {"median_ms": stream / 2}
        return res

    data = {"full_cuda_q4kf16": figures(5.0, 40.0, static=4.0, batched={1: {"median_ms": 5.0}, 8: {"median_ms": 8.0}}),
            "full_vulkan_q4kf16": figures(8.0, 60.0, batched={"1": {"median_ms": 10.0}, "2": {"median_ms": 12.0}}),
            "full_vulkan_f16": figures(1.0, 1.0), "full_vulkan_x_error": "no adapter"}
    pairs = cuda_bench.vulkan_vs_cuda(data)
    row = pairs["full_vulkan_q4kf16"]
    assert row["versus"] == "full_cuda_q4kf16" and row["versus_entries"] == "static_b1n1"
    assert row["decode_b1_pos100_default"] == {"vulkan_ms": 8.0, "versus_ms": 4.0, "ratio": 2.0}
    assert row["decode_b1_pos100_generic"]["ratio"] == 1.6 and row["stream_80ms_default"]["ratio"] == 3.0
    assert row["stream_80ms_generic"]["ratio"] == 1.5 and row["batched_decode_pos1000_ratio"] == {"1": 2.0}
    assert "no full_cuda_f16" in pairs["full_vulkan_f16"]["error"] and set(pairs) == {"full_vulkan_q4kf16",
                                                                                        "full_vulkan_f16"}


# ---- the device pack and its steps, on the CPU -----------------------------------------------------------
@pytest.fixture(scope="module")
def vulkan_here() -> bool:
    """pack.sh --local's own test for the vulkan rehearsal: wgpu importable and an adapter (lavapipe)."""
    probe = "import wgpu, sys; sys.exit(wgpu.gpu.request_adapter_sync() is None)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def devpack(tmp_path_factory):
    """bench/device/pack.sh --local: the tiny model's artifacts (cuda ones only where nvcc is, vulkan ones
    where lavapipe is)."""
    pack = tmp_path_factory.mktemp("devpack") / "pack"
    run(["bash", BENCH / "device/pack.sh", "--local"], env={"VOXC_DEVPACK": str(pack)}, timeout=600)
    return pack


def test_pack_local_builds_the_tiny_artifacts(devpack, vulkan_here):
    from voxc import artifact

    arts = devpack / "artifacts"
    # libraries travel gzipped (setup.sh unpacks them); an llvm twin's shards travel once, with its cuda twin
    expected = {"tiny_llvm", "full_llvm", "attn_llvm.so.gz"} | ({"tiny_cuda", "attn_cuda.so.gz"} if HAVE_NVCC else set())
    assert expected <= {p.name for p in arts.iterdir()}
    assert (arts / "tiny_llvm/model.so.gz").exists() and not (arts / "tiny_llvm/model.so").exists()
    if HAVE_NVCC:
        assert (arts / "tiny_llvm/.shards_from_cuda_twin").exists() and not list((arts / "tiny_llvm").glob("params_shard_*"))
    assert (devpack / "tvm_runtime.tar.gz").stat().st_size > 0 and (devpack / "src/voxc/artifact.py").exists()
    weightless = artifact.read_manifest(arts / "full_llvm")
    assert weightless["weights_included"] is False and weightless["bench"]["kernel_calls"]["decode_b1n1"]
    if HAVE_NVCC:
        bench = artifact.read_manifest(arts / "tiny_cuda")["bench"]
        assert bench["cuda"]["archs"] == ["sm_90"] and bench["kernel_calls"]["decode"]["kernel_launches"] > 0
    if vulkan_here:   # a vulkan pair, a weight-less vulkan build (its plugin gzipped) and wgpu-native travel
        assert {"tiny_vulkan_f16", "tiny_llvm_vulkan_f16", "full_vulkan"} <= {p.name for p in arts.iterdir()}
        vk = artifact.read_manifest(arts / "full_vulkan")
        assert vk["weights_included"] is False and (arts / "full_vulkan" / f"{vk['wgpu']['plugin']}.gz").exists()
        assert list((devpack / "vulkan").glob("*wgpu_native*.so.gz"))


def test_run_bench_local(devpack, vulkan_here, tmp_path):
    """bench/device/run_bench.sh --local: tiny_check.py (llvm static vs generic entries, CPU attention vs
    numpy, the tiny vulkan build on lavapipe vs its llvm twin), quant_gpu.py (build and checks short of
    the launch), cuda_bench.py on the weight-less artifacts (random weights written here; the vulkan one
    in its own process, then its ratios to the llvm one), the transformers baseline on the tiny config;
    TVM's compiler hidden from tiny_check and cuda_bench."""
    out = tmp_path / "out"
    run(["bash", BENCH / "device/run_bench.sh", "--local"], timeout=420,
        env={"VOXC_DEVPACK": str(devpack), "OUT": str(out), "VOXC_RANDOM_WEIGHTS_DIR": str(tmp_path / "weights")})
    check = json.loads((out / "tiny_check.json").read_text())
    assert check["failures"] == [] and check["tvm_compiler_importable"] is False
    assert check["tiny_llvm_static_entries"]["ok"] and check["attention_dec_n1"]["ok"]
    bench = json.loads((out / "cuda_bench.json").read_text())["full_llvm"]
    assert bench["decode_b1_static_b1n1_pos100"]["median_ms"] > 0 and bench["offline_generic"]["tokens"] > 0
    assert bench["realtime_2_streams"]["tokens_per_stream"] > 0
    worst = bench["realtime_2_streams"]["worst_steps"]   # the slowest steps, slowest first, with what happened in them
    assert worst and [w["ms"] for w in worst] == sorted((w["ms"] for w in worst), reverse=True)
    assert {"dec_cache_grew", "enc_cache_pages_taken", "gc_generations"} <= set(worst[0])
    hf = json.loads((out / "hf_baseline.json").read_text())
    assert hf["batch2"]["steps"] > 0
    best = max((1, 2), key=lambda b: hf[f"batch{b}"]["streams_x_realtime"])    # its best aggregate, eager here
    assert hf["best_aggregate"] == {"batch": best, "config": "eager", **{k: hf[f"batch{best}"][k] for k in (
        "ms_per_step", "streams_x_realtime")}}
    if vulkan_here:
        assert all(check[f"tiny_vulkan_f16_{k}"]["ok"] for k in ("offline", "streaming_80ms", "batched_decode"))
        report = json.loads((out / "cuda_bench.json").read_text())
        vk = report["full_vulkan"]
        assert vk["adapter"]["backend"] == "vulkan" and vk["max_streams"] <= vk["adapter_stream_limit"]
        assert report["vulkan_vs_cuda"]["full_vulkan"]["versus"] == "full_llvm"
        assert report["vulkan_decode_vs_cuda"] > 0 and report["vulkan_stream_step_vs_cuda"] > 0
    if HAVE_NVCC:   # quant_gpu.py local: the kernels built at a small shape, checked up to the launch
        assert "quant_gpu local: OK" in (out / "quant_gpu.log").read_text()
        assert "gemm_gpu local: OK" in (out / "gemm_gpu.log").read_text()


def test_cpu_bench_local(tmp_path):
    """bench/device/cpu_bench.sh local: pack (a weight-less tiny Q4_K llvm build), then the runtime-only
    run and the transformers step, a few steps each."""
    out = tmp_path / "out"
    run(["bash", BENCH / "device/cpu_bench.sh", "local"], env={"OUT": str(out), "TMPDIR": str(tmp_path)},
        timeout=300)
    summary = json.loads((out / "cpu_bench.json").read_text())
    row = summary["variants"]["tiny_q4_k"]
    assert row["decode_static_b1n1_pos100_ms"] > 0 and row["stream_80ms_ms"] > 0 and summary["hf"]["float32"] > 0
    voxc_run = json.loads((out / "cpu_voxc_tiny_q4_k.json").read_text())
    assert voxc_run["check_static_vs_generic"]["finite"]
    for profile in ("profile_static_b1n1_pos100", "profile_stream_80ms"):   # per-function time of one step
        assert voxc_run[profile]["functions"], profile


def test_cpu_bench_variant_names():
    """cpu_bench.sh VARIANTS: the quantization, and int8 activations for an ``_int8`` suffix."""
    from cpu_bench import parse_variant

    assert parse_variant("q4_k") == ("q4_k", False) and parse_variant("f32") == (None, False)
    assert parse_variant("q4_k_int8") == ("q4_k", True) and parse_variant("q8_0_int8") == ("q8_0", True)
    with pytest.raises(SystemExit):
        parse_variant("f32_int8")


def test_cpu_dense_local(tmp_path):
    proc = run([sys.executable, BENCH / "cpu_dense.py", "--local", "--out", tmp_path], timeout=300)
    assert "speedup: decode" in proc.stdout


def test_quant_cpu_local():
    proc = run([sys.executable, BENCH / "quant_cpu.py", "--local", "--qtypes", "q4_0,q4_k"], timeout=300)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["qtype"] for r in rows] == ["q4_0", "q4_k"] and all(r["ms"] > 0 for r in rows)


# ---- the web ----------------------------------------------------------------------------------------------
def _dawn_available() -> bool:
    """npm's webgpu@0.6.2 (Dawn for Node) in voxc's cache, installed once (needs the npm registry)."""
    cache = Path(os.environ.get("VOXC_CACHE_DIR", Path.home() / ".cache" / "voxc")) / "dawn-node-webgpu-0.6.2"
    if (cache / "node_modules/webgpu/dist/linux-x64/dawn.node").exists():
        return True
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["npm", "init", "-y"], cwd=cache, capture_output=True, timeout=60, check=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "webgpu@0.6.2"], cwd=cache,
                       capture_output=True, timeout=240, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return (cache / "node_modules/webgpu/dist/linux-x64/dawn.node").exists()


@needs_web
def test_webgpu_bench_local(tmp_path):
    """bench/device/webgpu_bench.sh local: the tiny bundle (fast link, small windows) in Node.js on Dawn
    over SwiftShader, through web/voxc.js: its tokens equal the llvm build's, and its kernel profile
    (timestamp queries) of a decoder step and an 80 ms stream step is sane."""
    if not SWIFTSHADER.exists():
        pytest.skip(f"no SwiftShader Vulkan driver at {SWIFTSHADER} (apt-get install chromium)")
    if not _dawn_available():
        pytest.skip("npm could not install webgpu@0.6.2 (Dawn for Node.js)")
    out = tmp_path / "out"
    run(["bash", BENCH / "device/webgpu_bench.sh", "local"], env={"OUT": str(out), "TMPDIR": str(tmp_path)},
        timeout=600)
    result = json.loads((out / "tiny.json").read_text())
    assert result["ok"] and result["check"]["pass"], result.get("error") or result["check"]
    assert result["decode_step"]["n"] >= 1 and result["encode"]["tokens_1"]["median"] > 0
    # voxc.js's KernelDispatcher: the decode steps' launches recur (the VM's pooled buffers rotate
    # with a period of a few steps), so over 24 steps most reuse a cached bind group; a submit per step
    dispatch = result["decode_dispatch"]
    assert dispatch["dispatches"] > 10 and 1 <= dispatch["submits"] <= dispatch["dispatches"]
    assert dispatch["bindGroupsCreated"] < 0.5 * dispatch["dispatches"], dispatch
    # the copy kernel the GEMVs' bandwidth is measured against (webgpu_q4_gemv_min_of_copy_bw)
    assert result["copy"]["gbps_read_plus_write"] > 0 and isinstance(result["q4_gemv"], list)
    assert result["load"]["pipelines"] == "blocking" and result["load"]["pipelines_s"] > 0
    profile = json.loads((out / "tiny.profile.json").read_text())
    assert profile["problems"] == [], profile["problems"]   # the driver's --profile-check
    for step in ("decode_step", "stream_step"):
        kernels = profile[step]["kernels"]
        assert kernels and sum(k["count"] for k in kernels) == profile[step]["passes"]
        assert 0 < profile[step]["gpu_ms"] <= profile[step]["wall_ms"]
    assert profile["stream_step"]["encode_calls"] == profile["stream_step"]["decode_calls"] == 1
    # a stream step runs the encoder's kernels besides the decoder's
    assert len(profile["stream_step"]["kernels"]) > len(profile["decode_step"]["kernels"])


@needs_web
def test_web_timings_prints_numbers(tmp_path):
    proc = run([sys.executable, BENCH / "web_timings.py", "--json", tmp_path / "t.json"], timeout=600)
    times = json.loads((tmp_path / "t.json").read_text())
    assert times["link_fast_s"] > 0 and times["bundle_build_fast_link_s"] > 0 and times["wasm_fast_MB"] > 1
    assert '"link_fast_s"' in proc.stdout
