"""Float32 decode step and offline pass on the CPU with and without schedules/dense_matmul.py's
schedule, on a full-width model with fewer layers (so both fit in a small machine's memory), random
weights.

    python bench/cpu_dense.py [--decoder-layers 6] [--encoder-layers 4] [--out /tmp/voxc_cpu_dense]
    python bench/cpu_dense.py --local     # the tiny model, a few steps (a check that the bench runs)

Prints ms per one-token decode step (static ``decode_b1n1`` entry, position ~100), the weight bytes
per second, and the seconds of an offline pass over 10 s of audio, for TVM's default lowering of the
matmuls (:class:`TvmDefaultMatmuls`) and for voxc's schedule (targets/llvm.py as it is).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "device"))

from targets.base import TargetSpec  # noqa: E402
from targets.llvm import LlvmTarget, apply_cpu_attention  # noqa: E402
from targets.passes import fuse_transpose_matmul  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TvmDefaultMatmuls(LlvmTarget):
    """targets/llvm.py's target without schedules/dense_matmul.py: the float matmuls get TVM's default
    lowering (the transpose fusion and the CPU attention kernel stay)."""

    def compile(self, mod, report=None):
        return TargetSpec.compile(self, apply_cpu_attention(fuse_transpose_matmul(mod)), report)


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
    model.set_delay([0], [6])
    model.take_kv_pages([0], 100)
    for i in range(3):
        model.decode(token, [0], [100 + i])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        model.decode(token, [0], [110 + i])
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder-layers", type=int, default=6)
    ap.add_argument("--encoder-layers", type=int, default=4)
    ap.add_argument("--out", default="/tmp/voxc_cpu_dense")
    ap.add_argument("--local", action="store_true", help="the tiny model, 3 steps, 1 s of audio")
    args = ap.parse_args(argv)
    import voxc
    from cuda_build import build_weightless, ensure_weights
    from voxc import artifact
    from voxc.config import ModelConfig

    if args.local:
        cfg, steps, seconds = ModelConfig.tiny(), 3, 1.0
    else:
        cfg, steps, seconds = ModelConfig(), 8, 10.0
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, n_layers=args.decoder_layers),
                                  encoder=dataclasses.replace(cfg.encoder, n_layers=args.encoder_layers))
    out = Path(args.out)
    results = {}
    for variant, target in (("tvm_default", TvmDefaultMatmuls()), ("voxc_gemv", LlvmTarget())):
        art = build_weightless(cfg, target, out / variant, force=True)
        ensure_weights(art, out / "weights")
        manifest = artifact.read_manifest(art)
        weight_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in manifest["params"]
                           if p["name"].startswith(("dec.", "tok_embeddings.")))
        model = voxc.load(art, verify="size")
        ms = decode_ms(model, steps)
        results[variant] = {"decode_ms": round(ms, 3), "weights_GB": round(weight_bytes / 1e9, 4),
                            "GBps": round(weight_bytes / ms / 1e6, 1),
                            f"offline_{seconds:g}s_audio_s": round(offline_seconds(model, seconds), 3)}
        del model
        print(variant, json.dumps(results[variant]), flush=True)
    offline = f"offline_{seconds:g}s_audio_s"
    print("speedup: decode", round(results["tvm_default"]["decode_ms"] / results["voxc_gemv"]["decode_ms"], 2),
          "offline", round(results["tvm_default"][offline] / results["voxc_gemv"][offline], 2))
    if args.local:
        shutil.rmtree(out / "weights", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
