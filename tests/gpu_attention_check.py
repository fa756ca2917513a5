"""Ring attention and the ring append on a CUDA GPU, for odd configurations in float32 and float16,
against numpy: odd head counts and sizes (2..256), MQA/GQA groups that need several (masked) head
blocks, windows shorter than the chunk, positions past the window.  In two steps, so that the GPU
machine needs only TVM's runtime (bench/device/setup.sh):

    python tests/gpu_attention_check.py build OUT_DIR     # TVM + nvcc, no GPU: OUT_DIR/attn_odd.so + cases.json
    python tests/gpu_attention_check.py run OUT_DIR       # GPU: exit status 1 if a case fails

``build OUT_DIR llvm`` / ``run OUT_DIR cpu`` do the same on the CPU (the llvm target's own kernels):
a check of this script, and of the CPU path, on any machine.

Each case is one function ``(q, k, v, cache, slots, starts) -> (attention, cache after the append)``
over one layer's cache, compiled through targets/cuda.py (its kernel swap puts the split-K kernels of
schedules/ring_attention.py in; dlight schedules the append), like the model's attention layers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from references import ring_attention_reference  # noqa: E402

# name, heads, kv_heads, head_dim, window, dtype, chunk length n, starts (one per sequence)
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
]


def build(out_dir: str | Path, archs=("sm_90",), target_name: str = "cuda") -> Path:
    import dataclasses

    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec

    from schedules.ring_attention import ring_append_func, ring_attention_func

    def method(name, heads, kv_heads, head_dim, window, dtype):
        def forward(self, q, k, v, cache, slots, starts):
            b, n = q.shape[0], q.shape[1]
            out = op.tensor_ir_op(ring_attention_func(heads, kv_heads, head_dim, window, dtype),
                                  f"ring_attention_{name}", args=[q, k, v, cache, slots, starts],
                                  out=nn.Tensor.placeholder((b, n, heads, head_dim), dtype))
            cache = op.tensor_ir_inplace_op(ring_append_func(kv_heads, head_dim, window, dtype), f"ring_append_{name}",
                                            args=[cache, k, v, slots, starts], inplace_indices=[0],
                                            out=nn.Tensor.placeholder(cache.shape, dtype))
            return out, cache
        forward.__name__ = name
        return forward

    # one module, a function per case
    Attention = type("Attention", (nn.Module,), {c[0]: method(*c[:6]) for c in CASES})
    merged, _ = Attention().export_tvm(spec={
        name: {"q": spec.Tensor(["b", "n", heads, head_dim], dtype),
               "k": spec.Tensor(["b", "n", kv_heads, head_dim], dtype),
               "v": spec.Tensor(["b", "n", kv_heads, head_dim], dtype),
               "cache": spec.Tensor([2, "s", window, kv_heads, head_dim], dtype),
               "slots": spec.Tensor(["b"], "int32"), "starts": spec.Tensor(["b"], "int32")}
        for name, heads, kv_heads, head_dim, window, dtype, _, _ in CASES})
    if target_name == "cuda":
        from targets import cuda as tc

        target = dataclasses.replace(tc.TARGET, archs=tuple(archs))
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
    for name, heads, kv, d, window, dtype, n, starts in CASES:
        b, n_slots = len(starts), len(starts) + 1
        q, k, v = (rng.standard_normal(shape).astype(dtype)
                   for shape in ((b, n, heads, d), (b, n, kv, d), (b, n, kv, d)))
        cache = rng.standard_normal((2, n_slots, window, kv, d)).astype(dtype)
        slots = rng.permutation(n_slots)[:b].astype(np.int32)
        starts = np.array(starts, np.int32)
        try:
            res = vm[name](rt.tensor(q), rt.tensor(k), rt.tensor(v), rt.tensor(cache), rt.tensor(slots), rt.tensor(starts))
            got, got_cache = rt.numpy(res[0]), rt.numpy(res[1])
        except Exception as exc:  # noqa: BLE001 - a launch error is this check's failure
            print(f"{name}: FAILED to run: {str(exc)[-300:]}", flush=True)
            failures.append(name)
            continue
        ref, ref_cache = ring_attention_reference(q, k, v, cache, slots, starts, window)
        err = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
        tol = 1e-4 if dtype == "float32" else 5e-3
        cache_ok = bool(np.array_equal(got_cache, ref_cache))
        ok = err < tol and bool(np.isfinite(got).all()) and cache_ok
        print(json.dumps({"case": name, "ok": ok, "rel_err": err, "cache_append_exact": cache_ok,
                          "heads": heads, "kv_heads": kv, "head_dim": d, "window": window, "dtype": dtype,
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
