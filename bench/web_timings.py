"""How long the web target's build steps take on the tiny model: the WGSL compile, the fast wasm link
(runtime objects, no binaryen), the optimized link (binaryen -O2) and a whole bundle build
(``voxc build --target webgpu``).  Prints the seconds as JSON; asserts nothing (the numbers depend on
the machine and its load).

    python bench/web_timings.py [--out DIR] [--optimized] [--json FILE]

Needs emcc (and npm, once, for tvmjs).  TVM's web runtime is built once into the cache first
(minutes on a fresh machine; reported as ``web_runtime_s``, not part of the other numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, round(time.perf_counter() - t, 2)


def measure(out: Path, *, optimized: bool = False) -> dict:
    from targets.web_toolchain import build_tvmjs, ensure_web_runtime, export_wasm
    from targets.webgpu import WebGPUTarget
    from voxc.build import build
    from voxc.config import ModelConfig
    from voxc.loader.tiny import make_tiny
    from voxc.model.export import export_graph

    times = {"cpus": os.cpu_count()}
    _, times["web_runtime_s"] = timed(ensure_web_runtime, progress=False)   # cached after the first time
    _, times["tvmjs_s"] = timed(build_tvmjs, progress=False)
    target = WebGPUTarget(optimize_wasm=False)
    (mod, _), times["export_graph_s"] = timed(export_graph, ModelConfig.tiny(), target.graph_options())
    executable, times["compile_s"] = timed(target.compile, mod)
    wasm, times["link_fast_s"] = timed(export_wasm, executable, out / "link" / "fast.wasm", optimize=False,
                                       progress=False)
    times["wasm_fast_MB"] = round(wasm.stat().st_size / 1e6, 2)
    if optimized:
        wasm, times["link_optimized_s"] = timed(export_wasm, executable, out / "link" / "optimized.wasm",
                                                optimize=True, progress=False)
        times["wasm_optimized_MB"] = round(wasm.stat().st_size / 1e6, 2)
    ckpt = make_tiny(out / "tiny_ckpt", force=True)
    _, times["bundle_build_fast_link_s"] = timed(build, ckpt, target, out / "bundle", progress=False, force=True)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary directory)")
    ap.add_argument("--optimized", action="store_true", help="also time the binaryen -O2 link")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="voxc-web-timings-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        times = measure(out, optimized=args.optimized)
    print(json.dumps(times, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(times, indent=1))
    return times


if __name__ == "__main__":
    main()
