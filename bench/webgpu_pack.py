"""The web bundles bench/device/webgpu_bench.sh runs in Node.js on Dawn, built through voxc.build.build.

    python bench/webgpu_pack.py STAGE [--tiny f32,q4k] [--full q4k,f32] [--fast-link]

``--tiny``: checks, each a bundle WITH weights plus ``clip.f32`` and ``expect.json`` (the token ids
the llvm build of the same checkpoint gives for that clip): ``tiny`` (the tiny model: windows
750/8192, the 4B model's structure) and ``tiny_q4k`` (a small model whose widths are multiples of
256, built --quantization q4_k, so its projections and token table run the Q4_K kernels).
``--full``: the 4B model's bundles (ModelConfig()) WITHOUT weights (``build(..., weights=False)``;
voxc.js fills random weights on the GPU): ``full`` (float32, split token table) and ``full_q4k``.
``--fast-link``: link the wasm without binaryen (seconds instead of minutes); ``--small-windows``
(encoder 16, decoder 64 rows: a software GPU runs the tiny model's steps in a fraction of the time)
``--clip-seconds`` and ``--delay-ms`` (fewer decoder steps): a quick rehearsal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from references import q4k_config  # noqa: E402   the small Q4_K-sized config the browser tests use

CHUNK = 1280          # 80 ms feeds, as the demo page's microphone
DELAY_MS = 480


def test_clip(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def tiny_case(stage: Path, name: str, ckpt: Path, target, *, quantization: str | None = None,
              pcm: np.ndarray | None = None, delay_ms: int = DELAY_MS) -> Path:
    """``stage/name``: the bundle of ``ckpt`` with clip.f32 and expect.json (the llvm build's tokens)."""
    import voxc
    from voxc.build import build

    pcm = test_clip() if pcm is None else pcm
    bundle = build(ckpt, target, stage / name, progress=False, quantization=quantization, force=True)
    cpu = voxc.load(build(ckpt, "llvm", stage / f"{name}_llvm", progress=False, quantization=quantization,
                          force=True))
    (bundle / "clip.f32").write_bytes(pcm.astype("<f4").tobytes())
    session = cpu.stream(delay_ms)
    for i in range(0, len(pcm), CHUNK):
        session.feed(pcm[i:i + CHUNK])
    session.finish()
    (bundle / "expect.json").write_text(json.dumps({"clip": {"file": "clip.f32"}, "chunk": CHUNK,
                                                    "delay_ms": delay_ms, "tokens": session.tokens}))
    print(f"{name}: expect {len(session.tokens)} tokens", flush=True)
    return bundle


def full_bundle(stage: Path, name: str, target, *, quantization: str | None = None) -> Path:
    """The 4B model's bundle without weights (voxc.js fills random ones: ``--weights random``)."""
    from cuda_build import build_weightless
    from voxc.config import ModelConfig

    out = build_weightless(ModelConfig(), target, stage / name, quantization=quantization, force=True)
    print(f"{name}: written", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", type=Path)
    ap.add_argument("--tiny", default="f32,q4k", help="comma list of f32, q4k (or empty)")
    ap.add_argument("--full", default="", help="comma list of f32, q4k (or empty)")
    ap.add_argument("--fast-link", action="store_true", help="no binaryen pass over the wasm")
    ap.add_argument("--small-windows", action="store_true", help="tiny: encoder window 16, decoder window 64")
    ap.add_argument("--clip-seconds", type=float, default=3.0, help="tiny: the check's clip (default 3 s)")
    ap.add_argument("--delay-ms", type=int, default=DELAY_MS, help=f"tiny: the check's delay (default {DELAY_MS})")
    args = ap.parse_args(argv)
    from targets.webgpu import WebGPUTarget
    from voxc.loader.tiny import make_tiny

    target = WebGPUTarget(optimize_wasm=not args.fast_link)
    stage = args.stage
    stage.mkdir(parents=True, exist_ok=True)
    tiny = [t for t in args.tiny.split(",") if t]
    full = [f for f in args.full.split(",") if f]
    t0 = time.perf_counter()
    pcm = test_clip(args.clip_seconds)
    windows = {"encoder_window": 16, "decoder_window": 64} if args.small_windows else {}
    if "f32" in tiny:
        tiny_case(stage, "tiny", make_tiny(stage / "tiny_ckpt", force=True, **windows), target, pcm=pcm,
                  delay_ms=args.delay_ms)
    if "q4k" in tiny:
        # a token table split in row blocks, as the 4B model's must be (WebGPU's 128 MiB binding limit)
        tiny_case(stage, "tiny_q4k", make_tiny(stage / "tiny_q4k_ckpt", seed=5, config=q4k_config(), force=True),
                  dataclasses.replace(target, embedding_part_bytes=64 << 10), quantization="q4_k", pcm=pcm,
                  delay_ms=args.delay_ms)
    if "f32" in full:
        full_bundle(stage, "full", target)
    if "q4k" in full:
        full_bundle(stage, "full_q4k", target, quantization="q4_k")
    print(f"bundles built in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
