"""The full-size model on the CPU (llvm, the embedded default): Q4_K (and Q8_0, float32) decode step
against a memory-bandwidth floor measured in the same process, and against transformers' CPU step.

Verbs (bench/device/cpu_bench.sh drives them; it packs .cpupack/ here and runs it on the GPU machine's CPU cores):

    python bench/cpu_bench.py build OUT [--size full|tiny] [--quant VARIANT] [--mcpu x86-64-v3] [--int8-activations]
        here, with TVM: compile the model for llvm WITHOUT weights (manifest + model.so), with a static
        one-stream one-token entry ``decode_b1n1`` (quantized projections then run the GEMV kernels);
        VARIANT: q4_k, q8_0 or f32, ``_int8`` appended for int8 activations (q4_k_int8 = --int8-activations)
    python bench/cpu_bench.py voxc ARTIFACT
        runtime only (no TVM compiler): random weights, load, bandwidth floor, decode steps (static
        ``decode_b1n1`` and generic ``decode``), 80 ms streaming steps, the time per compiled function of
        one decode step and of one 80 ms streaming step -> $OUT/cpu_voxc_<name>.json
    python bench/cpu_bench.py hf ARTIFACT [--dtypes float32,bfloat16]
        transformers' VoxtralRealtime of the artifact's config, its own random init, one decode step
        with a KV cache (generate() of N2 minus N1 new tokens) -> $OUT/cpu_hf.json
    python bench/cpu_bench.py summary
        merge the JSON files in $OUT -> $OUT/cpu_bench.json (ratios to the floor and to transformers)

Floor = the bytes one decode step must read (decoder + tied LM-head weights; "+kv" adds the KV rows
attention reads at that position) / streaming-read bandwidth.  Bandwidth: numpy sums of disjoint
chunks of a 2 GiB float64 buffer in N Python threads (numpy releases the GIL inside the reduction),
best of several; N = the thread count the benchmark uses (TVM_NUM_THREADS, default all cores).
Env: VOXC_CPUPACK (pack dir, default .cpupack), TVM_NUM_THREADS, STEPS (decode steps per position, 20),
POSITIONS (100,4000), DECODE_BUDGET_S (8: fewer steps past it), STREAM_STEPS (25), STREAM_BUDGET_S (15),
BW_GIB (bandwidth buffer, 2 GiB), HF_STEPS (3,11), HF_REPEATS (2: the fastest run of each length), HF_BUDGET_S, HF_FAST_INIT (1), QUICK=1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "device"))
from common import BenchTokenizer, Report  # noqa: E402  (bench/device/common.py, shared with the GPU benches)
PACK = Path(os.environ.get("VOXC_CPUPACK", ROOT / ".cpupack"))
MANIFEST = "voxc-artifact.json"


# ---------------------------------------------------------------------------------------------
# common
# ---------------------------------------------------------------------------------------------
def threads() -> int:
    """The threads of TVM's pool, as voxc's runtime sets them (TVM_NUM_THREADS, default the physical cores)."""
    from voxc.runtime.tvm_runtime import default_cpu_threads

    default_cpu_threads()
    return int(os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"))


def stream_read_gbps(n_threads: int, gib: float | None = None, reps: int = 7) -> dict:
    """Streaming-read bandwidth: numpy sums over disjoint chunks of one large float64 buffer, one
    chunk per Python thread (the reduction releases the GIL), best of ``reps``; plus the same with
    one thread (what bench/quant_cpu.py measures)."""
    from concurrent.futures import ThreadPoolExecutor

    gib = float(os.environ.get("BW_GIB", 2.0)) if gib is None else gib
    n = int(gib * (1 << 30)) // 8
    a = np.empty(n, np.float64)
    # first touch from the worker threads (the pages then sit near the threads that read them)
    bounds = np.linspace(0, n, n_threads + 1).astype(np.int64)
    parts = [a[bounds[i]:bounds[i + 1]] for i in range(n_threads)]
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(lambda p: p.fill(1.0), parts))

        def once():
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            return time.perf_counter() - t

        once()
        best = min(once() for _ in range(reps))
    t1 = min(_timed(a.sum) for _ in range(3))
    del a, parts
    return {"GBps": round(a_bytes(n) / best / 1e9, 2), "threads": n_threads, "buffer_GiB": gib,
            "single_thread_GBps": round(a_bytes(n) / t1 / 1e9, 2),
            "method": f"numpy float64 sum of {n_threads} disjoint chunks in {n_threads} threads, best of {reps}"}


def a_bytes(n):
    return n * 8


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stats(ms):
    ms = np.asarray(ms, np.float64)
    return {"median_ms": round(float(np.median(ms)), 3), "min_ms": round(float(ms.min()), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "n": int(ms.size)}


def cpu_info() -> dict:
    info = {"nproc": os.cpu_count()}
    try:
        import subprocess
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                               "NUMA node(s)", "L3 cache", "L2 cache", "CPU max MHz"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                flags = set(value.split())
                info["isa"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni")
                               if f in flags]
    except Exception as exc:  # noqa: BLE001
        info["lscpu_error"] = repr(exc)
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0]
        info["MemTotal"] = mem.split(":")[1].strip()
    except OSError:
        pass
    return info


def config_key(manifest: dict) -> str:
    import hashlib
    return hashlib.sha1(json.dumps(manifest["config"], sort_keys=True).encode()).hexdigest()[:10]


def decode_bytes(manifest: dict) -> int:
    """Weight bytes one decode step reads: every ``dec.*`` tensor and the tied token table (LM head)."""
    return sum(math.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize for p in manifest["params"]
               if p["name"].startswith("dec.") or p["name"].startswith("tok_embeddings."))


def kv_bytes(manifest: dict, position: int) -> int:
    """KV-cache bytes attention reads at ``position`` (both K and V of every layer, window-capped)."""
    d = manifest["config"]["decoder"]
    itemsize = np.dtype(manifest["model_dtype"]).itemsize
    rows = min(position + 1, d["sliding_window"])
    return d["n_layers"] * 2 * rows * d["n_kv_heads"] * d["head_dim"] * itemsize


# ---------------------------------------------------------------------------------------------
# build (here, with the TVM compiler)
# ---------------------------------------------------------------------------------------------
INT8_SUFFIX = "_int8"


def parse_variant(variant: str) -> tuple[str | None, bool]:
    """A variant name of the pack (cpu_bench.sh VARIANTS) -> (quantization or None for float32, int8
    activations): ``q4_k`` -> ("q4_k", False), ``q4_k_int8`` -> ("q4_k", True), ``f32`` -> (None, False)."""
    int8 = variant.endswith(INT8_SUFFIX)
    quant = variant.removesuffix(INT8_SUFFIX)
    if int8 and quant in ("f32", "float32", "none"):
        raise SystemExit(f"{variant}: int8 activations need a quantized variant (q4_k_int8, q8_0_int8)")
    return (None if quant in ("f32", "float32", "none") else quant), int8


def bench_target(mcpu: str | None, int8_activations: bool = False):
    """targets/llvm.py's target (with its static one-stream entries) for a fixed -mcpu; with
    ``int8_activations``, quantized decode GEMVs on int8 dot products (voxc build --int8-activations)."""
    from targets.llvm import LlvmTarget

    return LlvmTarget(mcpu=mcpu, int8_activations=int8_activations)


def cmd_build(args):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from cuda_build import build_weightless
    from voxc import artifact
    from voxc.config import ModelConfig

    cfg = ModelConfig() if args.size == "full" else ModelConfig.tiny()
    quant, int8 = parse_variant(args.quant)
    int8 = int8 or args.int8_activations
    target = bench_target(args.mcpu or None, int8)
    t0 = time.perf_counter()
    out = build_weightless(cfg, target, Path(args.out), quantization=quant, force=args.force, extra={"cpu_bench": {
        "mcpu": args.mcpu, "size": args.size, "int8_activations": int8,
        "static_entries": [e.name for e in target.static_entries],
        "host_built_on": cpu_info().get("Model name")}})
    seconds = time.perf_counter() - t0
    manifest = artifact.read_manifest(out)
    lib = out / manifest["library"]
    print(f"built {out} ({args.size}, {quant or 'float32'}{', int8 activations' if int8 else ''}, "
          f"-mcpu={args.mcpu}) in {seconds:.1f}s; "
          f"{lib.name} {lib.stat().st_size / 1e6:.1f} MB; weights to fill "
          f"{sum(math.prod(p['shape']) * np.dtype(p['dtype']).itemsize for p in manifest['params']) / 1e9:.3f} GB",
          flush=True)


# ---------------------------------------------------------------------------------------------
# runtime side (the benchmark machine): no TVM compiler
# ---------------------------------------------------------------------------------------------
def runtime_setup(hide_tvm: bool = True):
    """voxc's sources from the pack, TVM's runtime libraries from the pack, ``tvm`` unimportable."""
    import common

    src = PACK / "src"
    if src.exists():
        sys.path.insert(0, str(src))
        sys.path.insert(0, str(src / "bench"))
    else:   # running from a checkout
        sys.path.insert(0, str(ROOT))
        sys.path.insert(0, str(HERE))
    lib = PACK / "tvm_runtime" / "tvm" / "lib"
    if lib.exists():
        os.environ.setdefault("VOXC_TVM_LIB_DIR", str(lib))
    if hide_tvm:
        common.hide_tvm()


def decode_steps(model, start, steps, delay=6):
    """ms per decode call (one stream, one token) at positions start.., the token read back each step."""
    tokens = np.ones((1, 1), np.int32)
    model.set_delay([0], [delay])
    model.take_kv_pages([0], start)   # the keys before ``start`` in pages of their own, as a stream's
    out = []
    budget = float(os.environ.get("DECODE_BUDGET_S", 8))
    t0 = time.perf_counter()
    for i in range(steps):
        if i >= 3 and time.perf_counter() - t0 > budget:   # slow variants: fewer steps, not a time-out
            break
        t = time.perf_counter()
        _, nxt = model.decode(tokens, [0], [start + i])
        tokens = model.rt.numpy(nxt).reshape(1, 1).astype(np.int32)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def profile_call(model, step, top=14) -> dict:
    """``step()`` (one decode step, one streaming chunk) with the VM's instrument hook (runtime API
    ``set_instrument``): wall ms per compiled function, summed over its calls, the ``top`` largest."""
    from collections import defaultdict

    total, calls, began = defaultdict(float), defaultdict(int), {}

    def instrument(func, name, before_run, ret_value, *args):
        name = str(name)
        if before_run:
            began[name] = time.perf_counter()
        else:
            total[name] += time.perf_counter() - began.pop(name, time.perf_counter())
            calls[name] += 1

    model.vm["set_instrument"](instrument)
    try:
        t = time.perf_counter()
        step()
        wall = (time.perf_counter() - t) * 1e3
    finally:
        model.vm["set_instrument"](None)
    rows = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms_instrumented": round(wall, 2),
            "functions_ms_total": round(sum(total.values()) * 1e3, 2),
            "functions": {k: {"ms": round(v * 1e3, 2), "calls": calls[k]} for k, v in rows}}


def profile_step(model, start, delay=6, top=14) -> dict:
    """:func:`profile_call` of one decode step (one stream, one token) at position ``start``."""
    model.set_delay([0], [delay])
    model.take_kv_pages([0], start)
    return {"position": start, **profile_call(
        model, lambda: model.decode(np.ones((1, 1), np.int32), [0], [start]), top)}


def cmd_voxc(args):
    runtime_setup()
    import voxc
    from cuda_build import ensure_weights
    from voxc.artifact import STATIC_ENTRIES

    art = Path(args.artifact)
    manifest = json.loads((art / MANIFEST).read_text())
    quant = manifest.get("quantization") or "float32"
    report = Report(f"cpu_voxc_{art.name}")
    T0 = time.perf_counter()
    quick = os.environ.get("QUICK") == "1"
    n_threads = threads()
    report["artifact"] = {"name": art.name, "quantization": quant, "model_dtype": manifest["model_dtype"],
                          "config_key": config_key(manifest),
                          "build": (manifest.get("bench") or {}).get("cpu_bench"), "library_MB": round((art / manifest["library"]).stat().st_size / 1e6, 1)}
    report["cpu"] = cpu_info()
    report["tvm_num_threads"] = n_threads
    assert "tvm" not in sys.modules, "TVM compiler imported"
    bw = stream_read_gbps(n_threads)
    report["stream_read_before"] = bw

    t = time.perf_counter()
    gb, written = ensure_weights(art, Path(os.environ.get("VOXC_WEIGHTS_DIR", "/tmp/voxc_cpu_random_weights")))
    report["weights"] = {"GB": round(gb, 3), "written_s": round(written, 1)}
    t = time.perf_counter()
    model = voxc.load(art, max_streams=1, verify="size")   # random weights: sizes recorded, not hashes
    model.tokenizer = BenchTokenizer()
    report["load_s"] = round(time.perf_counter() - t, 1)
    import tvm_ffi  # noqa: F401  (the runtime's FFI package, from the carried wheel)
    report["runtime_only"] = {"tvm_imported": "tvm" in sys.modules, "tvm_lib_dir": os.environ.get("VOXC_TVM_LIB_DIR"),
                              "tvm_ffi": getattr(sys.modules["tvm_ffi"], "__version__", "?")}

    dbytes = decode_bytes(manifest)
    floor_ms = dbytes / (bw["GBps"] * 1e9) * 1e3
    report["decode_weight_GB"] = round(dbytes / 1e9, 4)
    report["floor_ms"] = round(floor_ms, 3)

    steps = int(os.environ.get("STEPS", 8 if quick else 20))
    positions = [int(p) for p in os.environ.get("POSITIONS", "100,4000").split(",")]
    static = any(name in STATIC_ENTRIES for name in model.functions)
    # (tag, one-stream steps through the static entries decode_b1n1 / encode_b1t8)
    entries = ([("static_b1n1", True)] if static else []) + [("generic", False)]
    res = {}
    if static:   # same step through both entries (same inputs, same cache rows): same logits
        outs = []
        for on in (True, False):
            model.use_static_entries(on)
            model.set_delay([0], [6])
            outs.append(model.rt.numpy(model.decode(np.ones((1, 1), np.int32), [0], [10])[0]))
        model.use_static_entries(True)
        a, b = outs
        report["check_static_vs_generic"] = {
            "logits_max_rel_err": float(np.abs(a - b).max() / max(1e-30, float(np.abs(b).max()))),
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()), "argmax_equal": bool(a.argmax() == b.argmax())}
    # sections in priority order; each is skipped once the stage's time (VOXC_STAGE_S) is nearly spent
    deadline = T0 + float(os.environ.get("VOXC_STAGE_S", 1e9)) - 15
    warmed = set()

    def decode_series(tag, static, pos):
        model.use_static_entries(static)
        if tag not in warmed:
            decode_steps(model, 50, 2)    # warm-up (allocates the VM's pools)
            warmed.add(tag)
        s = stats(decode_steps(model, pos, steps)[1:])
        kv = kv_bytes(manifest, pos)
        s["x_floor_weights"] = round(s["median_ms"] / floor_ms, 2)
        s["floor_weights_plus_kv_ms"] = round((dbytes + kv) / (bw["GBps"] * 1e9) * 1e3, 3)
        s["x_floor_weights_plus_kv"] = round(s["median_ms"] / s["floor_weights_plus_kv_ms"], 2)
        s["effective_GBps"] = round((dbytes + kv) / (s["median_ms"] / 1e3) / 1e9, 1)
        res[f"{tag}_pos{pos}"] = s
        report[f"decode_{tag}_pos{pos}"] = s
        report["decode"] = res

    def profile(tag, static, pos):
        model.use_static_entries(static)
        try:   # where one step's time goes (one instrumented step)
            report[f"profile_{tag}_pos{pos}"] = profile_step(model, pos)
        except Exception as exc:  # noqa: BLE001
            report[f"profile_{tag}_error"] = repr(exc)

    def streaming():
        # 80 ms chunks: mel + encoder over 8 mel frames + adapter + one decoder step each
        model.use_static_entries(True)   # the runtime's default: static one-stream entries where present
        rng = np.random.default_rng(0)
        n_chunks = int(os.environ.get("STREAM_STEPS", 10 if quick else 25))
        warm = 3
        audio = (0.1 * rng.standard_normal(1280 * (n_chunks + warm + 16))).astype(np.float32)
        s = model.stream()
        t = time.perf_counter()
        first = 8000
        s.feed(audio[:first])          # the prompt (32 left-pad tokens + BOS + delay 6) and 0.5 s
        report["stream_first_half_second_s"] = round(time.perf_counter() - t, 2)
        lat = []
        budget = float(os.environ.get("STREAM_BUDGET_S", 15))
        t0 = time.perf_counter()
        for i in range(first, first + 1280 * (n_chunks + warm), 1280):
            if len(lat) >= warm + 3 and (time.perf_counter() - t0 > budget or time.perf_counter() > deadline):
                break
            t = time.perf_counter()
            s.feed(audio[i:i + 1280])
            lat.append((time.perf_counter() - t) * 1e3)
        st = stats(lat[warm:])
        st["rtf"] = round(st["median_ms"] / 80.0, 3)
        st["tokens_so_far"] = s.token_count
        report["stream_80ms"] = st
        after = i + 1280   # the next chunk (the audio runs 16 chunks past the loop's end)
        try:   # where one 80 ms step's time goes: mel, encoder, adapter, decoder step
            report["profile_stream_80ms"] = profile_call(model, lambda: s.feed(audio[after:after + 1280]), top=20)
        except Exception as exc:  # noqa: BLE001
            report["profile_stream_80ms_error"] = repr(exc)

    plan = []
    for tag, on in entries[:1]:
        plan += [(f"decode {tag} {positions[0]}", decode_series, (tag, on, positions[0])),
                 (f"profile {tag} {positions[0]}", profile, (tag, on, positions[0]))]
    plan.append(("streaming", streaming, ()))
    for tag, on in entries[:1]:
        for pos in positions[1:]:
            plan += [(f"decode {tag} {pos}", decode_series, (tag, on, pos)), (f"profile {tag} {pos}", profile, (tag, on, pos))]
    for tag, on in entries[1:]:
        plan += [(f"decode {tag} {pos}", decode_series, (tag, on, pos)) for pos in positions]
    skipped, errors = [], []
    for name, fn, fargs in plan:
        if time.perf_counter() > deadline:
            skipped.append(name)
            continue
        try:
            fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - keep the other sections
            import traceback
            traceback.print_exc()
            report[f"error {name}"] = repr(exc)
            errors.append(name)
    if skipped:
        report["skipped_for_time"] = skipped
    if time.perf_counter() < deadline:
        report["bandwidth_after"] = stream_read_gbps(n_threads)
    report["finished"] = time.strftime("%H:%M:%S")
    if errors:
        sys.exit(f"failed: {', '.join(errors)}")


def cmd_hf(args):
    runtime_setup(hide_tvm=False)    # transformers probes for optional packages; TVM is not used here
    import torch
    import transformers
    from transformers import (VoxtralRealtimeConfig, VoxtralRealtimeFeatureExtractor,
                              VoxtralRealtimeForConditionalGeneration)

    from voxc.loader.hf import hf_config_dict
    from voxc.config import ModelConfig

    art = Path(args.artifact)
    manifest = json.loads((art / MANIFEST).read_text())
    cfg = ModelConfig.from_dict(manifest["config"])
    n_threads = threads()
    torch.set_num_threads(n_threads)
    report = Report(os.environ.get("HF_REPORT", "cpu_hf"))
    report["config"] = {"from": art.name, "config_key": config_key(manifest)}
    report["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "mkldnn_bf16": _bf16_supported(torch)}
    report["cpu"] = cpu_info()
    report["stream_read"] = stream_read_gbps(n_threads)
    report["torch_sum_read"] = torch_read_gbps(torch)
    hf_cfg = VoxtralRealtimeConfig(**hf_config_dict(cfg))
    torch.manual_seed(0)
    fast = os.environ.get("HF_FAST_INIT", "1") == "1"
    t = time.perf_counter()
    with fast_random_init(torch, fast):
        model = VoxtralRealtimeForConditionalGeneration(hf_cfg).eval()
    report["init"] = {"seconds_float32": round(time.perf_counter() - t, 1),
                      "method": "transformers' own init, Tensor.normal_/uniform_ drawing from a 16M-sample pool "
                                "(values do not change the timing)" if fast else "transformers' own init"}
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        report["nonfinite_params"] = bad[:5]
    report["params_B"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 4)
    text = model.get_decoder() if hasattr(model, "get_decoder") else None
    dec_params = sum(p.numel() for n, p in model.named_parameters()
                     if "language_model" in n or "lm_head" in n or "embed_tokens" in n)
    report["decoder_params_B"] = round(dec_params / 1e9, 4)
    del text

    fe = VoxtralRealtimeFeatureExtractor()
    n1, n2 = (int(x) for x in os.environ.get("HF_STEPS", "3,11").split(","))
    rng = np.random.default_rng(0)
    # audio for left pad 32 + prompt + n2 steps + the right padding
    n_tok = 39 + n2 + 24
    audio = (0.1 * rng.standard_normal(1280 * n_tok)).astype(np.float32)
    feats32 = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
    prompt = torch.tensor([[1] + [32] * 38])
    report["audio_tokens"] = int(feats32.shape[-1] // 8)
    budget = min(float(os.environ.get("HF_BUDGET_S", 1e9)), float(os.environ.get("VOXC_STAGE_S", 1e9)) - 10)
    t_start = report.t0
    last = 0.0

    def gen(new, feats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            g = model.generate(input_ids=prompt, input_features=feats, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new)
        return time.perf_counter() - t0, int(g.shape[1] - prompt.shape[1])

    for dtype in args.dtypes.split(","):
        if time.perf_counter() - t_start + 1.2 * last > budget:   # the next dtype would not finish
            report[f"{dtype}_skipped"] = f"not enough of the stage's {budget:.0f}s left"
            break
        t_dtype = time.perf_counter()
        td = getattr(torch, dtype)
        if dtype != "float32":
            t = time.perf_counter()
            model = model.to(td)
            report[f"convert_s_{dtype}"] = round(time.perf_counter() - t, 1)
        feats = feats32.to(td)
        try:
            gen(1, feats)     # warm-up
            # the fastest of HF_REPEATS runs each: a difference of single runs went negative on a
            # loaded 2-core machine (another process took the CPU during the shorter run)
            repeats = max(1, int(os.environ.get("HF_REPEATS", 2)))
            (t1, s1), (t2, s2) = (min(gen(n, feats) for _ in range(repeats)) for n in (n1, n2))
            method = f"(generate {s2} new tokens - generate {s1}) / {s2 - s1}, fastest of {repeats} each"
            step = (t2 - t1) / max(1, s2 - s1)
            if step <= 0:    # still disturbed: the whole generate per token bounds the step from above
                step, method = t2 / max(1, s2), f"generate {s2} new tokens / {s2} (the difference was not positive)"
            report[f"{dtype}"] = {"generate_s": {str(s1): round(t1, 3), str(s2): round(t2, 3)},
                                  "decode_step_ms": round(step * 1e3, 2),
                                  "prefill_and_first_s": round(max(0.0, t1 - (s1 - 1) * step), 3),
                                  "method": method}
        except Exception as exc:  # noqa: BLE001 - keep the other dtype
            import traceback
            traceback.print_exc()
            report[f"{dtype}_error"] = repr(exc)
        last = time.perf_counter() - t_dtype
    report["finished"] = time.strftime("%H:%M:%S")


class fast_random_init:
    """Inside: ``Tensor.normal_`` / ``uniform_`` (what torch.nn.init and transformers' init call) copy windows
    of one pool of 16M standard normals instead of drawing each value (torch draws them on one thread:
    ~75 s for the 4.4 B parameters); normal(mean, std) -> mean + std * pool, uniform(a, b) -> the mean plus
    pool * (b - a) / 6, clamped to [a, b]."""

    def __init__(self, torch, on: bool = True):
        self.torch, self.on = torch, on

    def __enter__(self):
        if not self.on:
            return self
        torch = self.torch
        pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0))
        self.saved = torch.Tensor.normal_, torch.Tensor.uniform_
        state = {"offset": 0}

        def fill(t, scale, shift, lo=None, hi=None):
            flat = t.detach().view(-1) if t.is_contiguous() else None
            if flat is None or not t.dtype.is_floating_point or t.device.type != "cpu":
                return None
            n, i = flat.numel(), 0
            while i < n:
                off = state["offset"] = (state["offset"] + 7919) % (pool.numel() // 2)
                m = min(n - i, pool.numel() - off)
                flat[i:i + m].copy_(pool[off:off + m])
                i += m
            with torch.no_grad():
                flat.mul_(scale).add_(shift)
                if lo is not None:
                    flat.clamp_(lo, hi)
            return t

        saved_normal, saved_uniform = self.saved

        def normal_(t, mean=0.0, std=1.0, *, generator=None):
            out = fill(t, std, mean)
            return out if out is not None else saved_normal(t, mean, std, generator=generator)

        def uniform_(t, a=0.0, b=1.0, *, generator=None):
            out = fill(t, (b - a) / 6, (a + b) / 2, a, b)
            return out if out is not None else saved_uniform(t, a, b, generator=generator)

        torch.Tensor.normal_, torch.Tensor.uniform_ = normal_, uniform_
        return self

    def __exit__(self, *exc):
        if self.on:
            self.torch.Tensor.normal_, self.torch.Tensor.uniform_ = self.saved
        return False


def _bf16_supported(torch):
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        return None


def torch_read_gbps(torch, gib: float | None = None, reps: int = 7) -> dict:
    gib = float(os.environ.get("BW_GIB", 2.0)) if gib is None else gib
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(reps))
    del x
    return {"GBps": round(gib * (1 << 30) / best / 1e9, 2), "threads": torch.get_num_threads(),
            "method": f"torch float32 sum of a {gib} GiB tensor, best of {reps}"}


# ---------------------------------------------------------------------------------------------
def cmd_summary(args):
    out = Path(os.environ.get("OUT", "/tmp/out"))
    files = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("cpu_*.json")) if p.stem != "cpu_bench"}
    hf = files.get("cpu_hf", {})
    summary = {"cpu": next((f.get("cpu") for f in files.values() if f.get("cpu")), None), "variants": {}}
    for name, f in files.items():
        if not name.startswith("cpu_voxc_"):
            continue
        row = {"quantization": f.get("artifact", {}).get("quantization"),
               "int8_activations": bool((f.get("artifact", {}).get("build") or {}).get("int8_activations")),
               "decode_weight_GB": f.get("decode_weight_GB"),
               "stream_read_GBps": f.get("stream_read_before", {}).get("GBps"),
               "floor_ms": f.get("floor_ms")}
        for key, value in (f.get("decode") or {}).items():
            row[f"decode_{key}_ms"] = value["median_ms"]
            row[f"decode_{key}_x_floor"] = value["x_floor_weights"]
            for dtype in ("float32", "bfloat16"):
                same = hf.get("config", {}).get("config_key") == f.get("artifact", {}).get("config_key")
                if isinstance(hf.get(dtype), dict) and same:
                    row[f"decode_{key}_speedup_vs_hf_{dtype}"] = round(hf[dtype]["decode_step_ms"] / value["median_ms"], 2)
        if f.get("stream_80ms"):
            row["stream_80ms_ms"] = f["stream_80ms"]["median_ms"]
            row["stream_rtf"] = f["stream_80ms"]["rtf"]
        summary["variants"][name.removeprefix("cpu_voxc_")] = row
    summary["hf"] = {k: hf[k]["decode_step_ms"] for k in ("float32", "bfloat16") if isinstance(hf.get(k), dict)}
    summary["hf_stream_read_GBps"] = hf.get("stream_read", {}).get("GBps")
    summary["hf_torch_sum_GBps"] = hf.get("torch_sum_read", {}).get("GBps")
    (out / "cpu_bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    b.add_argument("--size", choices=["full", "tiny"], default="full")
    b.add_argument("--quant", default="q4_k", help="q4_k, q8_0 or f32; a _int8 suffix (q4_k_int8) for int8 activations")
    b.add_argument("--mcpu", default="x86-64-v3")
    b.add_argument("--force", action="store_true", help="replace an existing artifact")
    b.add_argument("--int8-activations", action="store_true",
                   help="int8 activations and integer dot products in the quantized decode GEMVs")
    b.set_defaults(fn=cmd_build)
    v = sub.add_parser("voxc")
    v.add_argument("artifact")
    v.set_defaults(fn=cmd_voxc)
    h = sub.add_parser("hf")
    h.add_argument("artifact")
    h.add_argument("--dtypes", default="float32,bfloat16")
    h.set_defaults(fn=cmd_hf)
    s = sub.add_parser("summary")
    s.set_defaults(fn=cmd_summary)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
