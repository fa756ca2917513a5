"""The batched Q4_K float16 GEMM on CUDA (what a decode step of 33+ streams and the encoder's long
chunks run), whole-call times per split-K count beside cuBLAS fp16 at the same shape, in two steps
so the GPU machine needs only TVM's runtime.

1. ``build`` (TVM + nvcc; no GPU): every weight shape of the model, each in the forms the model's
   GEMM dispatches to (schedules.dequant_matmul.cuda_gemm_plan) and without a split, the weight
   dequantized in the weight-tile load (``s<count>``), or first into a float16 workspace and then
   dlight's tensor-core Matmul (``s<count>dq``) or cuBLAS (``cublas``, targets/cuda_cublas.cc linked
   in; ``cublas_scalar_stores``: its dequantization with one 2-byte store per element, as in the
   fourteenth run), compiled as in the model into one library, ``gemm.so`` + ``manifest.json``.

       python bench/gemm_gpu.py build --out DIR [--arch sm_90] [--only dec.w2]

2. ``run`` (a CUDA GPU, TVM's runtime, torch): real Q4_K random weights (several copies, so the
   weights stream from HBM rather than L2), each kernel checked against ``x @ dequant(W).T`` in float64
   on the host for every row count, then timed with CUDA events over back-to-back calls (launch
   included: these kernels take tens of microseconds or more).  cuBLAS fp16 (torch.matmul) at the same
   shape in the same run, and weight GB/s.

       python bench/gemm_gpu.py run --dir DIR --json out.json

``python bench/gemm_gpu.py local`` builds two tiny shapes (needs nvcc, no GPU) and checks the library
exports every kernel of the manifest: what CI runs to keep this script working.
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

from bench.quant_gpu import SHAPES, random_packed, select_shapes  # noqa: E402 - the model's weight shapes, valid random Q4_K

ROWS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 1500)
LOCAL_SHAPES = {"tiny 96x512": (96, 512), "tiny 256x768": (256, 768)}
L2_BYTES = 64 << 20           # weight copies cycled through so that each call reads HBM (H100: 50 MB L2)


def variant_name(form) -> str:
    """``s<splits>`` (dequantized in the weight-tile load), ``s<splits>dq`` (into a float16 workspace
    first, then dlight's matmul) or ``cublas`` (into the workspace, then cuBLAS)."""
    return {"tiles": f"s{form.splits}", "dequantize_first": f"s{form.splits}dq", "cublas": "cublas"}[form.form]


def build(out_dir: str | Path, arch: str = "sm_90", shapes: dict | None = None) -> Path:
    import tvm

    from schedules.dequant_matmul import GemmForm, cublas_gemm_cuda, cuda_gemm_form, cuda_gemm_plan, split_k_count
    from targets.base import CompileReport
    from targets.cuda import compile_cublas_shim, fatbin_compiler, prepare_toolchain
    from voxc.quant.formats import QType

    prepare_toolchain()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    funcs, manifest = {}, []
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    t0 = time.time()
    for label, (n, k) in (SHAPES if shapes is None else shapes).items():
        if label.startswith("lm_head"):         # its GEMM has 1024 column tiles: no split to try
            continue
        forms = {GemmForm(None, 1, "tiles"), GemmForm(None, 1, "dequantize_first"), GemmForm(None, 1, "cublas"),
                 *(form._replace(rows=None) for form in cuda_gemm_plan(n, k, cublas=False))}
        # split dequantize-first forms
        forms |= {GemmForm(None, split_k_count(n, k, rows), "dequantize_first") for rows in (512, 1024)}
        for form in sorted(forms, key=lambda form: (form.form, form.splits)):
            variant = variant_name(form)
            name = f"gemm_q4_k_{n}x{k}_f16_{variant}"
            with target:
                funcs[name] = cuda_gemm_form(QType.Q4_K, n, k, "float16", form).with_attr("global_symbol", name)
            manifest.append({"name": name, "label": label, "n": n, "k": k, "variant": variant})
        # the cuBLAS form with the fourteenth run's dequantization (2-byte stores), beside the 16-byte one
        name = f"gemm_q4_k_{n}x{k}_f16_cublas_scalar_stores"
        with target:
            funcs[name] = cublas_gemm_cuda(QType.Q4_K, n, k, "float16", vector_store=False).with_attr("global_symbol", name)
        manifest.append({"name": name, "label": label, "n": n, "k": k, "variant": "cublas_scalar_stores"})
    # the kernels as a fatbin, as voxc's CUDA builds link them (TVM's runtime cannot compile source)
    with tvm.target.Target(target, host="llvm") as full_target, fatbin_compiler([arch], CompileReport()):
        lib = tvm.compile(tvm.IRModule(funcs), target=full_target)
    lib.export_library(str(out / "gemm.so"), addons=[str(compile_cublas_shim(out))])   # the cuBLAS forms' call
    (out / "manifest.json").write_text(json.dumps({"arch": arch, "kernels": manifest}, indent=1))
    print(f"built {len(funcs)} GEMMs for {arch} in {time.time() - t0:.0f} s -> {out}")
    return out


def check_build(out_dir: str | Path) -> list[str]:
    """Problems of a build (empty: none): files, and kernels of the manifest the library lacks."""
    out = Path(out_dir)
    missing = [f"missing {name}" for name in ("gemm.so", "manifest.json") if not (out / name).exists()]
    if missing:
        return missing
    blob = (out / "gemm.so").read_bytes()
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    return [f"{entry['name']} not in gemm.so" for entry in kernels if entry["name"].encode() not in blob] or (
        [] if kernels else ["the manifest lists no kernels"])


def local(out_dir: str | Path | None = None) -> Path:
    import tempfile

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="gemm_gpu_local_"))
    build(out, shapes=LOCAL_SHAPES)
    problems = check_build(out)
    if problems:
        raise SystemExit("gemm_gpu local: " + "; ".join(problems))
    print(f"gemm_gpu local: OK, {len(json.loads((out / 'manifest.json').read_text())['kernels'])} kernels in {out}")
    return out


def run(out_dir: str | Path, rows=ROWS, calls: int = 20) -> dict:
    import torch

    from voxc.quant.formats import dequantize_kernel_layout
    from voxc.runtime.tvm_runtime import Runtime

    out = Path(out_dir)
    problems = check_build(out)
    if problems:
        raise SystemExit("bad build output: " + "; ".join(problems))
    runtime = Runtime("cuda")
    lib = runtime.ffi.load_module(str(out / "gemm.so"))
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    rng = np.random.default_rng(0)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def seconds_per_call(fn) -> float:
        for i in range(3):
            fn(i)
        torch.cuda.synchronize()
        start.record()
        for i in range(calls):
            fn(i)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / calls * 1e-3

    results, shapes = [], {}
    for entry in kernels:
        shapes.setdefault((entry["label"], entry["n"], entry["k"]), []).append(entry)
    for (label, n, k), entries in shapes.items():
        packed = random_packed("q4_k", n, k, rng)
        weight = dequantize_kernel_layout(packed, "q4_k", (n, k)).astype(np.float64)
        weight_bytes = sum(a.nbytes for a in packed.values())
        copies = max(1, math.ceil(L2_BYTES / weight_bytes))
        device_weights = [(runtime.tensor(packed["qweight"]), runtime.tensor(packed["scales"])) for _ in range(copies)]
        dense = [torch.tensor(weight, dtype=torch.float16, device="cuda")
                 for _ in range(max(1, math.ceil(L2_BYTES / (2 * n * k))))]
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float16)
            reference = x.astype(np.float64) @ weight.T
            x_dev, x_torch = runtime.tensor(x), torch.tensor(x, device="cuda")
            y_dev = runtime.empty((m, n), "float16")
            cublas_s = seconds_per_call(lambda i: torch.matmul(x_torch, dense[i % len(dense)].T))
            row = {"label": label, "n": n, "k": k, "rows": m, "cublas_fp16_us": round(cublas_s * 1e6, 2),
                   "q4_weight_mb": round(weight_bytes / 1e6, 2)}
            for entry in entries:
                fn = lib[entry["name"]]
                fn(x_dev, *device_weights[0], y_dev)
                got = runtime.numpy(y_dev).astype(np.float64)
                err = float(np.abs(got - reference).max() / (np.abs(reference).max() + 1e-30))
                secs = seconds_per_call(lambda i: fn(x_dev, *device_weights[i % copies], y_dev))
                row[f"{entry['variant']}_us"] = round(secs * 1e6, 2)
                row[f"{entry['variant']}_gbps"] = round(weight_bytes / secs / 1e9, 1)
                row[f"{entry['variant']}_rel_err"] = float(f"{err:.2e}")
            best = min((f"{entry['variant']}_us" for entry in entries), key=row.get)
            row["best"], row["best_vs_cublas"] = best[:-3], round(row[best] / row["cublas_fp16_us"], 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    bad = [r for r in results for key, v in r.items() if key.endswith("_rel_err") and not v < 2e-2]
    return {"device": torch.cuda.get_device_name(), "rows": list(rows), "results": results,
            "wrong": [f"{r['label']} rows={r['rows']}" for r in bad]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--only", help="comma-separated shape labels (prefixes), e.g. dec.w2,enc")
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--json")
    r.add_argument("--rows", default=",".join(map(str, ROWS)))
    sub.add_parser("local")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.arch, select_shapes(args.only))
    elif args.cmd == "run":
        result = run(args.dir, tuple(int(v) for v in args.rows.split(",")))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if result["wrong"]:
            raise SystemExit("wrong results: " + ", ".join(result["wrong"]))
    else:
        local()


if __name__ == "__main__":
    main()
