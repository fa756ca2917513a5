"""Load test for `voxc serve`: N websocket clients stream audio for S seconds each.

    python bench/server_load.py --url http://127.0.0.1:8000 --clients 8 --seconds 30 [--pace fast]
    python bench/server_load.py --local [--artifact DIR] --clients 4 --seconds 3

Each client speaks vLLM's realtime protocol (or OpenAI's with ``--protocol openai``): it sends
``--chunk-ms`` pieces of a distinct tone-plus-noise clip, paced at real time (``--pace realtime``,
like a microphone) or as fast as the server takes them (``--pace fast``), then ends the stream and
waits for the final event.  Reported:

* ``sessions_held``: clients the server admitted (the rest were refused as full);
* latency from audio in to text out: for every text delta, the time from sending the chunk that
  completes the audio the delta's ``end`` timestamp points at to receiving the delta.  It includes
  the model's transcription delay (480 ms by default) and the server's batching tick; with
  ``--pace fast`` it is dominated by the queue;
* ``lost``: clients whose deltas do not add up to the final text, or whose final event reports a
  different audio duration than they sent (nothing may be dropped or duplicated);
* the server's own metrics (step latency percentiles, tokens/s, KV-cache bytes) at the end, and the
  GPU's memory in use sampled every second (nvidia-smi, where there is one).

``--local`` starts a server on a CPU artifact itself (``--artifact``, or a tiny random model built
into a temporary directory, which takes about 15 s) for the run and stops it afterwards; CI runs it
through tests/test_server.py.  Exit status 1 when anything was lost or failed.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATE = 16000


def clip(seconds: float, index: int) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(index).standard_normal(t.shape)
    return (0.3 * np.sin(2 * np.pi * (220.0 + 60.0 * index) * t) + 0.05 * noise).astype(np.float32)


def pcm16_b64(pcm: np.ndarray) -> str:
    return base64.b64encode((np.clip(pcm, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()).decode()


async def client(url: str, index: int, args) -> dict:
    import aiohttp

    pcm = clip(args.seconds, index)
    chunk = RATE * args.chunk_ms // 1000
    openai = args.protocol == "openai"
    result = {"admitted": False, "latencies": [], "deltas": 0, "error": None, "lost": False, "tokens": 0}
    sent_at: list[tuple[int, float]] = []          # (samples sent so far, wall time)
    text: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.ws_connect(url.rstrip("/") + "/v1/realtime" + ("?intent=transcription" if openai else ""),
                                   max_msg_size=0) as ws:
            first = json.loads((await ws.receive(timeout=30)).data)
            if first["type"] == "error":
                result["error"] = first.get("code") or "error"
                return result
            result["admitted"] = True
            if openai:
                await ws.send_json({"type": "session.update", "session": {
                    "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}}})
            else:
                await ws.send_json({"type": "input_audio_buffer.commit"})

            def latency(end_s: float, now: float) -> float | None:
                need = int(round(end_s * RATE))
                for samples, t in sent_at:
                    if samples >= need:
                        return now - t
                return None

            done_event = None

            async def receive():
                nonlocal done_event
                async for msg in ws:
                    ev = json.loads(msg.data)
                    now = time.perf_counter()
                    kind = ev["type"]
                    if kind.endswith("transcription.delta"):
                        result["deltas"] += 1
                        text.append(ev["delta"])
                        lat = latency(ev["end"], now)
                        if lat is not None:
                            result["latencies"].append(lat)
                    elif kind in ("transcription.done", "conversation.item.input_audio_transcription.completed"):
                        done_event = ev
                        return
                    elif kind == "error":
                        result["error"] = ev.get("code") or ev["error"].get("code")
                        return

            receiver = asyncio.create_task(receive())
            start = time.perf_counter()
            for i in range(0, len(pcm), chunk):
                if args.pace == "realtime":
                    await asyncio.sleep(max(0.0, start + i / RATE - time.perf_counter()))
                await ws.send_json({"type": "input_audio_buffer.append", "audio": pcm16_b64(pcm[i:i + chunk])})
                sent_at.append((min(i + chunk, len(pcm)), time.perf_counter()))
            await ws.send_json({"type": "input_audio_buffer.commit"} if openai
                               else {"type": "input_audio_buffer.commit", "final": True})
            await asyncio.wait_for(receiver, timeout=args.seconds * 20 + 60)
            if done_event is not None:
                final = done_event.get("text", done_event.get("transcript"))
                result["lost"] = final != "".join(text) or abs(done_event["duration"] - len(pcm) / RATE) > 1e-3
                usage = done_event["usage"]
                result["tokens"] = usage.get("completion_tokens", usage.get("output_tokens", 0))
            elif result["error"] is None:
                result["error"] = "no final event"
    return result


def gpu_memory_used_mib() -> int | None:
    """Device memory in use on GPU 0 (nvidia-smi), or None without an NVIDIA GPU."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


async def sample_gpu_memory(samples: list, every_s: float = 1.0) -> None:
    """Append (seconds since start, MiB used) until cancelled: where a server's memory goes as its
    sessions grow (the 64-session run ran out of memory in a KV growth)."""
    started = time.perf_counter()
    while True:
        used = await asyncio.to_thread(gpu_memory_used_mib)
        if used is None:
            return
        samples.append((round(time.perf_counter() - started, 1), used))
        await asyncio.sleep(every_s)


async def run_clients(url: str, args) -> dict:
    import aiohttp

    memory: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_gpu_memory(memory))
    started = time.perf_counter()
    results = await asyncio.gather(*[client(url, i, args) for i in range(args.clients)], return_exceptions=True)
    wall = time.perf_counter() - started
    sampler.cancel()
    errors = [r if isinstance(r, dict) else {"error": f"{type(r).__name__}: {r}", "admitted": False}
              for r in results]
    async with aiohttp.ClientSession() as http:
        async with http.get(url.rstrip("/") + "/metrics?format=json") as r:
            server = await r.json()
    admitted = [r for r in errors if r.get("admitted")]
    latencies = np.array([x for r in admitted for x in r["latencies"]], np.float64)
    refused = sum(1 for r in errors if r.get("error") == "server_full")
    failed = sum(1 for r in errors if r.get("error") and r.get("error") != "server_full")
    lost = sum(1 for r in admitted if r.get("lost"))
    pct = (lambda q: round(float(np.percentile(latencies, q)), 4)) if latencies.size else (lambda q: None)
    return {
        "clients": args.clients, "seconds": args.seconds, "pace": args.pace, "protocol": args.protocol,
        "sessions_held": len(admitted), "refused": refused, "errors": failed, "lost": lost,
        "deltas": sum(r["deltas"] for r in admitted), "tokens": sum(r["tokens"] for r in admitted),
        "latency_s": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
        "wall_s": round(wall, 3), "audio_s_per_wall_s": round(len(admitted) * args.seconds / wall, 3),
        "server": {k: server[k] for k in ("step_seconds", "step_batch_mean", "tokens_per_second", "tokens_total",
                                          "steps_total", "max_sessions", "kv_bytes_in_use", "kv_bytes_allocated")},
        "gpu_memory_used_mib": ({"first": memory[0][1], "peak": max(used for _, used in memory), "samples": memory}
                                if memory else None),
        "ok": failed == 0 and lost == 0 and len(admitted) > 0,
    }


def _local_artifact(tmp: Path) -> Path:
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    print("building a tiny random model for --local ...", file=sys.stderr)
    return build(make_tiny(tmp / "ckpt"), "llvm", tmp / "tiny-llvm", progress=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running `voxc serve`")
    p.add_argument("--local", action="store_true", help="start a server on --artifact (or a tiny model) for the run")
    p.add_argument("--artifact", type=Path, default=None, help="CPU artifact for --local")
    p.add_argument("--max-sessions", type=int, default=None, help="--local server's sessions (default: --clients)")
    p.add_argument("--verify", choices=["auto", "full", "size"], default="auto",
                   help="--local: how the artifact's files are checked (size: random weights written beside it)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="audio each client streams")
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--pace", choices=["realtime", "fast"], default="realtime")
    p.add_argument("--protocol", choices=["vllm", "openai"], default="vllm")
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    args = p.parse_args(argv)

    if args.local:
        import voxc
        from voxc.server.app import ServerConfig, ServerThread

        with tempfile.TemporaryDirectory(prefix="voxc-load-") as tmp:
            artifact = args.artifact or _local_artifact(Path(tmp))
            sessions = args.max_sessions or args.clients
            config = ServerConfig(max_sessions=sessions)
            model = voxc.load(artifact, max_streams=sessions, verify=args.verify, kv_seconds=config.kv_seconds)
            with ServerThread(model, config) as server:
                report = asyncio.run(run_clients(server.url, args))
    else:
        report = asyncio.run(run_clients(args.url, args))
    if args.json:
        print(json.dumps(report))
    else:
        lat = report["latency_s"]
        print(f"{report['sessions_held']}/{report['clients']} sessions held ({report['refused']} refused, "
              f"{report['errors']} failed), {report['lost']} lost; {report['deltas']} deltas, {report['tokens']} tokens "
              f"in {report['wall_s']} s; audio-in to text-out latency p50 {lat['p50']} s, p99 {lat['p99']} s; "
              f"server step p50 {report['server']['step_seconds']['p50']:.4f} s, "
              f"p99 {report['server']['step_seconds']['p99']:.4f} s")
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
