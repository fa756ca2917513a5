"""Memory of a long stream: feed hours of audio and record peak RSS as the stream goes on.

    python bench/stream_memory.py ARTIFACT [--minutes 60]

The caches are rings in pages (a stream takes pages as it reaches new positions, up to its whole
window) and consumed audio embeddings are dropped, so resident memory must stay flat once the
decoder window is full; this measures it, and the KV-cache bytes the stream holds at each mark.
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run(artifact, minutes: float = 60.0, checkpoints=(1, 10, 60), chunk_ms: int = 80, seed: int = 0, out=sys.stdout):
    import voxc

    model = voxc.load(artifact)
    rate = model.config.audio.sampling_rate
    chunk = rate * chunk_ms // 1000
    rng = np.random.default_rng(seed)
    # A minute of varied audio, reused: tones with noise, so the model emits non-trivial tokens.
    t = np.arange(60 * rate) / rate
    minute = (0.2 * np.sin(2 * np.pi * (220 + 80 * np.sin(2 * np.pi * 0.1 * t)) * t)
              + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    session = model.stream()
    fed, marks, started = 0, sorted(m for m in checkpoints if m <= minutes), time.perf_counter()
    rows = []
    total = int(minutes * 60 * rate)
    while fed < total:
        offset = fed % len(minute)
        piece = minute[offset:offset + min(chunk, total - fed)]
        session.feed(piece)
        fed += len(piece)
        while marks and fed >= marks[0] * 60 * rate:
            row = (marks.pop(0), current_rss_mb(), peak_rss_mb(), time.perf_counter() - started, session.token_count,
                   model.kv_bytes_in_use / 2**20)
            rows.append(row)
            print(f"{row[0]:5.0f} min of audio: RSS {row[1]:8.1f} MB, peak {row[2]:8.1f} MB, "
                  f"wall {row[3]:7.1f} s, {row[4]} tokens, KV pages held {row[5]:.1f} MiB", file=out, flush=True)
    session.finish()
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()
    run(args.artifact, minutes=args.minutes)
