"""Full-size Voxtral Realtime (ModelConfig() defaults, random weights) on one GPU through voxc's
runtime-only CUDA path: decode latency vs the memory-bandwidth floor, offline RTF, streaming steps,
batched decode, memory.  Runs on the GPU machine (bench/device/run_bench.sh); numbers -> $OUT.

    python bench/cuda_bench.py [ARTIFACT ...]      (default: .devpack/artifacts/full_cuda*, then full_vulkan*)
    python bench/cuda_bench.py --local [ARTIFACT ...]
        a rehearsal on the CPU (TVM's compiler hidden, as on the device): the same steps, few of them,
        on the llvm artifacts `pack.sh --local` builds (default: .devpack/artifacts/full_llvm*, then
        full_vulkan* on lavapipe)

Vulkan artifacts (WGSL kernels through wgpu-native on the GPU's Vulkan driver, targets/vulkan.py) are
timed by the same functions as the CUDA ones, each in a process of its own and before them: a driver
fault, a hang (ISOLATED_TIMEOUT_S, 300) or a missing Vulkan loader costs only its own figures, and the
GPU memory it held is free again when CUDA's runtime (whose pool keeps what it allocated) starts.
Every step reads its result back to the host (the next token), which waits for
the GPU's queue on both paths, so the times compare like with like.  ``vulkan_vs_cuda`` then gives,
per full_vulkan<x>, its decode step (one stream, position 100), 80 ms stream step and batched decode
over those of full_cuda<x> (full_llvm<x> locally); ``vulkan_decode_vs_cuda`` and
``vulkan_stream_step_vs_cuda`` are the first pair's headline ratios (each side through the entries
voxc runs by default).  A vulkan artifact holds at most as many streams as its largest state tensor
fits the adapter's buffer binding limit (see wgpu_stream_limit).
Env: SECS (60) clip length, MAX_STREAMS (auto: as many whole windows of KV as the free memory holds, at
most 128; the caches are paged, so a count set here may go further: streams hold the pages of the audio
they heard), QUICK=1 fewer repetitions, ONLY=batched, BATCH_COUNTS (stream counts of the batched decode,
"1 2 4 8 16 32 64 MAX_STREAMS"), REALTIME (1), STREAM_SECS (60), PROFILE (1: per-kernel times through
torch.profiler where torch is there), REALTIME_COUNTS (stream counts of the realtime test; default "1 max";
"max" = MAX_STREAMS; a count keeps real time when the p99 of its last 10 s of steps is under 80 ms),
REALTIME_PROFILE_STEPS (0: that many more steps of each count under torch.profiler, CUDA only),
KV_SECONDS (0: the KV pools start small and grow; else sized at load for that many seconds of every
stream, as `voxc serve --kv-seconds` does).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
import common  # noqa: E402
from common import BenchTokenizer  # noqa: E402

# the local rehearsal: a few steps of everything, on the CPU
LOCAL_ENV = {"SECS": "2", "QUICK": "1", "STREAM_SECS": "1", "MAX_STREAMS": "2", "STEPS": "4", "BATCH_STEPS": "4"}


class Device:
    """What the benchmark asks of the device: copy bandwidth, memory in use and free.  ``cuda``
    through torch (on the GPU machine); ``cpu`` (the local rehearsal) through numpy and /proc."""

    def __init__(self, kind: str):
        self.kind = kind

    def name(self) -> str:
        return common.gpu_name() if self.kind == "cuda" else f"cpu ({os.cpu_count()} cores, local rehearsal)"

    def copy_bandwidth(self) -> float:
        """Device-to-device copy, bytes read + written per second (GB/s)."""
        if self.kind == "cpu":
            x = np.ones(1 << 23, np.float32)
            y = np.empty_like(x)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                np.copyto(y, x)
                times.append(time.perf_counter() - t)
            return 2 * x.nbytes / float(np.median(times)) / 1e9
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

    def free_bytes(self) -> int:
        if self.kind == "cpu":
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
            return 8 << 30
        import torch

        return torch.cuda.mem_get_info()[0]

    def used_gb(self) -> float:
        if self.kind == "cpu":
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # peak RSS of this process
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 1e9


def stats(ms):
    ms = np.asarray(ms)
    return {"median_ms": round(float(np.median(ms)), 3), "p10_ms": round(float(np.percentile(ms, 10)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": int(ms.size)}


def decode_steps(model, slots, start, steps, delay=6):
    """ms per decode call of len(slots) streams at positions start.. (token read back each step)."""
    b = len(slots)
    tokens = np.ones((b, 1), np.int32)
    slots = np.asarray(slots, np.int32)
    model.set_delay(slots, np.full(b, delay))
    model.take_kv_pages(slots, start)   # the keys before ``start`` in pages of their own, as a stream's
    out = []
    for i in range(steps):
        t = time.perf_counter()
        _, nxt = model.decode(tokens, slots, np.full(b, start + i, np.int32))
        tokens = model.rt.numpy(nxt).reshape(b, 1).astype(np.int32)
        out.append((time.perf_counter() - t) * 1e3)
    model.release_kv_pages(slots)        # free for the streams of the later tests
    return out


def kernel_profile(model, audio, steps: int = 20, batch: int = 1) -> dict:
    """Per-kernel GPU time of one decode step (static one-stream entry, position 100), of one
    80 ms streaming step and, with ``batch`` > 1, of one batched decode step of that many streams
    (generic entries, position 1000, as the batched figures), from CUPTI through torch.profiler
    (which records every kernel of the process, TVM's included, graph-launched ones too).  {} when
    torch is not importable."""
    with common.tvm_lookups_allowed():
        profiler = torch_profiler()
        if profiler is None:
            return {"skipped": "torch is not importable"}
        return _kernel_profile(model, audio, steps, batch, *profiler)


def torch_profiler():
    """(torch, ProfilerActivity, profile), or None where torch is not importable (call inside
    common.tvm_lookups_allowed(): torch's import looks TVM's names up)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    return torch, ProfilerActivity, profile


def profile_table(prof, per: int) -> dict:
    """torch.profiler's kernels as per-step figures over ``per`` steps, the 40 largest first."""
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0 and ev.count:
            rows.append({"kernel": ev.key[:120], "launches_per_step": round(ev.count / per, 2),
                         "us_per_step": round(us / per, 2)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernel_us_per_step": round(sum(r["us_per_step"] for r in rows), 1),
            "launches_per_step": round(sum(r["launches_per_step"] for r in rows), 1), "top": rows[:40],
            **idle_gaps(prof, per)}


GAPS_LISTED = 10


def idle_gaps(prof, per: int) -> dict:
    """Where the GPU waited between its kernels (and copies) in the profiled steps: ``idle_us_per_step``,
    the time no kernel ran between the first and the last, and the GAPS_LISTED longest gaps with the
    kernels on either side (a host that synchronises mid-step, or launches slower than tiny kernels
    run, shows here; the first gap of each step, the host preparing it, too)."""
    try:
        spans = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                       if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.time_range.end > ev.time_range.start)
    except Exception as exc:  # noqa: BLE001 - an older torch without these fields: the table stands alone
        return {"idle_gaps_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if not spans:
        return {}
    gaps, busy_until, before = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, before, name))
        if end > busy_until:
            busy_until, before = end, name
    gaps.sort(key=lambda g: -g[0])
    return {"idle_us_per_step": round(sum(g[0] for g in gaps) / per, 1),
            "longest_gaps": [{"us": round(us, 1), "after": a[:80], "before": b[:80]} for us, a, b in gaps[:GAPS_LISTED]]}


def _kernel_profile(model, audio, steps, batch, torch, ProfilerActivity, profile) -> dict:
    def decode_profile(slots: list[int], position: int) -> dict:
        decode_steps(model, slots, position, 3)          # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall = decode_steps(model, slots, position, steps)
            torch.cuda.synchronize()
        return {**profile_table(prof, steps), "wall_ms_per_step": round(float(np.median(wall)), 3)}

    out = {}
    model.use_static_entries(True)
    out["decode_b1_pos100"] = decode_profile([0], 100)
    s = model.stream()
    chunk = 1280
    for i in range(0, 16000, chunk):          # warm: 1 s
        s.feed(audio[i:i + chunk])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for i in range(16000, 16000 + steps * chunk, chunk):
            s.feed(audio[i:i + chunk])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3 / steps
    s.finish()
    out["stream_80ms"] = {**profile_table(prof, steps), "wall_ms_per_step": round(wall, 3)}
    if batch > 1:
        model.use_static_entries(False)
        try:
            out[f"decode_b{batch}_pos1000"] = decode_profile(list(range(batch)), 1000)
        finally:
            model.use_static_entries(True)
    return out


WORST_STEPS = 12     # realtime_streams reports this many of the slowest steps


def realtime_streams(model, n: int, seconds: float, chunk: int = 1280, seed: int = 1,
                     profile_steps: int = 0) -> dict:
    """``n`` concurrent streams, each fed 80 ms of audio per step and all advanced together in one
    batched step (runtime.session.advance: batched mel + encode, then batched decode), for
    ``seconds`` of audio. Step latencies per 10 s of stream time; a step under 80 ms keeps all ``n``
    streams real time at that point of their audio.  With ``profile_steps`` (and torch importable on
    a CUDA machine) that many more steps run under torch.profiler afterwards, outside the latencies:
    ``profile`` holds their kernels per step (where a step at this many streams spends its time).
    ``worst_steps``: the WORST_STEPS slowest steps (they set the p99), each with whether a KV pool grew in
    it, the pages it handed out and the generations Python's collector went through during it."""
    from voxc.runtime.session import advance

    rng = np.random.default_rng(seed)
    sessions = [model.stream() for _ in range(n)]
    noise = (0.1 * rng.standard_normal((n, chunk * 50))).astype(np.float32)   # 4 s of distinct noise each
    steps = int(seconds * 16000 // chunk)
    lat = []
    events = []          # per step: what else happened in it (KV pool growths, pages handed out, Python's collector)
    collections = []

    def collected(phase, info):       # a gc callback: the generations Python's collector went through
        if phase == "stop":
            collections.append(info["generation"])

    gc.callbacks.append(collected)

    def pool_state():
        return {name: (pool.growths, pool.pages_in_use) for name, pool in model.kv.items()}

    def step(k: int) -> None:
        offset = (k % 50) * chunk
        for i, s in enumerate(sessions):
            s.queue(noise[i, offset:offset + chunk])
        advance(sessions)

    t0 = time.perf_counter()
    try:
        before = pool_state()
        for k in range(steps):
            collections.clear()
            t = time.perf_counter()
            step(k)
            lat.append((time.perf_counter() - t) * 1e3)
            after = pool_state()
            events.append({"gc_generations": list(collections),
                           **{f"{name}_grew": after[name][0] > before[name][0] for name in after},
                           **{f"{name}_pages_taken": after[name][1] - before[name][1] for name in after}})
            before = after
    except Exception:
        for s in sessions:
            s.drop()                  # their slots and pages back: the next count starts clean
        print(f"{n} streams failed at {len(lat) * chunk / 16000:.1f} s of audio", flush=True)
        raise
    finally:
        gc.callbacks.remove(collected)
    total = time.perf_counter() - t0
    profiled = None
    if profile_steps > 0:
        with common.tvm_lookups_allowed():
            profiler = torch_profiler()
            if profiler is None:
                profiled = {"skipped": "torch is not importable"}
            else:
                torch, ProfilerActivity, profile = profiler
                torch.cuda.synchronize()
                t = time.perf_counter()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for k in range(steps, steps + profile_steps):
                        step(k)
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - t) * 1e3 / profile_steps
                profiled = {**profile_table(prof, profile_steps), "wall_ms_per_step": round(wall, 3)}
    per_10s = int(10 * 16000 // chunk)
    windows = {f"{(k + 1) * 10}s": stats(lat[k * per_10s:(k + 1) * per_10s])
               for k in range(len(lat) // per_10s)}
    last = lat[-per_10s:]
    for s in sessions:
        s.end()
    advance(sessions)
    for s in sessions:
        s.finish()
    # the slowest steps (they set the p99) with what else happened in them
    worst = [{"step": k, "stream_s": round((k + 1) * chunk / 16000, 2), "ms": round(lat[k], 2), **events[k]}
             for k in sorted(range(len(lat)), key=lambda k: -lat[k])[:WORST_STEPS]]
    return {"streams": n, "seconds_of_audio": seconds, "wall_s": round(total, 1), "step_ms_by_stream_time": windows,
            "worst_steps": worst,
            "last_10s": stats(last), "realtime": bool(np.percentile(last, 99) < chunk / 16),
            "tokens_per_stream": sessions[0].token_count, **({"profile": profiled} if profiled else {})}


def memory_use(model, device) -> dict:
    """Device memory in use and each KV pool's allocated size, in GB."""
    return {"used_gb": round(device.used_gb(), 2),
            "kv_allocated_gb": {name: round(pool.bytes_allocated / 1e9, 2) for name, pool in model.kv.items()}}


def env(name: str, default):
    return type(default)(os.environ.get(name, default))


def wgpu_stream_limit(art: Path, manifest: dict) -> tuple[int, dict]:
    """(most streams, adapter description) of a vulkan/metal artifact on this machine's adapter.  The
    kernels bind each state tensor whole, one buffer for all streams, so the largest (one layer of the
    decoder's KV cache: 32 MiB a stream in float16 at the full model's shapes) times the streams must
    fit maxStorageBufferBindingSize (2 GiB on NVIDIA's Vulkan driver: 63 streams)."""
    from voxc.runtime.wgpu_device import describe_adapter, load_wgpu_device

    from voxc.errors import VoxcError

    ffi = load_wgpu_device(art / manifest["wgpu"]["plugin"])
    adapter = describe_adapter(ffi, manifest["wgpu"].get("backend", "any"))
    limit = min(adapter["limits"]["max_storage_buffer_binding_size"], adapter["limits"]["max_buffer_size"])
    state, largest = max(((k, int(s["tensor_bytes_per_stream"])) for k, s in manifest["state"].items()),
                         key=lambda x: x[1])
    if largest > limit:   # said before a minute goes into writing random weights
        raise VoxcError(f"the GPU adapter {adapter.get('description')} binds at most {limit / 2**20:.0f} MiB per "
                        f"buffer, and one stream's {state} needs {largest / 2**20:.0f} MiB in one buffer")
    return limit // largest, adapter


def bench_artifact(report, art: Path, device: Device, copy_gbps: float):
    import voxc
    from cuda_build import ensure_weights
    from voxc import artifact
    from voxc.config import ModelConfig

    name = art.name
    secs = env("SECS", 60.0)
    quick = os.environ.get("QUICK") == "1"
    manifest = artifact.read_manifest(art)
    res: dict = {"bench": manifest.get("bench"), "model_dtype": manifest["model_dtype"],
                 "quantization": manifest.get("quantization"), "target": manifest["target"]}
    stream_limit = None
    if manifest["device_kind"] == "webgpu":   # before the weights: no adapter, no minute spent writing them
        stream_limit, adapter = wgpu_stream_limit(art, manifest)
        res["adapter"] = {k: adapter.get(k) for k in ("device", "vendor", "description", "backend", "adapter_type",
                                                      "wgpu_native_version", "limits")}
        res["adapter_stream_limit"] = stream_limit
        report[name] = res
    res["weights_gb"], res["weights_written_s"] = ensure_weights(art)
    res["weights_written_s"] = round(res["weights_written_s"], 1)
    cfg = ModelConfig.from_dict(manifest["config"])
    per_stream = sum(artifact.state_bytes_per_stream(cfg, manifest["model_dtype"],
                                                     artifact.manifest_kv_int8(manifest)).values())
    res["cache_bytes_per_stream_gb"] = round(per_stream / 1e9, 3)
    max_streams = env("MAX_STREAMS", 0) or \
        max(1, min(128, int((device.free_bytes() - res["weights_gb"] * 1e9 - 6e9) // per_stream)))
    res["max_streams"] = min(max_streams, stream_limit or max_streams)
    max_streams = res["max_streams"]
    t = time.perf_counter()
    while True:   # random weights written here: the manifest records their sizes, not hashes
        try:
            model = voxc.load(art, max_streams=max_streams, verify="size", kv_seconds=env("KV_SECONDS", 0.0) or None)
            break
        except voxc.VoxcError as exc:
            # Vulkan on the H100 refused 63 streams' caches ("Not enough memory left") although
            # CUDA holds 70: half as many, down to one, still gives the one-stream ratios
            if "memory" not in str(exc).lower() or max_streams == 1:
                raise
            res.setdefault("max_streams_refused", []).append(max_streams)
            max_streams = max(1, max_streams // 2)
            res["max_streams"] = max_streams
            gc.collect()
    model.tokenizer = BenchTokenizer()
    res["load_s"] = round(time.perf_counter() - t, 1)
    res["used_after_load_gb"] = round(device.used_gb(), 2)
    dec_bytes = sum(int(np.prod(p["shape"])) * artifact.numpy_dtype(p["dtype"]).itemsize for p in manifest["params"]
                    if p["name"].startswith(("dec.", "tok_embeddings.")))   # quantized: qweight + scales
    res["decode_weight_gb"] = round(dec_bytes / 1e9, 3)
    res["decode_floor_ms"] = round(dec_bytes / (copy_gbps * 1e9) * 1e3, 3)
    report[name] = res

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32)
    steps = env("STEPS", 60 if quick else 200)
    has_static = any(e in model.functions for e in artifact.STATIC_ENTRIES)
    for static in (False, True):
        if os.environ.get("ONLY") == "batched" or (static and not has_static):
            break
        model.use_static_entries(static)   # one-stream steps through decode_b1n1 / encode_b1t8, or not
        tag = "static_b1n1" if static else "generic"
        # warm-up: a short stream (compiles nothing, but allocates pools and captures graphs)
        s = model.stream()
        s.feed(audio[:16000])
        s.finish()
        for start in (100, min(8100, cfg.decoder.sliding_window - steps)):
            res[f"decode_b1_{tag}_pos{start}"] = stats(decode_steps(model, [0], start, steps)[min(5, steps // 2):])
        t = time.perf_counter()
        s = model.stream()
        s.feed(audio)
        s.finish()
        offline = time.perf_counter() - t
        res[f"offline_{tag}"] = {"seconds": round(offline, 3), "rtf": round(offline / secs, 4),
                                 "x_realtime": round(secs / offline, 1), "tokens": s.token_count}
        s = model.stream()
        chunk = 1280
        lat = []
        for i in range(0, min(len(audio), 16000 * (8 if quick else 20)), chunk):
            t = time.perf_counter()
            s.feed(audio[i:i + chunk])
            lat.append((time.perf_counter() - t) * 1e3)
        s.finish()
        res[f"stream_80ms_{tag}"] = stats(lat[min(10, len(lat) // 2):])
        res[f"cuda_graph_replays_{tag}"] = getattr(model, "cuda_graph_replays", 0)   # 0: the steps launched kernel by kernel
        report[name] = res
    if os.environ.get("PROFILE", "1") == "1" and device.kind == "cuda" and manifest["device_kind"] == "cuda":
        try:
            res["profile"] = kernel_profile(model, audio, batch=min(64, max_streams))
        except Exception as exc:  # noqa: BLE001 - a profiler failure must not cost the other figures
            res["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        report[name] = res
    model.use_static_entries(False)
    batch = {}
    batch_steps = env("BATCH_STEPS", 15 if quick else 40)
    counts = os.environ.get("BATCH_COUNTS", f"1 2 4 8 16 32 64 {max_streams}").split()
    for b in sorted({int(c) for c in counts}):
        if b > max_streams:
            continue
        ms = stats(decode_steps(model, list(range(b)), 1000, batch_steps)[min(3, batch_steps // 2):])
        batch[b] = {**ms, "tokens_per_s": round(b * 1000 / ms["median_ms"], 1),
                    "streams_realtime": round(b * 80 / ms["median_ms"], 1)}
    res["batched_decode_pos1000"] = batch
    model.use_static_entries(True)
    report[name] = res
    if os.environ.get("REALTIME", "1") == "1":
        stream_secs = env("STREAM_SECS", 60.0)
        counts = os.environ.get("REALTIME_COUNTS", "1 max").split()
        profile_steps = env("REALTIME_PROFILE_STEPS", 0) if device.kind == "cuda" else 0
        for n in sorted({min(max_streams, max_streams if c == "max" else int(c)) for c in counts}):
            try:
                res[f"realtime_{n}_streams"] = realtime_streams(model, n, stream_secs, profile_steps=profile_steps)
            except voxc.VoxcError as exc:   # e.g. out of memory: the count's error, and the next count still runs
                res[f"realtime_{n}_streams"] = {"error": str(exc)[:400], **memory_use(model, device)}
                gc.collect()
                continue
            res[f"realtime_{n}_streams"].update(memory_use(model, device))
            model.release_cached_memory()
            res[f"realtime_{n}_streams"]["used_gb_after_release"] = round(device.used_gb(), 2)
            print(name, f"realtime {n} streams:", json.dumps(res[f"realtime_{n}_streams"]["last_10s"]), flush=True)
            report[name] = res
    res["used_peak_gb"] = round(device.used_gb(), 2)
    res["floor_ratio_b1"] = {k: round(v["median_ms"] / res["decode_floor_ms"], 2)
                             for k, v in res.items() if k.startswith("decode_b1_")}
    report[name] = res
    del model
    return res


def bench_in_own_process(report, art: Path, copy_gbps: float, local: bool) -> bool:
    """bench_artifact for ``art`` in a child process (``--isolated``), its figures merged into
    ``report``; the child writes $OUT/cuda_bench_<name>.json as it goes, so a run stopped at its time
    limit keeps them too."""
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="voxc-bench-")
    child = Path(out) / f"cuda_bench_{art.name}.json"
    child.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--isolated", "--copy-gbps", str(copy_gbps),
           *(["--local"] if local else []), str(art)]
    timeout = env("ISOLATED_TIMEOUT_S", 300.0)
    try:
        rc = subprocess.run(cmd, env={**os.environ, "OUT": out}, timeout=timeout).returncode
        stopped = f"its process exited with status {rc} (a fault in the GPU driver?)"
    except subprocess.TimeoutExpired:
        rc, stopped = -1, f"stopped after {timeout:.0f} s (ISOLATED_TIMEOUT_S); its figures so far are kept"
    data = json.loads(child.read_text()) if child.exists() else {}
    for key in (art.name, f"{art.name}_error"):
        if key in data:
            report[key] = data[key]
    if rc != 0 and f"{art.name}_error" not in data:
        report[f"{art.name}_error"] = stopped
    return rc == 0


def default_tag(res: dict) -> str:
    """The entries voxc runs one stream through by default: the static ones where the artifact has them."""
    return "static_b1n1" if "decode_b1_static_b1n1_pos100" in res else "generic"


def vulkan_vs_cuda(data: dict) -> dict:
    """Per full_vulkan<x> in ``data``: its step times over those of full_cuda<x> (full_llvm<x> in the
    local rehearsal), each median over median; ``default``: each side through its default entries,
    ``generic``: both through the generic ones (a vulkan build has no static entries)."""
    pairs = {}
    for name, vk in sorted(data.items()):
        if not (name.startswith("full_vulkan") and isinstance(vk, dict) and "stream_80ms_generic" in vk):
            continue
        suffix = name.removeprefix("full_vulkan")
        partner = next((p for p in (f"full_cuda{suffix}", f"full_llvm{suffix}")
                        if isinstance(data.get(p), dict) and "stream_80ms_generic" in data[p]), None)
        if partner is None:
            pairs[name] = {"error": f"no full_cuda{suffix} figures to compare with"}
            continue
        base = data[partner]
        row: dict = {"versus": partner, "vulkan_entries": default_tag(vk), "versus_entries": default_tag(base)}
        for what, key in (("decode_b1_pos100", "decode_b1_{}_pos100"), ("stream_80ms", "stream_80ms_{}")):
            for mode, tags in (("default", (default_tag(vk), default_tag(base))), ("generic", ("generic", "generic"))):
                mine, theirs = vk[key.format(tags[0])]["median_ms"], base[key.format(tags[1])]["median_ms"]
                row[f"{what}_{mode}"] = {"vulkan_ms": mine, "versus_ms": theirs, "ratio": round(mine / theirs, 3)}
        # stream counts as strings: a child's figures come through JSON
        theirs = {str(b): v["median_ms"] for b, v in base.get("batched_decode_pos1000", {}).items()}
        row["batched_decode_pos1000_ratio"] = {str(b): round(v["median_ms"] / theirs[str(b)], 3)
                                               for b, v in vk.get("batched_decode_pos1000", {}).items()
                                               if str(b) in theirs}
        pairs[name] = row
    return pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="*", type=Path)
    ap.add_argument("--local", action="store_true", help="a rehearsal on the CPU with llvm artifacts, few steps")
    ap.add_argument("--isolated", action="store_true",
                    help="(internal) time the artifacts in this process: a vulkan artifact's own process")
    ap.add_argument("--copy-gbps", type=float, default=None, help="(with --isolated) the copy bandwidth measured")
    args = ap.parse_args(argv)
    if args.local:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    pack = common.setup()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    device = Device("cpu" if args.local else "cuda")
    report = common.Report(f"cuda_bench_{args.artifacts[0].name}" if args.isolated and args.artifacts
                           else "cuda_bench")
    report["device"] = device.name()
    report["secs"] = env("SECS", 60.0)
    copy_gbps = args.copy_gbps or device.copy_bandwidth()
    report["copy_GBps_read_plus_write"] = round(copy_gbps, 1)
    arts = args.artifacts or [*sorted((pack / "artifacts").glob("full_llvm*" if args.local else "full_cuda*")),
                              *sorted((pack / "artifacts").glob("full_vulkan*"))]
    failed = not arts
    if not arts:
        report["error"] = f"no artifacts in {pack / 'artifacts'}"
    from voxc import artifact

    own_process = [] if args.isolated else [a for a in arts if artifact.read_manifest(a)["device_kind"] == "webgpu"]
    for art in own_process:   # first: see the docstring
        failed |= not bench_in_own_process(report, art, copy_gbps, args.local)
    for art in (a for a in arts if a not in own_process):
        try:
            bench_artifact(report, art, device, copy_gbps)
        except Exception as exc:  # noqa: BLE001 - keep the other variants' numbers
            import traceback

            from voxc.errors import VoxcError

            if not isinstance(exc, VoxcError):   # voxc's own errors say it all in one line
                traceback.print_exc()
            report[f"{art.name}_error"] = " ".join(str(exc).split())[:500] or repr(exc)
            failed = True
        report.save()
        import gc
        gc.collect()
    if not args.isolated and any(a.name.startswith("full_vulkan") for a in arts):
        pairs = report["vulkan_vs_cuda"] = vulkan_vs_cuda(report.data)
        first = next((row for row in pairs.values() if "error" not in row), None)
        if first is not None:
            report["vulkan_decode_vs_cuda"] = first["decode_b1_pos100_default"]["ratio"]
            report["vulkan_stream_step_vs_cuda"] = first["stream_80ms_default"]["ratio"]
    report.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
