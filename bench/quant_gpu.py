"""GPU timings of the fused dequant+matmul CUDA kernels, in two steps so the GPU machine needs no TVM.

1. ``build`` (needs TVM + nvcc; runs anywhere, no GPU): schedules every kernel for the given
   arch, compiles the CUDA source TVM emits to one cubin with nvcc, and writes ``kernels.cubin``
   and ``manifest.json`` (per kernel: name, qtype, shape, batch, parameter order, launch dims).

       python bench/quant_gpu.py build --out bench_out --arch sm_90 [--only lm_head,dec.w2] [--dtype float16]

2. ``run`` (needs a CUDA GPU, numpy and CuPy; imports nothing from TVM): loads the cubin, fills
   the kernel layout with real quantized random weights (``voxc.quant.formats``, pure numpy),
   checks every kernel against a float64 ``x @ dequant(W).T`` computed on the GPU (the output is
   pre-filled with NaN between NaN guard bands, so unwritten outputs and stray writes show), and
   times it with CUDA events, rotating through enough weight copies to exceed L2 so the weights
   stream from HBM.  Kernel times, both in microseconds of GPU time per call:

   * voxc kernels: ``n`` launches captured in a CUDA graph and replayed (Python's ~10 us launch
     cost would otherwise be timed instead of a small GEMV);
   * cuBLAS half (``cupy.matmul``, the dense float16 model's cost at the same shape): CuPy refuses
     cuBLAS calls inside a stream capture, so these run back to back outside any graph, queued
     behind a short spin kernel so that the host's launch cost stays off the GPU's timeline
     (``cublas_host_bound`` says if the host still could not keep up).

   Kernels with dynamic shared memory (the float16 tensor-core GEMM) are listed under
   ``not_launched``: their size is computed by TVM's host code, which this bench does not run; the
   model figures of bench/cuda_bench.py time them.

   Also reports weight GB/s and ``of_hbm``: that rate over the memory bandwidth of a
   device-to-device copy measured in the same run (read + write bytes / time).

       python bench/quant_gpu.py run --dir bench_out [--json results.json]

``python bench/quant_gpu.py all --out DIR`` does both (a machine with TVM, nvcc and a GPU).
``python bench/quant_gpu.py local`` (TVM + nvcc, no GPU) builds a few tiny shapes into a temporary
directory and checks the manifest against the cubin: what CI runs to keep this script working.
From another program: ``build(out_dir, arch, shapes=...)``, ``run(out_dir) -> dict`` and ``local()``.
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

# [out, in] weight shapes: the decoder's (w2, w1/w3, wo, wq, wk/wv), the encoder's, the adapter's, the LM head.
SHAPES = {
    "dec.w2 3072x9216": (3072, 9216), "dec.w1/w3 9216x3072": (9216, 3072), "dec.wo 3072x4096": (3072, 4096),
    "dec.wq 4096x3072": (4096, 3072), "dec.wk/wv 1024x3072": (1024, 3072),
    "enc.w1/w3 5120x1280": (5120, 1280), "enc.w2 1280x5120": (1280, 5120),
    "enc.wq/wk/wv 2048x1280": (2048, 1280), "enc.wo 1280x2048": (1280, 2048),
    "adapter.w_in 3072x5120": (3072, 5120), "adapter.w_out 3072x3072": (3072, 3072),
    "lm_head 131072x3072": (131072, 3072),
}
# What fusing q/k/v and w1/w3 into one matrix each would give (rows stacked): measured for Q4_K only.
FUSED_SHAPES = {
    "fused dec.wqkv 6144x3072": (6144, 3072), "fused dec.w1+w3 18432x3072": (18432, 3072),
    "fused enc.wqkv 6144x1280": (6144, 1280), "fused enc.w1+w3 10240x1280": (10240, 1280),
}
# Launch layouts of the CUDA GEMV (schedules/gpu_gemv.py) tried beside its defaults: (activation rows,
# weight rows per thread, warps per block, lanes per weight row, steps in flight[, k-splits]).
GEMV_VARIANTS = ((1, 1, 4, 32, 1), (1, 4, 4, 32, 1), (1, 2, 8, 32, 1), (1, 2, 2, 32, 1), (4, 1, 4, 32, 1),
                 (8, 2, 4, 32, 1), (1, 2, 4, 16, 1), (1, 1, 4, 16, 1), (1, 1, 8, 16, 1), (1, 2, 4, 8, 1),
                 (1, 1, 4, 4, 1), (4, 2, 4, 16, 1), (4, 1, 4, 4, 1), (1, 2, 4, 32, 2), (1, 1, 4, 32, 3),
                 (1, 2, 4, 16, 3), (1, 1, 4, 16, 4), (1, 1, 4, 4, 5), (4, 1, 4, 16, 3))
# Split-K within a block (warps sharing rows: fewer dependent rounds of loads per thread), batch 1 and 4
SPLIT_K_VARIANTS = ((1, 2, 1, 32, 1, 2), (1, 2, 1, 32, 1, 4), (1, 2, 2, 32, 1, 2), (1, 2, 2, 32, 2, 2),
                    (1, 1, 2, 32, 1, 4), (1, 2, 1, 16, 1, 3), (1, 2, 2, 16, 1, 3), (1, 2, 1, 16, 2, 3),
                    (1, 1, 1, 16, 1, 8), (1, 2, 1, 32, 2, 4), (1, 2, 2, 16, 2, 2), (4, 2, 1, 32, 1, 2),
                    (4, 2, 1, 16, 1, 3), (4, 1, 2, 32, 1, 4))
# The CUDA GEMV over a symbolic row count in chunks of 4 rows (what GEMMs dispatch up to 32 rows to)
CHUNKED_ROWS = (3, 8, 16, 32, 64)
# `local`: a few tiny shapes (odd row counts, one Q4_K super-block per row) that build in seconds
LOCAL_SHAPES = {"tiny 100x256": (100, 256), "tiny 36x512": (36, 512)}
GEMV_BATCHES = (1, 2, 4, 8, 16)
GEMM_ROWS = (16, 32, 64, 512)
QTYPES = ("q4_0", "q8_0", "q4_k")
PARAMS = ("acc", "y_cast", "y", "x", "qweight", "scales", "m")       # what a kernel's parameters may be called
# CUDA launch limits (threads per block; block x, y, z; grid x, y, z)
MAX_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
GUARD = 256                 # NaN elements on each side of an output


def build(out_dir: str | Path, arch: str = "sm_90", shapes: dict | None = None, qtypes=QTYPES,
          batches=GEMV_BATCHES, dtype: str = "float32", kinds=("gemv", "gemm"),
          fused_shapes: dict | None = None, variants=GEMV_VARIANTS, fused_variants: bool = False) -> Path:
    """``shapes`` get every qtype, GEMV batch and (unless the LM head) the GEMM; ``fused_shapes`` the
    Q4_K GEMV at batches 1 and 4; ``variants`` (rows, rows per thread, warps, lanes per row, steps in
    flight[, k-splits]) of the CUDA GEMV run on every Q4_K shape of ``shapes`` (and of ``fused_shapes``
    with ``fused_variants``), named ``..._r<R>w<W>[l<L>][p<P>][s<S>]``."""
    import tvm
    from tvm.support import nvcc

    from schedules.dequant_matmul import kernel_signature, make_kernel, tensor_core_gemm_cuda, thread_extents
    from schedules.gpu_gemv import gpu_gemv
    from voxc.quant.formats import QType, kernel_layout_shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, manifest = {}, []

    def add(func, label, qtype, n, k, batch, variant=None, rows=None):
        name = func.attrs["global_symbol"]
        funcs[name] = func
        entry = {"name": name, "label": label, "qtype": qtype, "n": n, "k": k, "batch": batch,
                 "dtype": dtype, "variant": variant, "rows": rows,
                 "layout": {key: list(v) for key, v in kernel_layout_shapes(qtype, n, k).items()},
                 "launch": thread_extents(func, 1) if batch is None else thread_extents(func)}
        if batch is None:      # a symbolic row count: the launch at each count run() uses
            entry["launch_by_rows"] = {str(r): thread_extents(func, r) for r in (rows or GEMM_ROWS)}
        manifest.append(entry)

    plan = [(label, shape, qtypes, (*(batches if "gemv" in kinds else ()), *((None,) if "gemm" in kinds else ())))
            for label, shape in (SHAPES if shapes is None else shapes).items()]
    plan += [(label, shape, ("q4_k",), (1, 4)) for label, shape in (fused_shapes or {}).items()]
    for label, (n, k), label_qtypes, label_batches in plan:
        for qtype in label_qtypes:
            if k % (256 if qtype == "q4_k" else 32):
                continue
            for batch in label_batches:
                if batch is None and label.startswith("lm_head"):
                    continue
                if batch is None:   # the one-kernel GEMM (its split-K forms: bench/gemm_gpu.py)
                    name = f"gemm_{qtype}_{n}x{k}_m_{dtype}_cuda"
                    func = tensor_core_gemm_cuda(QType.parse(qtype), n, k, dtype).with_attrs(
                        {"global_symbol": name, "tirx.is_scheduled": True})
                else:
                    func = make_kernel(qtype, n, k, batch, dtype=dtype, target="cuda", dispatch_rows=False)
                add(func, label, qtype, n, k, batch)
            if qtype == "q4_k" and 1 in label_batches and (label in (SHAPES if shapes is None else shapes)
                                                           or fused_variants):
                for batch, rows_per_thread, warps, lanes, in_flight, *rest in variants:
                    splits = rest[0] if rest else 1
                    variant = (f"r{rows_per_thread}w{warps}" + ("" if lanes == 32 else f"l{lanes}")
                               + ("" if in_flight == 1 else f"p{in_flight}") + ("" if splits == 1 else f"s{splits}"))
                    name = f"gemv_{qtype}_{n}x{k}_b{batch}_{dtype}_cuda_{variant}"
                    func = gpu_gemv(qtype, n, k, batch, dtype, rows_per_thread=rows_per_thread, warps=warps,
                                    lanes_per_row=lanes, steps_in_flight=in_flight, k_splits=splits)
                    add(func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True}), label, qtype, n, k, batch,
                        variant=variant)
                if "gemm" in kinds and not label.startswith("lm_head"):
                    name = f"gemv_{qtype}_{n}x{k}_m_chunks4_{dtype}_cuda"
                    func = gpu_gemv(qtype, n, k, 4, dtype, symbolic_rows=True)
                    add(func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True}), label, qtype, n, k, None,
                        variant="chunks of 4", rows=list(CHUNKED_ROWS))
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    t0 = time.time()
    source = tvm.compile(tvm.IRModule(funcs), target=target).mod.imports[0].inspect_source("")
    with target:
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    for entry in manifest:
        entry["kernel"] = entry["name"] + "_kernel"
        entry["params"] = kernel_signature(source, entry["kernel"])
        # dynamic shared memory (dlight's tensor-core GEMM): TVM's host code passes the size; the
        # bench passes the most a block may have without an opt-in, which the schedule stays within
        # dynamic shared memory (dlight's tensor-core GEMM): its size lives in TVM's host code, which
        # this bench does not run, so run() cannot launch the kernel (a guessed size faulted on an H100)
        entry["dynamic_shared_memory"] = "extern __shared__" in _kernel_definition(source, entry["kernel"])
        if entry["batch"] is None:      # GEMM: grid.y scales with m; record the tile height
            entry["rows_per_block_y"] = 4 if entry.get("rows") else 64
    (out / "kernels.cu").write_text(source)
    (out / "kernels.cubin").write_bytes(bytes(cubin))
    (out / "manifest.json").write_text(json.dumps({"arch": arch, "kernels": manifest}, indent=1))
    print(f"built {len(funcs)} kernels for {arch} in {time.time() - t0:.1f} s -> {out}")
    return out


def _kernel_definition(source: str, kernel: str) -> str:
    """The text of ``kernel``'s definition in TVM's CUDA source (its declaration comes first)."""
    head = source.find(kernel + "(", source.find(kernel + "(") + 1)
    end = source.find('extern "C" __global__', head)
    return source[head:end if end >= 0 else len(source)]


def _launch_dims(entry, rows):
    launch = dict(entry["launch"])
    if "launch_by_rows" in entry:
        launch = dict(entry["launch_by_rows"][str(rows)])
    elif entry["batch"] is None:
        launch["blockIdx.y"] = math.ceil(rows / entry["rows_per_block_y"])
    grid = tuple(launch.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(launch.get(f"threadIdx.{a}", 1) for a in "xyz")
    return grid, block


def launch_problems(grid, block) -> list[str]:
    """What makes a (grid, block) launch illegal on CUDA (empty: legal)."""
    problems = [f"block.{a} = {v} > {lim}" for a, v, lim in zip("xyz", block, MAX_BLOCK) if v > lim]
    problems += [f"grid.{a} = {v} > {lim}" for a, v, lim in zip("xyz", grid, MAX_GRID) if v > lim]
    if math.prod(block) > MAX_THREADS:
        problems.append(f"{math.prod(block)} threads per block > {MAX_THREADS}")
    return problems


def check_manifest(out_dir: str | Path, gemm_rows=GEMM_ROWS) -> list[str]:
    """Problems of a ``build`` output that ``run`` would trip over (empty: none): files, kernels
    missing from the cubin, parameters ``run`` cannot bind, launches outside CUDA's limits."""
    out = Path(out_dir)
    problems = [f"missing {name}" for name in ("manifest.json", "kernels.cubin") if not (out / name).exists()]
    if problems:
        return problems
    manifest = json.loads((out / "manifest.json").read_text())
    cubin = (out / "kernels.cubin").read_bytes()
    if not cubin.startswith(b"\x7fELF"):
        problems.append("kernels.cubin is not an ELF cubin")
    if not manifest.get("kernels"):
        problems.append("the manifest lists no kernels")
    for entry in manifest.get("kernels", []):
        name = entry.get("kernel", "?")
        if name.encode() not in cubin:
            problems.append(f"{name}: not in kernels.cubin")
        unknown = [p for p in entry.get("params", []) if p.removesuffix("_ptr") not in PARAMS]
        if unknown or not entry.get("params"):
            problems.append(f"{name}: parameters {entry.get('params')} (run binds {PARAMS})")
        for rows in entry.get("rows") or ((entry["batch"],) if entry.get("batch") else gemm_rows):
            problems += [f"{name} rows={rows}: {p}" for p in launch_problems(*_launch_dims(entry, rows))]
    return problems


def local(out_dir: str | Path | None = None, arch: str = "sm_90") -> Path:
    """Build a few tiny shapes (every qtype, GEMV and GEMM) with nvcc, no GPU, and check the result."""
    import tempfile

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="quant_gpu_local_"))
    build(out, arch, shapes=LOCAL_SHAPES, batches=(1, 4, 16), fused_shapes={"fused tiny 72x256": (72, 256)},
          variants=GEMV_VARIANTS[-1:] + SPLIT_K_VARIANTS[-1:])
    problems = check_manifest(out)
    if problems:
        raise SystemExit("quant_gpu local: " + "; ".join(problems))
    count = len(json.loads((out / "manifest.json").read_text())["kernels"])
    print(f"quant_gpu local: OK, {count} kernels in {out}")
    return out


def random_packed(qtype: str, n: int, k: int, rng) -> dict[str, np.ndarray]:
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


_SPIN = r'''
extern "C" __global__ void voxc_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
'''


class Timer:
    """GPU time per call on one stream, two ways (see the module docstring)."""

    def __init__(self, cp, stream, reps: int):
        self.cp, self.stream, self.reps = cp, stream, reps
        self.start, self.stop = cp.cuda.Event(), cp.cuda.Event()
        try:
            self.spin = cp.RawKernel(_SPIN, "voxc_spin")
            self.spin.compile()
        except Exception as exc:  # noqa: BLE001 - no NVRTC: time without the spin (flagged per call)
            print(f"no spin kernel ({type(exc).__name__}: {exc}); cuBLAS times may include host gaps", flush=True)
            self.spin = None

    def on_stream(self):
        """Every CuPy operation must go to ``stream``: work on the legacy default stream is not
        ordered with a non-blocking stream's kernels (uploads and fills would race them)."""
        current = self.cp.cuda.get_current_stream()
        if current.ptr != self.stream.ptr:
            raise RuntimeError(f"CuPy's current stream is {current.ptr:#x}, not the bench stream {self.stream.ptr:#x}")

    def graph(self, fn, n: int | None = None) -> float:
        """Seconds per call of ``fn(i)``: n calls captured in a CUDA graph, replayed once untimed
        and once timed."""
        cp, stream, n = self.cp, self.stream, n or self.reps
        self.on_stream()
        fn(0)
        stream.synchronize()
        stream.begin_capture()
        try:
            for i in range(n):
                fn(i)
        finally:
            graph = stream.end_capture()      # never leave the stream capturing, even on an error
        graph.launch(stream)
        stream.synchronize()
        self.start.record(stream)
        graph.launch(stream)
        self.stop.record(stream)
        self.stop.synchronize()
        return cp.cuda.get_elapsed_time(self.start, self.stop) / n * 1e-3

    def back_to_back(self, fn, min_seconds: float = 2e-3, max_calls: int = 400) -> tuple[float, bool]:
        """(seconds per call of ``fn(i)``, host_bound): calls issued back to back outside any graph,
        behind a spin kernel long enough for the host to queue them all, timed by events around them.
        ``host_bound``: queuing took longer than the spin, so the GPU may have waited for the host."""
        cp, stream = self.cp, self.stream
        self.on_stream()
        for i in range(3):
            fn(i)
        stream.synchronize()
        t = time.perf_counter()          # rough per-call time (host and GPU) for the call count
        for i in range(5):
            fn(i)
        stream.synchronize()
        rough = (time.perf_counter() - t) / 5
        n = int(min(max_calls, max(20, math.ceil(min_seconds / max(rough, 1e-7)))))
        spin_us = 40.0 * n + 2000.0
        if self.spin is not None:
            self.spin((1,), (1,), (np.uint64(spin_us * 1e3),))
        self.start.record(stream)
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        queued_us = (time.perf_counter() - t) * 1e6
        self.stop.record(stream)
        self.stop.synchronize()
        host_bound = self.spin is None or queued_us > spin_us
        return cp.cuda.get_elapsed_time(self.start, self.stop) / n * 1e-3, host_bound


def run(out_dir: str | Path, gemm_rows=GEMM_ROWS, l2_bytes: int = 64 << 20, reps: int = 50) -> dict:
    import cupy as cp

    out = Path(out_dir)
    problems = check_manifest(out, gemm_rows)
    if problems:
        raise SystemExit("bad build output: " + "; ".join(problems))
    # Uploads, fills, kernels and references all on one stream, for the whole run: one `with` block.
    # (stream.use() followed by `with stream:` blocks left CuPy on the legacy default stream after the
    # first block, so weight uploads and output fills raced the kernels on the non-blocking stream:
    # the LM head's 427 MB Q8_0 upload was still running while its GEMVs read it.)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        return _run(cp, stream, out, gemm_rows, l2_bytes, reps)


def _run(cp, stream, out: Path, gemm_rows, l2_bytes: int, reps: int) -> dict:
    from voxc.quant.formats import dequantize_kernel_layout

    manifest = json.loads((out / "manifest.json").read_text())
    module = cp.RawModule(path=str(out / "kernels.cubin"))
    timer = Timer(cp, stream, reps)

    src = cp.empty(1 << 28, cp.uint8)
    dst = cp.empty_like(src)
    copy_s = timer.graph(lambda i=0: cp.copyto(dst, src), 20)
    hbm_gbps = 2 * src.nbytes / copy_s / 1e9        # a copy reads and writes every byte
    del src, dst
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
            seconds, host_bound = timer.back_to_back(lambda i=0: cp.matmul(xh, ws[i % copies].T, out=yh))
            fp16_us[(n, k, rows)] = (seconds * 1e6, host_bound)
            del ws
        return fp16_us[(n, k, rows)]

    results["not_launched"] = [entry["name"] for entry in manifest["kernels"] if entry.get("dynamic_shared_memory")]
    for entry in manifest["kernels"]:
        if entry.get("dynamic_shared_memory"):
            continue
        n, k, qtype = entry["n"], entry["k"], entry["qtype"]
        key = (qtype, n, k)
        if key not in weights_cache:
            weights_cache.clear()
            packed = random_packed(qtype, n, k, rng)
            weights_cache[key] = (packed, cp.asarray(dequantize_kernel_layout(packed, qtype, (n, k))))
        packed, wd = weights_cache[key]
        wbytes = sum(a.nbytes for a in packed.values())
        copies = max(1, math.ceil(2 * l2_bytes / wbytes))
        dev_w = [{name: cp.asarray(a) for name, a in packed.items()} for _ in range(copies)]
        fn = module.get_function(entry["kernel"])
        for rows in entry.get("rows") or ((entry["batch"],) if entry["batch"] else gemm_rows):
            x = rng.standard_normal((rows, k), dtype=np.float32)
            dx = cp.asarray(x.astype(entry["dtype"]))
            # the output between NaN guard bands: unwritten outputs stay NaN, stray writes hit a guard
            ybuf = cp.full(rows * n + 2 * GUARD, cp.nan, dtype=entry["dtype"])
            y = ybuf[GUARD:GUARD + rows * n].reshape(rows, n)
            grid, block = _launch_dims(entry, rows)

            def launch(i=0, dx=dx, y=y, rows=rows, grid=grid, block=block):
                bufs = dev_w[i % copies]
                args = {"acc": y, "y_cast": y, "y": y, "x": dx, "qweight": bufs["qweight"], "scales": bufs["scales"],
                        "m": np.int32(rows)}
                fn(grid, block, tuple(args[p.removesuffix("_ptr")] for p in entry["params"]), stream=stream)

            timer.on_stream()
            launch()
            stream.synchronize()
            # float64 reference on the activations the kernel saw (rounded to its dtype)
            ref = dx.astype(cp.float64) @ wd.T.astype(cp.float64)
            got = y.astype(cp.float64)
            scale = float(cp.abs(ref).max())
            row_err = cp.abs(got - ref).max(axis=0) / scale        # per output feature (weight row)
            unwritten = int(cp.isnan(got).sum())
            guards_ok = bool(cp.isnan(ybuf[:GUARD]).all() and cp.isnan(ybuf[GUARD + rows * n:]).all())
            err = float(cp.nan_to_num(row_err, nan=np.inf).max())
            tol = 1e-2 if entry["dtype"] == "float16" else 1e-4
            seconds = timer.graph(launch)
            row = {"label": entry["label"], "qtype": qtype, "kind": "gemv" if entry["batch"] or entry.get("rows") else "gemm",
                   "variant": entry.get("variant"),
                   "rows": rows, "dtype": entry["dtype"], "grid": list(grid), "block": list(block),
                   "us": round(seconds * 1e6, 2), "weight_GBps": round(wbytes / seconds / 1e9, 1),
                   "of_hbm": round(wbytes / seconds / 1e9 / hbm_gbps, 3),
                   "TFLOPs": round(2 * rows * n * k / seconds / 1e12, 2), "max_rel_err": err,
                   "wrong_weight_rows": int((cp.nan_to_num(row_err, nan=np.inf) > tol).sum()),
                   "unwritten_outputs": unwritten, "guards_intact": guards_ok,
                   "ok": bool(err <= tol and unwritten == 0 and guards_ok)}
            base_us, host_bound = fp16_baseline(n, k, rows)
            row["cublas_fp16_us"] = round(base_us, 2)
            row["cublas_host_bound"] = host_bound
            row["speedup_vs_fp16"] = round(base_us / (seconds * 1e6), 2)
            results["kernels"].append(row)
            print(json.dumps(row), flush=True)
            del ref, got, row_err, ybuf
        del dev_w
    results["failures"] = [f"{r['label']} {r['qtype']} {r['kind']} rows={r['rows']}"
                           for r in results["kernels"] if not r["ok"]]
    print("QUANT GPU", "FAILED: " + ", ".join(results["failures"]) if results["failures"] else "PASSED", flush=True)
    return results


def select_shapes(only: str | None) -> dict:
    """SHAPES whose labels start with one of the comma-separated prefixes of ``only`` (all without)."""
    if not only:
        return SHAPES
    keys = [s.strip() for s in only.split(",") if s.strip()]
    chosen = {label: shape for label, shape in SHAPES.items() if any(label.startswith(key) for key in keys)}
    if not chosen:
        raise SystemExit(f"--only {only!r} matches none of {', '.join(SHAPES)}")
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "all"):
        b = sub.add_parser(name)
        b.add_argument("--out", required=True)
        b.add_argument("--arch", default="sm_90")
        b.add_argument("--kinds", default="gemv,gemm", help="gemv, gemm or both")
        b.add_argument("--dtype", default="float32", choices=["float32", "float16"])
        b.add_argument("--only", help="comma list of shape-label prefixes, e.g. lm_head,dec.w2")
        b.add_argument("--qtypes", default=",".join(QTYPES), help="comma list of " + ", ".join(QTYPES))
        b.add_argument("--batches", default=",".join(map(str, GEMV_BATCHES)), help="GEMV activation rows")
        b.add_argument("--sweep", choices=("layouts", "split-k", "both"), default="layouts",
                       help="which CUDA GEMV layout variants run beside the defaults (split-k: also on the "
                            "fused shapes)")
        if name == "all":
            b.add_argument("--json")
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--json")
    lo = sub.add_parser("local", help="tiny shapes, build + manifest check, no GPU (CI)")
    lo.add_argument("--out", help="keep the build here (default: a temporary directory)")
    lo.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    if args.cmd == "local":
        local(args.out, args.arch)
        return 0
    if args.cmd in ("build", "all"):
        variants = {"layouts": GEMV_VARIANTS, "split-k": SPLIT_K_VARIANTS,
                    "both": GEMV_VARIANTS + SPLIT_K_VARIANTS}[args.sweep]
        build(args.out, args.arch, shapes=select_shapes(args.only), dtype=args.dtype, kinds=tuple(args.kinds.split(",")),
              qtypes=tuple(args.qtypes.split(",")), batches=tuple(int(b) for b in args.batches.split(",")),
              fused_shapes=FUSED_SHAPES if args.sweep != "layouts" or not args.only else None,
              variants=variants, fused_variants=args.sweep != "layouts")
    if args.cmd in ("run", "all"):
        res = run(getattr(args, "dir", None) or args.out)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 1 if res["failures"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
