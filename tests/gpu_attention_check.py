"""Ring attention and the ring append on a CUDA GPU, for odd configurations in float32 and float16
(and 8-bit caches),
against numpy: odd head counts and sizes (2..256), MQA/GQA groups that need several (masked) head
blocks, windows shorter than the chunk, positions past the window.  In two steps, so that the GPU
machine needs only TVM's runtime (bench/device/setup.sh):

    python tests/gpu_attention_check.py build OUT_DIR     # TVM + nvcc, no GPU: OUT_DIR/attn_odd.so + cases.json
    python tests/gpu_attention_check.py run OUT_DIR       # GPU: exit status 1 if a case fails

``build OUT_DIR llvm`` / ``run OUT_DIR cpu`` do the same on the CPU (the llvm target's own kernels):
a check of this script, and of the CPU path, on any machine.

Each case is one function ``(q, k, v, cache, pages, starts) -> (attention, cache after the append)``
over one layer's pool of pages (``pages``: each sequence's page-table row), compiled through
targets/cuda.py (its kernel swap puts the split-K kernels of schedules/ring_attention.py in; dlight
schedules the append), like the model's attention layers.  The pages of ring rows a sequence never
reaches point at page 0, full of NaN: a kernel that lets an invisible row weigh in fails the case.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from references import (int8_kv_floats, int8_kv_pages, int8_ring_append_reference, paged_ring,  # noqa: E402
                        ring_attention_reference)


def int8_pools_match(got, want, rows, heads, dim) -> bool:
    """8-bit pools equal: every value within one step, every scale within float32 rounding, the
    padding and untouched bytes exact."""
    from voxc.artifact import Int8KvPage

    layout = Int8KvPage(rows, heads, dim)
    count = 2 * rows * heads
    values = slice(0, count * dim)
    scales = slice(layout.values_bytes, layout.values_bytes + 4 * count)
    close_values = np.abs(got[:, values].astype(np.int16) - want[:, values].astype(np.int16)).max(initial=0) <= 1
    got_s, want_s = (np.ascontiguousarray(p[:, scales]).view(np.float32) for p in (got, want))
    close_scales = np.allclose(got_s, want_s, rtol=1e-6, atol=0, equal_nan=True)
    rest = np.ones(got.shape[1], bool)
    rest[values] = rest[scales] = False
    return bool(close_values and close_scales and np.array_equal(got[:, rest], want[:, rest]))

# name, heads, kv_heads, head_dim, window, dtype, chunk length n, starts (one per sequence), page rows
# (None: the model's, voxc.artifact.kv_page_rows), the cache's dtype (None: dtype's; "int8": 8-bit pages)
CASES = [
    ("tiny_enc_f16", 4, 4, 8, 750, "float16", 5, [0, 749, 1000]),
    ("tiny_dec_f16", 4, 2, 12, 8192, "float16", 3, [0, 8190]),
    ("tiny_enc_f32", 4, 4, 8, 750, "float32", 5, [0, 749]),
    ("mqa40_f16", 3, 1, 40, 5, "float16", 7, [0, 2, 11]),
    ("mqa40_f32", 3, 1, 40, 5, "float32", 7, [0, 11]),
    ("masked37_f32", 37, 1, 128, 300, "float32", 2, [0, 299, 1000]),
    ("masked37_f16", 37, 1, 128, 300, "float16", 2, [0, 1000]),
    ("mqa64_f16", 64, 1, 128, 100, "float16", 1, [5, 150]),
    ("d256_f32", 16, 2, 256, 512, "float32", 4, [0, 600]),
    ("d256_f16", 16, 2, 256, 512, "float16", 4, [0, 600]),
    ("d72_f16", 7, 7, 72, 33, "float16", 40, [3]),
    ("d2_f32", 5, 5, 2, 3, "float32", 2, [0, 4]),
    ("d80_w1_f16", 12, 4, 80, 1, "float16", 3, [0, 9]),
    ("d96_f32", 6, 2, 96, 64, "float32", 9, [0, 70]),
    ("gqa_long_f16", 2, 1, 64, 8192, "float16", 1, [8191, 20000]),
    ("pages3_f32", 4, 2, 16, 20, "float32", 6, [0, 5, 17, 43], 3),
    ("pages5_f16", 8, 2, 32, 37, "float16", 1, [0, 36, 40], 5),
    ("pages1_f32", 3, 3, 8, 7, "float32", 9, [2, 11], 1),
    ("int8_enc_f16", 4, 4, 64, 750, "float16", 4, [0, 749, 1000], None, "int8"),
    ("int8_dec_f16", 8, 2, 128, 8192, "float16", 1, [0, 100, 8191], None, "int8"),
    ("int8_odd_f32", 5, 5, 6, 13, "float32", 20, [0, 7, 30], 4, "int8"),
    ("int8_mqa_f16", 3, 1, 40, 5, "float16", 7, [0, 2, 11], 2, "int8"),
    ("int8_d2_f32", 3, 3, 2, 3, "float32", 2, [0, 4], 1, "int8"),
]


def _case(case):
    """(name, heads, kv_heads, head_dim, window, dtype, n, starts, page rows, cache dtype) of a case."""
    from voxc.artifact import kv_page_rows

    name, heads, kv, d, window, dtype, n, starts, *rest = case
    rest = rest + [None] * (2 - len(rest))
    return name, heads, kv, d, window, dtype, n, starts, rest[0] or kv_page_rows(window), rest[1] or dtype


def _cache_spec(page_rows, kv_heads, head_dim, kv_dtype):
    """The pool's argument shape: [pages, 2, P, Hkv, D], or an 8-bit pool's [pages, page bytes]."""
    from voxc.artifact import Int8KvPage

    if kv_dtype == "int8":
        return ["n_pages", Int8KvPage(page_rows, kv_heads, head_dim).page_bytes]
    return ["n_pages", 2, page_rows, kv_heads, head_dim]


def build(out_dir: str | Path, archs=("sm_90",), target_name: str = "cuda") -> Path:
    import dataclasses

    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec

    from schedules.ring_attention import ring_append_func, ring_attention_func

    def method(name, heads, kv_heads, head_dim, window, dtype, page_rows, kv_dtype):
        def forward(self, q, k, v, cache, pages, starts):
            b, n = q.shape[0], q.shape[1]
            out = op.tensor_ir_op(ring_attention_func(heads, kv_heads, head_dim, window, dtype, page_rows, kv_dtype),
                                  f"ring_attention_{name}", args=[q, k, v, cache, pages, starts],
                                  out=nn.Tensor.placeholder((b, n, heads, head_dim), dtype))
            cache = op.tensor_ir_inplace_op(ring_append_func(kv_heads, head_dim, window, dtype, page_rows, kv_dtype),
                                            f"ring_append_{name}", args=[cache, k, v, pages, starts],
                                            inplace_indices=[0], out=nn.Tensor.placeholder(cache.shape, kv_dtype))
            return out, cache
        forward.__name__ = name
        return forward

    # one module, a function per case
    cases = [_case(c) for c in CASES]
    Attention = type("Attention", (nn.Module,), {c[0]: method(*c[:6], c[8], c[9]) for c in cases})
    merged, _ = Attention().export_tvm(spec={
        name: {"q": spec.Tensor(["b", "n", heads, head_dim], dtype),
               "k": spec.Tensor(["b", "n", kv_heads, head_dim], dtype),
               "v": spec.Tensor(["b", "n", kv_heads, head_dim], dtype),
               "cache": spec.Tensor(_cache_spec(page_rows, kv_heads, head_dim, kv_dtype), kv_dtype),
               "pages": spec.Tensor(["b", -(-window // page_rows)], "int32"), "starts": spec.Tensor(["b"], "int32")}
        for name, heads, kv_heads, head_dim, window, dtype, _, _, page_rows, kv_dtype in cases})
    if target_name == "cuda":
        from targets import cuda as tc

        # ATTN_SPAN_REGISTERS=1: the kernels with their key span in registers (CudaTarget.attention_span_in_registers)
        target = dataclasses.replace(tc.TARGET, archs=tuple(archs),
                                     attention_span_in_registers=os.environ.get("ATTN_SPAN_REGISTERS") == "1")
    else:
        from targets import get_target

        target = get_target(target_name)
    ex = target.compile(merged)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out / "attn_odd.so"))
    (out / "cases.json").write_text(json.dumps({"cases": CASES}))
    print(f"built {len(CASES)} attention cases -> {out / 'attn_odd.so'}")
    return out


def run(out_dir: str | Path, device: str = "cuda") -> int:
    if device == "cuda":
        sys.path.insert(0, str(ROOT / "bench" / "device"))
        import common   # runtime-only set-up (bench/device/setup.sh): TVM's runtime libraries, no compiler

        common.setup()
    from voxc.runtime.tvm_runtime import Runtime

    out = Path(out_dir)
    rt = Runtime(device)
    vm = rt.load_vm(out / "attn_odd.so")
    rng = np.random.default_rng(11)
    failures = []
    for name, heads, kv, d, window, dtype, n, starts, page_rows, kv_dtype in (_case(c) for c in CASES):
        b = len(starts)
        q, k, v = (rng.standard_normal(shape).astype(dtype)
                   for shape in ((b, n, heads, d), (b, n, kv, d), (b, n, kv, d)))
        cache, pages = paged_ring(rng, starts, n, window, page_rows, kv, d, dtype)
        if kv_dtype == "int8":
            cache = int8_kv_pages(cache)
        starts = np.array(starts, np.int32)
        try:
            res = vm[name](rt.tensor(q), rt.tensor(k), rt.tensor(v), rt.tensor(cache), rt.tensor(pages), rt.tensor(starts))
            got, got_cache = rt.numpy(res[0]), rt.numpy(res[1])
        except Exception as exc:  # noqa: BLE001 - a launch error is this check's failure
            print(f"{name}: FAILED to run: {str(exc)[-300:]}", flush=True)
            failures.append(name)
            continue
        if kv_dtype == "int8":
            # attention over the ring as its 8-bit pages hold it; the append rounded by numpy (a value
            # may land one step apart where the kernel's float32 product rounds the other way)
            ref, _ = ring_attention_reference(q, k, v, int8_kv_floats(cache, page_rows, kv, d), pages, starts, window)
            ref_cache = int8_ring_append_reference(cache, k, v, pages, starts, window, page_rows)
            cache_ok = int8_pools_match(got_cache, ref_cache, page_rows, kv, d)
        else:
            ref, ref_cache = ring_attention_reference(q, k, v, cache, pages, starts, window)
            # the NaN page 0 compares equal to itself
            cache_ok = bool(np.array_equal(got_cache, ref_cache, equal_nan=True))
        err = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
        tol = 1e-4 if dtype == "float32" else 5e-3
        ok = err < tol and bool(np.isfinite(got).all()) and cache_ok
        print(json.dumps({"case": name, "ok": ok, "rel_err": err, "cache_append_exact": cache_ok,
                          "heads": heads, "kv_heads": kv, "head_dim": d, "window": window, "page_rows": page_rows,
                          "dtype": dtype, "kv_dtype": kv_dtype,
                          "n": n, "starts": starts.tolist()}), flush=True)
        if not ok:
            failures.append(name)
    print("ATTENTION CHECK", "FAILED: " + ", ".join(failures) if failures else "PASSED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(sys.argv[2], target_name=sys.argv[3] if len(sys.argv) == 4 else "cuda")
    else:
        sys.exit(run(sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "cuda"))
