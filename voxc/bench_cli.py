"""`voxc bench ...`: benchmarks, each reporting ratios against a baseline measured in the same run."""
from __future__ import annotations

import argparse
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
    for name, script, text in BENCH_SCRIPTS:
        b = kinds.add_parser(name, help=text, description=f"{text} (runs bench/{script}; its docstring and "
                                                           "bench/RESULTS.md say how, and what it needs)")
        b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
        b.set_defaults(handler=_script_runner(script))
    p.set_defaults(handler=lambda args: p.print_help() or 2)


# Benchmarks that live as scripts in bench/ (they need a GPU machine or extra packages).
BENCH_SCRIPTS = [
    ("cuda", "cuda_bench.py", "full-size model on a GPU: decode step vs bandwidth floor, RTF, streams per GPU"),
    ("quant-cpu", "quant_cpu.py", "quantized GEMV at the decoder's shapes vs a streaming-read floor, on the CPU"),
    ("quant-gpu", "quant_gpu.py", "quantized GEMV/GEMM kernels on a GPU vs its copy bandwidth"),
]


def _script_runner(script: str):
    def run(args) -> int:
        import runpy
        import sys

        from voxc.errors import VoxcError

        path = Path(__file__).resolve().parents[1] / "bench" / script
        if not path.exists():
            raise VoxcError(f"bench/{script} is not here: benchmarks run from a source checkout of voxc")
        sys.argv = [str(path), *args.args]
        runpy.run_path(str(path), run_name="__main__")
        return 0

    return run


def _memory(args) -> int:
    from voxc.benchmarks.stream_memory import run

    run(args.model, minutes=args.minutes)
    return 0
