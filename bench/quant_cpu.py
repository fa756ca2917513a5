"""CPU (llvm) timings of the fused dequant+GEMV kernels at the decoder's shapes, against a
streaming-read bandwidth floor measured with numpy in the same run.

    python bench/quant_cpu.py [--qtypes q4_0,q8_0,q4_k] [--batch 1] [--json out.json] [--no-dlight]
    python bench/quant_cpu.py --local     # one small shape, few repetitions (a check that the bench runs)
    python bench/quant_cpu.py --shapes encoder --batch 4 --qtypes q4_k --no-dlight   # the encoder's step

For each [out, in] shape and type: milliseconds per call (the best of several, weights rotated
through copies that together exceed the L3 cache, so they stream from DRAM as in a real decode
step), the weight bytes per second, the floor (weight bytes / numpy's streaming read bandwidth)
and the ratio kernel / floor; also dlight's default CPU schedule of the same dequant+GEMV for
comparison, and (where the CPU has integer dot products, or with ``--int8 ISA``) the int8-activation
GEMV of schedules/int8_gemv.py (``int8_ms``, ``int8_x_floor``, ``int8_speedup``) in the same run.  Threads: as voxc's runtime sets them (the physical cores; TVM_NUM_THREADS to change).
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
          "dec.wq 4096x3072": (4096, 3072), "dec.wo 3072x4096": (3072, 4096), "dec.wk/wv 1024x3072": (1024, 3072)}
# the streaming encoder's (4 audio frames a step: --batch 4), stacked where the model stacks them
ENCODER_SHAPES = {"enc.wq/wk/wv 2048x1280": (2048, 1280), "enc.wqkv 6144x1280": (6144, 1280),
                  "enc.wo 1280x2048": (1280, 2048), "enc.w1/w3 5120x1280": (5120, 1280),
                  "enc.w13 10240x1280": (10240, 1280), "enc.w2 1280x5120": (1280, 5120)}
HEAD_SHAPE = {"lm head 131072x3072": (131072, 3072)}
LOCAL_SHAPES = {"small 64x512": (64, 512)}
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


def best_time(fn, copies: int, reps: int) -> float:
    fn(0)
    best = math.inf
    for r in range(reps):
        t0 = time.perf_counter()
        for c in range(copies):
            fn(c)
        best = min(best, (time.perf_counter() - t0) / copies)
    return best


def dlight_gemv(qtype, n, k, batch, target):
    """The plain decode-then-GEMV PrimFunc (schedules/dequant_matmul.py's unscheduled GEMM, dequantized
    weights [n, k], its row count fixed to ``batch``) scheduled by dlight's cpu.GEMV rule."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from schedules.dequant_matmul import ROW_INDEX_DTYPE, gemm_compute
    from voxc.quant.formats import QType

    func = gemm_compute(QType.parse(qtype), n, k, "float32", "llvm", transposed_panel=False)
    x = func.params[0]   # x [m, k]: m -> batch
    rows = tirx.IntImm(ROW_INDEX_DTYPE["llvm"], batch)
    func = func.specialize({x: tirx.decl_buffer((rows, x.shape[1]), "float32", "x", elem_offset=x.elem_offset)})
    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV())(mod)
    return mod


def run(qtypes=("q4_0", "q8_0", "q4_k"), batch: int = 1, dlight: bool = True, reps: int = 5, shapes=None,
        rotate_bytes: int = ROTATE_BYTES, stream_bytes: int = 512 << 20, int8: str | None = "auto") -> dict:
    import tvm
    from tvm.target import codegen

    from schedules import int8_gemv
    from schedules.dequant_matmul import make_kernel
    from voxc.quant.formats import QType, kernel_layout_shapes
    from voxc.runtime.tvm_runtime import default_cpu_threads

    default_cpu_threads()   # the thread count voxc's runtime gives TVM's pool, before the pool starts

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    if int8 == "auto":
        int8 = int8_gemv.int8_isa(codegen.llvm_get_cpu_features(target))
    dev = tvm.cpu()
    floor_gbps = stream_read_gbps(stream_bytes)
    results = {"cpu": codegen.llvm_get_system_cpu(), "int8_isa": int8, "stream_read_GBps": round(floor_gbps, 1), "batch": batch, "rows": []}
    print(f"numpy streaming read: {floor_gbps:.1f} GB/s ({results['cpu']})", flush=True)
    rng = np.random.default_rng(0)
    for label, (n, k) in (shapes or SHAPES).items():
        for qtype in qtypes:
            shapes = kernel_layout_shapes(qtype, n, k)
            wbytes = 4 * sum(math.prod(s) for s in shapes.values())
            copies = max(2, math.ceil(rotate_bytes / wbytes))
            halves = rng.uniform(1e-3, 1e-2, (n, 2 * shapes["scales"][1])).astype(np.float16).view(np.uint16)
            scales = (halves[:, 0::2].astype(np.uint32) | (halves[:, 1::2].astype(np.uint32) << 16))
            weights = [(tvm.runtime.tensor(rng.integers(0, 2**32, shapes["qweight"], dtype=np.uint32), dev),
                        tvm.runtime.tensor(scales, dev)) for _ in range(copies)]
            x = tvm.runtime.tensor(rng.standard_normal((batch, k)).astype(np.float32), dev)
            y = tvm.runtime.tensor(np.zeros((batch, n), np.float32), dev)
            func = make_kernel(qtype, n, k, batch)
            ours = tvm.compile(tvm.IRModule({"main": func}), target=target)[func.attrs["global_symbol"]]
            t_ours = best_time(lambda c: ours(x, *weights[c], y), copies, reps)
            row = {"label": label, "qtype": qtype, "weight_MB": round(wbytes / 1e6, 2), "ms": round(t_ours * 1e3, 3),
                   "weight_GBps": round(wbytes / t_ours / 1e9, 1), "floor_ms": round(wbytes / floor_gbps / 1e6, 3),
                   "x_floor": round(t_ours / (wbytes / floor_gbps / 1e9), 2)}
            if int8 and int8_gemv.available(QType.parse(qtype), k, int8):
                func8 = make_kernel(qtype, n, k, batch, int8=int8)
                ours8 = tvm.compile(tvm.IRModule({"main": func8}), target=target)[func8.attrs["global_symbol"]]
                t8 = best_time(lambda c: ours8(x, *weights[c], y), copies, reps)
                row.update(int8_ms=round(t8 * 1e3, 3), int8_weight_GBps=round(wbytes / t8 / 1e9, 1),
                           int8_x_floor=round(t8 / (wbytes / floor_gbps / 1e9), 2), int8_speedup=round(t_ours / t8, 2))
            if dlight:
                try:
                    mod = dlight_gemv(qtype, n, k, batch, target)
                except Exception as exc:  # noqa: BLE001 - dlight's GEMV rule does not take Q4_K's dequant
                    row["dlight_ms"] = None
                    row["dlight_error"] = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    theirs = tvm.compile(mod, target=target)["main"]
                    t_dl = best_time(lambda c: theirs(x, *weights[c], y), copies, max(2, reps // 2))
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
    ap.add_argument("--int8", default="auto", help="int8-activation GEMV ISA (vnni, avx2, dotprod, generic), "
                    "auto (this CPU's), or none")
    ap.add_argument("--shapes", choices=("decoder", "encoder", "all"), default="decoder",
                    help="the decoder's GEMV shapes, the streaming encoder's, or both")
    ap.add_argument("--head", action="store_true", help="also the tied LM head (131072x3072)")
    ap.add_argument("--local", action="store_true", help="one small shape, 2 repetitions, small buffers")
    args = ap.parse_args(argv)
    local = dict(reps=2, shapes=LOCAL_SHAPES, rotate_bytes=1 << 20, stream_bytes=16 << 20) if args.local else {}
    if not args.local:
        chosen = {"decoder": SHAPES, "encoder": ENCODER_SHAPES, "all": {**SHAPES, **ENCODER_SHAPES}}[args.shapes]
        local["shapes"] = {**chosen, **HEAD_SHAPE} if args.head else chosen
    res = run(tuple(args.qtypes.split(",")), args.batch, dlight=not args.no_dlight,
              int8=None if args.int8 == "none" else args.int8, **local)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
