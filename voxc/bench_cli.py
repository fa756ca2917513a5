"""`voxc bench ...`: benchmarks, each reporting ratios against a baseline measured in the same run."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (memory of long streams, target speed)",
                       description="Benchmarks. Each prints its numbers against a baseline measured in the "
                                   "same run; recorded results live in bench/RESULTS.md.")
    kinds = p.add_subparsers(metavar="BENCHMARK")
    m = kinds.add_parser("memory", help="peak RSS of one stream fed N minutes of audio",
                         description="Feed one streaming session N minutes of audio in 80 ms chunks and print "
                                     "resident memory at 1, 10 and 60 minutes: it must stay flat.")
    m.add_argument("--model", "-m", type=Path, required=True, help="artifact directory")
    m.add_argument("--minutes", type=float, default=60.0)
    m.set_defaults(handler=_memory)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def _memory(args) -> int:
    from voxc.benchmarks.stream_memory import run

    run(args.model, minutes=args.minutes)
    return 0
