"""GPU timings of the fused dequant+matmul CUDA kernels, in two steps so the GPU machine needs no TVM.

1. ``build`` (needs TVM + nvcc; runs anywhere, no GPU): schedules every kernel for the given
   arch, compiles the CUDA source TVM emits to one cubin with nvcc, and writes ``kernels.cubin``
   and ``manifest.json`` (per kernel: name, qtype, shape, batch, parameter order, launch dims).

       python bench/quant_gpu.py build --out bench_out --arch sm_90

2. ``run`` (needs a CUDA GPU, numpy and CuPy; imports nothing from TVM): loads the cubin, fills
   the kernel layout with real quantized random weights (``voxc.quant.formats``, pure numpy),
   checks every kernel against float64 ``x @ dequant(W).T``, and times it with CUDA events,
   rotating through enough weight copies to exceed L2 so the weights stream from HBM (the
   launches are replayed from a CUDA graph so Python's launch cost is not timed).  Reports
   microseconds per call, weight GB/s, and ``of_hbm``: that rate over the memory bandwidth of a
   device-to-device copy measured in the same run (read + write bytes / time).

       python bench/quant_gpu.py run --dir bench_out [--json results.json]

``python bench/quant_gpu.py all --out DIR`` does both (a machine with TVM, nvcc and a GPU).
``python bench/quant_gpu.py local --out DIR`` (nvcc, no GPU): ``build`` at one small shape per type,
then what ``run`` does before it launches anything (launch dims, kernel parameters, the random
packed weights and their dequantized reference), so a broken bench fails before the GPU run.
From another program: ``build(out_dir, arch, shapes=...)`` and ``run(out_dir) -> dict``.
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

# [out, in] weight shapes: the decoder's (w2, w1/w3, wo, wq, wk/wv), the encoder's, the LM head.
SHAPES = {
    "dec.w2 3072x9216": (3072, 9216), "dec.w1/w3 9216x3072": (9216, 3072), "dec.wo 3072x4096": (3072, 4096),
    "dec.wq 4096x3072": (4096, 3072), "dec.wk/wv 1024x3072": (1024, 3072),
    "enc.w1/w3 5120x1280": (5120, 1280), "enc.w2 1280x5120": (1280, 5120), "lm_head 131072x3072": (131072, 3072),
}
LOCAL_SHAPES = {"small 64x512": (64, 512)}
GEMV_BATCHES = (1, 4, 16)
GEMM_ROWS = (64, 512)
QTYPES = ("q4_0", "q8_0", "q4_k")


def build(out_dir: str | Path, arch: str = "sm_90", shapes: dict | None = None, qtypes=QTYPES,
          batches=GEMV_BATCHES, dtype: str = "float32", kinds=("gemv", "gemm")) -> Path:
    import tvm
    from tvm.support import nvcc

    from schedules.dequant_matmul import kernel_signature, make_kernel, thread_extents
    from voxc.quant.formats import kernel_layout_shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, manifest = {}, []
    for label, (n, k) in (shapes or SHAPES).items():
        for qtype in qtypes:
            for batch in (*(batches if "gemv" in kinds else ()), *((None,) if "gemm" in kinds else ())):
                if batch is None and label.startswith("lm_head"):
                    continue
                func = make_kernel(qtype, n, k, batch, dtype=dtype, target="cuda", dispatch_rows=False)
                name = func.attrs["global_symbol"]
                funcs[name] = func
                manifest.append({"name": name, "label": label, "qtype": qtype, "n": n, "k": k, "batch": batch,
                                 "dtype": dtype, "layout": {key: list(v) for key, v in kernel_layout_shapes(qtype, n, k).items()},
                                 "launch": thread_extents(func, 1) if batch is None else thread_extents(func)})
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    t0 = time.time()
    source = tvm.compile(tvm.IRModule(funcs), target=target).mod.imports[0].inspect_source("")
    with target:
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    for entry in manifest:
        entry["kernel"] = entry["name"] + "_kernel"
        entry["params"] = kernel_signature(source, entry["kernel"])
        if entry["batch"] is None:      # GEMM: grid.y scales with m; record the tile height
            entry["rows_per_block_y"] = 64
    (out / "kernels.cu").write_text(source)
    (out / "kernels.cubin").write_bytes(bytes(cubin))
    (out / "manifest.json").write_text(json.dumps({"arch": arch, "kernels": manifest}, indent=1))
    print(f"built {len(funcs)} kernels for {arch} in {time.time() - t0:.1f} s -> {out}")
    return out


def _launch_dims(entry, rows):
    launch = dict(entry["launch"])
    if entry["batch"] is None:
        launch["blockIdx.y"] = math.ceil(rows / entry["rows_per_block_y"])
    grid = tuple(launch.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(launch.get(f"threadIdx.{a}", 1) for a in "xyz")
    return grid, block


def _random_packed(qtype: str, n: int, k: int, rng) -> dict[str, np.ndarray]:
    """Valid kernel-layout weights without quantizing (Q4_K of the LM head would take minutes in
    numpy): random levels, f16 scales in a realistic range, random 6-bit Q4_K sub-scales."""
    from voxc.quant.formats import kernel_layout_shapes
    shapes = kernel_layout_shapes(qtype, n, k)
    qweight = rng.integers(0, 2**32, shapes["qweight"], dtype=np.uint32)
    rows, words = shapes["scales"]
    halves = rng.uniform(2e-4, 2e-3, (rows, 2 * words)).astype(np.float16).view(np.uint16).astype(np.uint32)
    scales = halves[:, 0::2] | (halves[:, 1::2] << 16)
    if qtype == "q4_k":     # header words 1..3 of each super-block: packed 6-bit scales and mins
        packed_scales = rng.integers(0, 2**32, (rows, words), dtype=np.uint32)
        scales = np.where((np.arange(words) % 4 == 0)[None, :], scales, packed_scales)
    return {"qweight": qweight, "scales": scales.astype(np.uint32)}


KERNEL_ARGS = ("acc", "y_cast", "x", "qweight", "scales", "m")   # what run() passes, by parameter name


def local_check(out_dir: str | Path, gemm_rows=GEMM_ROWS) -> dict:
    """Everything of :func:`run` but the GPU: per kernel, the launch dims for each row count, its
    parameters (all of them ones run() passes), and finite dequantized random weights."""
    from voxc.quant.formats import dequantize_kernel_layout

    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    checked = []
    for entry in manifest["kernels"]:
        unknown = [p for p in entry["params"] if p.removesuffix("_ptr") not in KERNEL_ARGS]
        if unknown:
            raise SystemExit(f"{entry['kernel']}: parameters {unknown} that run() does not pass")
        for rows in ((entry["batch"],) if entry["batch"] else gemm_rows):
            grid, block = _launch_dims(entry, rows)
            if min(grid + block) < 1:
                raise SystemExit(f"{entry['kernel']}: launch dims {grid} x {block} for {rows} rows")
        w = dequantize_kernel_layout(_random_packed(entry["qtype"], entry["n"], entry["k"], rng), entry["qtype"],
                                     (entry["n"], entry["k"]))
        if not np.isfinite(w).all():
            raise SystemExit(f"{entry['kernel']}: random weights dequantize to inf/NaN")
        checked.append(entry["kernel"])
    print(f"checked {len(checked)} kernels: {', '.join(checked)}", flush=True)
    return {"kernels": checked}


def run(out_dir: str | Path, gemm_rows=GEMM_ROWS, l2_bytes: int = 64 << 20, reps: int = 50) -> dict:
    import cupy as cp

    from voxc.quant.formats import dequantize_kernel_layout

    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    module = cp.RawModule(path=str(out / "kernels.cubin"))
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    stream = cp.cuda.Stream(non_blocking=True)

    def timed(fn, n=reps):
        """GPU time per call.  The n launches are captured in a CUDA graph first: launching from
        Python costs ~10 us a call, longer than a small GEMV, and would be timed instead."""
        with stream:
            fn(0)
            stream.synchronize()
            stream.begin_capture()
            for i in range(n):
                fn(i)
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / n * 1e-3

    src = cp.empty(1 << 28, cp.uint8)
    dst = cp.empty_like(src)
    copy_s = timed(lambda i=0: cp.copyto(dst, src), 20)
    hbm_gbps = 2 * src.nbytes / copy_s / 1e9        # a copy reads and writes every byte
    results = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
               "copy_GBps_read_plus_write": round(hbm_gbps, 1), "kernels": []}
    rng = np.random.default_rng(0)
    weights_cache = {}
    fp16_us = {}

    def fp16_baseline(n, k, rows):
        """cuBLAS half GEMV/GEMM (cupy.matmul) at the same shape: the dense f16 model's cost."""
        if (n, k, rows) not in fp16_us:
            copies = max(1, math.ceil(2 * l2_bytes / (n * k * 2)))
            ws = [cp.asarray(rng.standard_normal((n, k), dtype=np.float32).astype(np.float16) * 0.02)
                  for _ in range(copies)]
            xh = cp.asarray(rng.standard_normal((rows, k), dtype=np.float32).astype(np.float16))
            yh = cp.empty((rows, n), cp.float16)
            gemv = lambda i=0: cp.matmul(xh, ws[i % copies].T, out=yh)  # noqa: E731
            try:
                fp16_us[(n, k, rows)] = timed(gemv) * 1e6
            except Exception as e:   # cuBLAS refused stream capture: events over back-to-back calls
                print(f"fp16 baseline without a CUDA graph ({type(e).__name__}: {e})", flush=True)
                with stream:
                    for i in range(5):
                        gemv(i)
                    start.record(stream)
                    for i in range(reps):
                        gemv(i)
                    stop.record(stream)
                    stop.synchronize()
                fp16_us[(n, k, rows)] = cp.cuda.get_elapsed_time(start, stop) / reps * 1e3
            del ws
        return fp16_us[(n, k, rows)]

    stream.use()            # uploads, zero fills, kernels and references all on one stream
    for entry in manifest["kernels"]:
        n, k, qtype = entry["n"], entry["k"], entry["qtype"]
        key = (qtype, n, k)
        if key not in weights_cache:
            weights_cache.clear()
            packed = _random_packed(qtype, n, k, rng)
            weights_cache[key] = (packed, cp.asarray(dequantize_kernel_layout(packed, qtype, (n, k))))
        packed, wd = weights_cache[key]
        wbytes = sum(a.nbytes for a in packed.values())
        copies = max(1, math.ceil(2 * l2_bytes / wbytes))
        dev_w = [{name: cp.asarray(a) for name, a in packed.items()} for _ in range(copies)]
        fn = module.get_function(entry["kernel"])
        for rows in ((entry["batch"],) if entry["batch"] else gemm_rows):
            x = rng.standard_normal((rows, k), dtype=np.float32)
            dx = cp.asarray(x.astype(entry["dtype"]))
            y = cp.zeros((rows, n), dtype=entry["dtype"])
            grid, block = _launch_dims(entry, rows)

            def launch(i=0, dx=dx, y=y, rows=rows, grid=grid, block=block):
                bufs = dev_w[i % copies]
                args = {"acc": y, "y_cast": y, "x": dx, "qweight": bufs["qweight"], "scales": bufs["scales"],
                        "m": np.int32(rows)}
                fn(grid, block, tuple(args[p.removesuffix("_ptr")] for p in entry["params"]), stream=stream)

            with stream:
                launch()
                stream.synchronize()
            ref = cp.asarray(x) @ wd.T                 # cuBLAS f32 reference on the dequantized weights
            err = float(cp.abs(y.astype(cp.float32) - ref).max() / cp.abs(ref).max())
            seconds = timed(launch)
            row = {"label": entry["label"], "qtype": qtype, "kind": "gemv" if entry["batch"] else "gemm",
                   "rows": rows, "us": round(seconds * 1e6, 2), "weight_GBps": round(wbytes / seconds / 1e9, 1),
                   "of_hbm": round(wbytes / seconds / 1e9 / hbm_gbps, 3),
                   "TFLOPs": round(2 * rows * n * k / seconds / 1e12, 2), "max_rel_err": err}
            base = fp16_baseline(n, k, rows)
            row["cublas_fp16_us"] = round(base, 2)
            row["speedup_vs_fp16"] = round(base / (seconds * 1e6), 2)
            results["kernels"].append(row)
            print(json.dumps(row), flush=True)
        del dev_w
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--kinds", default="gemv,gemm", help="gemv, gemm or both")
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--json")
    a = sub.add_parser("all")
    a.add_argument("--out", required=True)
    a.add_argument("--arch", default="sm_90")
    a.add_argument("--json")
    lo = sub.add_parser("local")
    lo.add_argument("--out", required=True)
    lo.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    if args.cmd == "local":
        build(args.out, args.arch, shapes=LOCAL_SHAPES, batches=(1, 4))
        local_check(args.out)
        return
    if args.cmd in ("build", "all"):
        build(args.out, args.arch, kinds=tuple(getattr(args, "kinds", "gemv,gemm").split(",")))
    if args.cmd in ("run", "all"):
        res = run(getattr(args, "dir", None) or args.out)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
