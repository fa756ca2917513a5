"""CPU (llvm) timings of the fused dequant+GEMV kernels at the decoder's shapes, against a
streaming-read bandwidth floor measured with numpy in the same run.

    python bench/quant_cpu.py [--qtypes q4_0,q8_0,q4_k] [--batch 1] [--json out.json] [--no-dlight]

For each [out, in] shape and type: milliseconds per call (the best of several, weights rotated
through copies that together exceed the L3 cache, so they stream from DRAM as in a real decode
step), the weight bytes per second, the floor (weight bytes / numpy's streaming read bandwidth)
and the ratio kernel / floor; also dlight's default CPU schedule of the same dequant+GEMV for
comparison.  Threads: TVM's default pool (TVM_NUM_THREADS to change).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"dec.w2 3072x9216": (3072, 9216), "dec.w1/w3 9216x3072": (9216, 3072),
          "dec.wo 3072x4096": (3072, 4096), "dec.wk/wv 1024x3072": (1024, 3072)}
ROTATE_BYTES = 192 << 20      # > L3 of any desktop/server part we run on


def stream_read_gbps(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """numpy's read bandwidth over a buffer far larger than the caches (sum of uint64 words)."""
    a = np.ones(nbytes // 8, np.uint64)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _best_time(fn, copies: int, reps: int) -> float:
    fn(0)
    best = math.inf
    for r in range(reps):
        t0 = time.perf_counter()
        for c in range(copies):
            fn(c)
        best = min(best, (time.perf_counter() - t0) / copies)
    return best


def _dlight_gemv(qtype, n, k, batch, target):
    """The plain decode-then-GEMV PrimFunc scheduled by dlight's cpu.GEMV rule."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from schedules.dequant_matmul import _Decoder
    from voxc.quant.formats import kernel_layout_shapes
    shapes = kernel_layout_shapes(qtype, n, k)
    x = te.placeholder((batch, k), "float32", name="x")
    qweight = te.placeholder(shapes["qweight"], "uint32", name="qweight")
    scales = te.placeholder(shapes["scales"], "uint32", name="scales")
    dec = _Decoder(qtype, qweight, scales, "llvm")
    w = te.compute((n, k), lambda i, j: dec.value(i, j), name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((batch, n), lambda b, i: te.sum(x[b, r] * w[i, r], axis=r), name="y")
    mod = tvm.IRModule({"main": te.create_prim_func([x, qweight, scales, y])})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV())(mod)
    return mod


def run(qtypes=("q4_0", "q8_0", "q4_k"), batch: int = 1, dlight: bool = True, reps: int = 5) -> dict:
    import tvm
    from tvm.target import codegen

    from schedules.dequant_matmul import make_kernel
    from voxc.quant.formats import kernel_layout_shapes

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    dev = tvm.cpu()
    floor_gbps = stream_read_gbps()
    results = {"cpu": codegen.llvm_get_system_cpu(), "stream_read_GBps": round(floor_gbps, 1), "batch": batch, "rows": []}
    print(f"numpy streaming read: {floor_gbps:.1f} GB/s ({results['cpu']})", flush=True)
    rng = np.random.default_rng(0)
    for label, (n, k) in SHAPES.items():
        for qtype in qtypes:
            shapes = kernel_layout_shapes(qtype, n, k)
            wbytes = 4 * sum(math.prod(s) for s in shapes.values())
            copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
            halves = rng.uniform(1e-3, 1e-2, (n, 2 * shapes["scales"][1])).astype(np.float16).view(np.uint16)
            scales = (halves[:, 0::2].astype(np.uint32) | (halves[:, 1::2].astype(np.uint32) << 16))
            weights = [(tvm.runtime.tensor(rng.integers(0, 2**32, shapes["qweight"], dtype=np.uint32), dev),
                        tvm.runtime.tensor(scales, dev)) for _ in range(copies)]
            x = tvm.runtime.tensor(rng.standard_normal((batch, k)).astype(np.float32), dev)
            y = tvm.runtime.tensor(np.zeros((batch, n), np.float32), dev)
            func = make_kernel(qtype, n, k, batch)
            ours = tvm.compile(tvm.IRModule({"main": func}), target=target)[func.attrs["global_symbol"]]
            t_ours = _best_time(lambda c: ours(x, *weights[c], y), copies, reps)
            row = {"label": label, "qtype": qtype, "weight_MB": round(wbytes / 1e6, 2), "ms": round(t_ours * 1e3, 3),
                   "weight_GBps": round(wbytes / t_ours / 1e9, 1), "floor_ms": round(wbytes / floor_gbps / 1e6, 3),
                   "x_floor": round(t_ours / (wbytes / floor_gbps / 1e9), 2)}
            if dlight:
                mod = _dlight_gemv(qtype, n, k, batch, target)
                theirs = tvm.compile(mod, target=target)["main"]
                t_dl = _best_time(lambda c: theirs(x, *weights[c], y), copies, max(2, reps // 2))
                row["dlight_ms"] = round(t_dl * 1e3, 3)
                row["speedup_vs_dlight"] = round(t_dl / t_ours, 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qtypes", default="q4_0,q8_0,q4_k")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--no-dlight", action="store_true")
    args = ap.parse_args(argv)
    res = run(tuple(args.qtypes.split(",")), args.batch, dlight=not args.no_dlight)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
