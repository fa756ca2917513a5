"""Step time and real-time margin against concurrent streams, from bench/cuda_bench.py and
bench/cuda_hf_baseline.py JSON (bench/results/), as a PNG for bench/RESULTS.md.

    python bench/plot_streams.py OUT.png VOXC_JSON[:LABEL] ... [--hf HF_JSON[:LABEL]]

voxc: every ``realtime_<n>_streams`` entry of each artifact in a cuda_bench JSON (each stream fed
80 ms per batched step; the median and the p99 step of the last 10 s, the p90 in runs that did not
record the p99; a count that failed, e.g. out of memory, is left out); the points of files given the
same label form one line (counts measured in separate calls); transformers: the ms per
generated token of each ``batch<n>`` (one token per stream per 80 ms of audio, so the same 80 ms
line applies).  Needs matplotlib (a plotting tool only: ``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REALTIME_MS = 80.0


def voxc_points(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    """artifact name -> [(streams, median ms, p99 ms (p90 where no p99 was recorded))] from a
    cuda_bench JSON; counts that failed are left out."""
    data = json.loads(path.read_text())
    out = {}
    for name, res in data.items():
        if not isinstance(res, dict):
            continue
        points = sorted((v["streams"], v["last_10s"]["median_ms"], v["last_10s"].get("p99_ms", v["last_10s"]["p90_ms"]))
                        for k, v in res.items()
                        if k.startswith("realtime_") and k.endswith("_streams") and "last_10s" in v)
        if points:
            out[name] = points
    return out


def hf_points(path: Path) -> list[tuple[int, float]]:
    """[(batch, ms per step)] from a cuda_hf_baseline JSON (eager generate)."""
    data = json.loads(path.read_text())
    return sorted((int(k[len("batch"):]), v["ms_per_step"]) for k, v in data.items()
                  if k.startswith("batch") and isinstance(v, dict))


def _split(spec: str) -> tuple[Path, str | None]:
    path, _, label = spec.partition(":")
    return Path(path), label or None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("voxc", nargs="+", help="cuda_bench JSON[:label]")
    ap.add_argument("--hf", action="append", default=[], help="cuda_hf_baseline JSON[:label]")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_streams.py needs matplotlib: pip install matplotlib")

    fig, (ax_step, ax_margin) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, dict[int, tuple[int, float, float]]] = {}    # label -> streams -> point
    for spec in args.voxc:
        path, label = _split(spec)
        for name, points in voxc_points(path).items():
            lines.setdefault(label or name, {}).update({p[0]: p for p in points})
    for tag, by_count in lines.items():
        points = [by_count[n] for n in sorted(by_count)]
        streams = [p[0] for p in points]
        ax_step.plot(streams, [p[1] for p in points], "o-", label=f"voxc {tag} (median)")
        ax_step.fill_between(streams, [p[1] for p in points], [p[2] for p in points], alpha=0.2)
        ax_margin.plot(streams, [REALTIME_MS / p[2] for p in points], "o-", label=f"voxc {tag} (p99 step)")
    for spec in args.hf:
        path, label = _split(spec)
        points = hf_points(path)
        tag = label or "transformers"
        ax_step.plot([p[0] for p in points], [p[1] for p in points], "s--", label=tag)
        ax_margin.plot([p[0] for p in points], [REALTIME_MS / p[1] for p in points], "s--", label=tag)
    ax_step.axhline(REALTIME_MS, color="grey", lw=1, ls=":", label="80 ms: real time")
    ax_step.set(xlabel="concurrent streams (batch)", ylabel="ms per 80 ms step", yscale="log",
                title="Step time against concurrent streams")
    ax_margin.axhline(1.0, color="grey", lw=1, ls=":")
    ax_margin.set(xlabel="concurrent streams (batch)", ylabel="80 ms / step (above 1: real time)", yscale="log",
                  title="Real-time margin")
    for ax in (ax_step, ax_margin):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
