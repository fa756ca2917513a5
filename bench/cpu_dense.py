"""Float32 decode step and offline pass on the CPU with and without schedules/dense_matmul.py's
schedule, on a full-width model with fewer layers (so both fit in a small machine's memory), random
weights.

    python bench/cpu_dense.py [--decoder-layers 6] [--encoder-layers 4] [--out /tmp/voxc_cpu_dense]

Prints ms per one-token decode step (static ``decode_b1n1`` entry, position ~100), the weight bytes
per second, and the seconds of an offline pass over 10 s of audio, for TVM's default lowering of the
matmuls and for voxc's schedule.
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
sys.path.insert(0, str(HERE / "device"))


def offline_seconds(model, seconds: float = 10.0) -> float:
    """Wall time of one offline pass over ``seconds`` of noise (encoder chunks of up to 128 rows)."""
    from common import BenchTokenizer

    model.tokenizer = BenchTokenizer()
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))).astype(np.float32)
    session = model.stream()
    t = time.perf_counter()
    session.feed(audio)
    session.finish()
    return time.perf_counter() - t


def decode_ms(model, steps: int = 8) -> float:
    token = np.ones((1, 1), np.int32)
    for i in range(3):
        model.decode(token, [6], [0], [100 + i])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        model.decode(token, [6], [0], [110 + i])
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder-layers", type=int, default=6)
    ap.add_argument("--encoder-layers", type=int, default=4)
    ap.add_argument("--out", default="/tmp/voxc_cpu_dense")
    args = ap.parse_args(argv)
    import targets.llvm as llvm
    from cuda_build import build_manifest_only, ensure_weights
    from voxc.config import ModelConfig

    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, n_layers=args.decoder_layers),
                              encoder=dataclasses.replace(cfg.encoder, n_layers=args.encoder_layers))
    out = Path(args.out)
    scheduled = llvm.schedule_dense_matmuls
    results = {}
    for variant in ("tvm_default", "voxc_gemv"):
        llvm.schedule_dense_matmuls = scheduled if variant == "voxc_gemv" else (lambda mod: mod)
        art = build_manifest_only(cfg, llvm.LlvmTarget(), out / variant)
        ensure_weights(art, out / "weights")
        manifest = json.loads((art / "voxc-artifact.json").read_text())
        weight_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in manifest["params"]
                           if p["name"].startswith(("dec.", "tok_embeddings.")))
        from voxc.runtime.model import CompiledModel

        model = CompiledModel.load(art)
        ms = decode_ms(model)
        results[variant] = {"decode_ms": round(ms, 1), "weights_GB": round(weight_bytes / 1e9, 2),
                            "GBps": round(weight_bytes / ms / 1e6, 1),
                            "offline_10s_audio_s": round(offline_seconds(model), 2)}
        del model
        print(variant, json.dumps(results[variant]), flush=True)
    llvm.schedule_dense_matmuls = scheduled
    print("speedup: decode", round(results["tvm_default"]["decode_ms"] / results["voxc_gemv"]["decode_ms"], 2),
          "offline", round(results["tvm_default"]["offline_10s_audio_s"] / results["voxc_gemv"]["offline_10s_audio_s"], 2))


if __name__ == "__main__":
    main()
