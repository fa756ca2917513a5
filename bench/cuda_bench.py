"""Full-size Voxtral Realtime (ModelConfig() defaults, random weights) on one GPU through voxc's
runtime-only CUDA path: decode latency vs the memory-bandwidth floor, offline RTF, streaming steps,
batched decode, memory.  Runs on the GPU machine (bench/device/run_bench.sh); numbers -> $OUT.

    python bench/cuda_bench.py [ARTIFACT ...]      (default: .devpack/artifacts/full_cuda*)
Env: SECS (60) clip length, MAX_STREAMS (auto), QUICK=1 fewer repetitions.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
import common  # noqa: E402
from common import BenchTokenizer  # noqa: E402

PACK = common.setup()
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECS = float(os.environ.get("SECS", 60))
QUICK = os.environ.get("QUICK") == "1"


def copy_bandwidth():
    """Device-to-device copy through torch, bytes read + written per second (METHOD.md)."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        for _ in range(10):
            y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 10 / 1e3)
    gbps = 2 * x.numel() * 4 / float(np.median(times)) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return gbps


def gpu_used_gb():
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1e9


def stats(ms):
    ms = np.asarray(ms)
    return {"median_ms": round(float(np.median(ms)), 3), "p10_ms": round(float(np.percentile(ms, 10)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "n": int(ms.size)}


def use_static(model, on: bool):
    if not hasattr(model, "_general_decode"):
        model._general_decode = model._decode
    if not hasattr(model, "_general_encode"):
        model._general_encode = model._encode
    model._encode = model._general_encode
    if not on:
        model._decode = model._general_decode
        return False
    try:
        static = model.vm["decode_b1n1"]
    except Exception:  # noqa: BLE001
        model._decode = model._general_decode
        return False
    general = model._general_decode

    def dispatch(tokens, *rest):
        return static(tokens, *rest) if tuple(tokens.shape) == (1, 1) else general(tokens, *rest)

    model._decode = dispatch
    _use_static_encode(model)
    return True


def _use_static_encode(model):
    """Route one-step encodes (one stream, 8 mel frames) to ``encode_b1t8`` when the artifact has it."""
    try:
        static = model.vm["encode_b1t8"]
    except Exception:  # noqa: BLE001
        return
    general = model._encode

    def dispatch(mel, *rest):
        return static(mel, *rest) if tuple(mel.shape)[0] == 1 and tuple(mel.shape)[2] == 8 else general(mel, *rest)

    model._encode = dispatch


def decode_steps(model, slots, start, steps, delay=6):
    """ms per decode call of len(slots) streams at positions start.. (token read back each step)."""
    b = len(slots)
    tokens = np.ones((b, 1), np.int32)
    delays = np.full(b, delay, np.float32)
    slots = np.asarray(slots, np.int32)
    out = []
    for i in range(steps):
        t = time.perf_counter()
        _, nxt = model.decode(tokens, delays, slots, np.full(b, start + i, np.int32))
        tokens = model.rt.numpy(nxt).reshape(b, 1).astype(np.int32)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def realtime_streams(model, n: int, seconds: float, chunk: int = 1280, seed: int = 1) -> dict:
    """``n`` concurrent streams, each fed 80 ms of audio per step and all advanced together in one
    batched step (runtime.session.advance: batched mel + encode, then batched decode), for
    ``seconds`` of audio. Step latencies per 10 s of stream time; a step under 80 ms keeps all ``n``
    streams real time at that point of their audio."""
    from voxc.runtime.session import advance

    rng = np.random.default_rng(seed)
    sessions = [model.stream() for _ in range(n)]
    noise = (0.1 * rng.standard_normal((n, chunk * 50))).astype(np.float32)   # 4 s of distinct noise each
    steps = int(seconds * 16000 // chunk)
    lat = []
    t0 = time.perf_counter()
    for step in range(steps):
        offset = (step % 50) * chunk
        t = time.perf_counter()
        for i, s in enumerate(sessions):
            s.queue(noise[i, offset:offset + chunk])
        advance(sessions)
        lat.append((time.perf_counter() - t) * 1e3)
    total = time.perf_counter() - t0
    per_10s = int(10 * 16000 // chunk)
    windows = {f"{(k + 1) * 10}s": stats(lat[k * per_10s:(k + 1) * per_10s])
               for k in range(len(lat) // per_10s)}
    last = lat[-per_10s:]
    for s in sessions:
        s.end()
    advance(sessions)
    for s in sessions:
        s.finish()
    return {"streams": n, "seconds_of_audio": seconds, "wall_s": round(total, 1), "step_ms_by_stream_time": windows,
            "last_10s": stats(last), "realtime": bool(np.percentile(last, 90) < chunk / 16),
            "tokens_per_stream": len(sessions[0].tokens)}


def bench_artifact(report, art: Path, copy_gbps: float):
    from cuda_build import ensure_weights
    from voxc.runtime.model import CompiledModel

    name = art.name
    manifest = json.loads((art / "voxc-artifact.json").read_text())
    res: dict = {"cuda": manifest.get("cuda"), "kernel_calls": manifest.get("kernel_calls"),
                 "model_dtype": manifest["model_dtype"], "quantization": manifest.get("quantization")}
    t = time.perf_counter()
    res["weights_gb"], res["weights_written_s"] = ensure_weights(art)
    res["weights_written_s"] = round(res["weights_written_s"], 1)
    cfg = manifest["config"]
    e, d = cfg["encoder"], cfg["decoder"]
    itemsize = 4 if manifest["model_dtype"] == "float32" else 2
    per_stream = itemsize * (e["n_layers"] * 2 * e["sliding_window"] * e["n_heads"] * e["head_dim"]
                             + d["n_layers"] * 2 * d["sliding_window"] * d["n_kv_heads"] * d["head_dim"]
                             + 256 * d["dim"] + 2 * e["num_mel_bins"] + e["dim"])
    res["cache_bytes_per_stream_gb"] = round(per_stream / 1e9, 3)
    import torch
    free = torch.cuda.mem_get_info()[0]
    max_streams = int(os.environ.get("MAX_STREAMS", 0)) or \
        max(1, min(128, int((free - res["weights_gb"] * 1e9 - 6e9) // per_stream)))
    res["max_streams"] = max_streams
    t = time.perf_counter()
    model = CompiledModel.load(art, max_streams=max_streams)
    model.tokenizer = BenchTokenizer()
    res["load_s"] = round(time.perf_counter() - t, 1)
    res["gpu_used_after_load_gb"] = round(gpu_used_gb(), 2)
    dec_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in manifest["params"]
                    if p["name"].startswith(("dec.", "tok_embeddings.")))   # quantized: qweight + scales
    res["decode_weight_gb"] = round(dec_bytes / 1e9, 3)
    res["decode_floor_ms"] = round(dec_bytes / (copy_gbps * 1e9) * 1e3, 3)
    report[name] = res

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * SECS))).astype(np.float32)
    steps = 60 if QUICK else 200
    for static in (False, True):
        if os.environ.get("ONLY") == "batched":
            break
        if not use_static(model, static) and static:
            continue
        tag = "static_b1n1" if static else "generic"
        # warm-up: a short stream (compiles nothing, but allocates pools and captures graphs)
        s = model.stream()
        s.feed(audio[:16000])
        s.finish()
        for start in (100, 8100):
            res[f"decode_b1_{tag}_pos{start}"] = stats(decode_steps(model, [0], start, steps)[5:])
        t = time.perf_counter()
        s = model.stream()
        s.feed(audio)
        s.finish()
        offline = time.perf_counter() - t
        res[f"offline_{tag}"] = {"seconds": round(offline, 3), "rtf": round(offline / SECS, 4),
                                 "x_realtime": round(SECS / offline, 1), "tokens": len(s.tokens)}
        s = model.stream()
        chunk = 1280
        lat = []
        for i in range(0, min(len(audio), 16000 * (8 if QUICK else 20)), chunk):
            t = time.perf_counter()
            s.feed(audio[i:i + chunk])
            lat.append((time.perf_counter() - t) * 1e3)
        s.finish()
        res[f"stream_80ms_{tag}"] = stats(lat[10:])
        report[name] = res
    use_static(model, False)
    batch = {}
    for b in sorted({1, 2, 4, 8, 16, 32, 64, max_streams}):
        if b > max_streams:
            continue
        ms = stats(decode_steps(model, list(range(b)), 1000, 15 if QUICK else 40)[3:])
        batch[b] = {**ms, "tokens_per_s": round(b * 1000 / ms["median_ms"], 1),
                    "streams_realtime": round(b * 80 / ms["median_ms"], 1)}
    res["batched_decode_pos1000"] = batch
    report[name] = res
    if os.environ.get("REALTIME", "1") == "1":
        stream_secs = float(os.environ.get("STREAM_SECS", 60))
        for n in sorted({1, max_streams}):
            res[f"realtime_{n}_streams"] = realtime_streams(model, n, stream_secs)
            print(name, f"realtime {n} streams:", json.dumps(res[f"realtime_{n}_streams"]["last_10s"]), flush=True)
            report[name] = res
    res["gpu_used_peak_gb"] = round(gpu_used_gb(), 2)
    res["floor_ratio_b1"] = {k: round(v["median_ms"] / res["decode_floor_ms"], 2)
                             for k, v in res.items() if k.startswith("decode_b1_")}
    report[name] = res
    del model
    return res


def main():
    report = common.Report("cuda_bench")
    report["gpu"] = common.gpu_name()
    report["secs"] = SECS
    copy_gbps = copy_bandwidth()
    report["copy_GBps_read_plus_write"] = round(copy_gbps, 1)
    arts = [Path(a) for a in sys.argv[1:]] or sorted((PACK / "artifacts").glob("full_cuda*"))
    for art in arts:
        try:
            bench_artifact(report, art, copy_gbps)
        except Exception as exc:  # noqa: BLE001 - keep the other variants' numbers
            import traceback
            traceback.print_exc()
            report[f"{art.name}_error"] = repr(exc)
        report.save()
        import gc
        gc.collect()
    report.save()


if __name__ == "__main__":
    main()
