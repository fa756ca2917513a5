"""Build CUDA artifacts for the device runs, including weight-less ("manifest only") artifacts.

A full-size artifact holds ~17 GB (float32) of weights, far over what can travel to the GPU machine
(64 MiB a call), so the benchmark ships the compiled library and the manifest only, and
:func:`fill_random_weights` writes random shards in the artifact layout on the device.

    python bench/cuda_build.py full   OUT_DIR [--cuda-graph]   # ModelConfig() defaults, no weights
    python bench/cuda_build.py tiny   OUT_DIR                  # tiny checkpoint -> OUT_DIR/{tiny_cuda,tiny_llvm}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MANIFEST = "voxc-artifact.json"
SHARD_BYTES = 512 * 1024 * 1024


def build_manifest_only(cfg, target, out_dir: Path, *, left_pad_tokens: int = 32, delay_ms: int = 480,
                        quantization: str | None = None) -> Path:
    """Compile ``cfg`` for ``target`` and write the artifact WITHOUT weight shards ("weights": [])."""
    from voxc import build as vb
    from voxc.model.layers import quantized
    from voxc.quant.linear import kernel_target
    from voxc.tokenizer import write_tiny_tekken

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    export = getattr(target, "export_graph", None)
    with quantized(quantization, None), kernel_target(target.name):
        mod, params = export(cfg) if export else vb.export_graph(cfg, target)
    executable = target.compile(mod)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = target.export(executable, out_dir)
    write_tiny_tekken(out_dir / "tekken.json")   # placeholder tokenizer: the bench never decodes text
    param_specs = [(name, [int(s) for s in p.shape], str(p.dtype)) for name, p in params]
    manifest = {
        "format": vb.ARTIFACT_FORMAT,
        "voxc_version": vb._voxc_version(),
        "tvm_version": vb._tvm_version(),
        "target": target.name,
        "device_kind": target.device_kind,
        "library": library.name,
        "model_dtype": target.model_dtype,
        "config": cfg.to_dict(),
        "params": [{"name": n, "shape": s, "dtype": d} for n, s, d in param_specs],
        "weights": [],
        "weights_omitted": True,
        "tokenizer": "tekken.json",
        "left_pad_tokens": left_pad_tokens,
        "default_delay_ms": delay_ms,
        "quantization": quantization,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "kernel_calls": kernel_census(executable, getattr(sys.modules.get("targets.cuda"), "LAST_CUDA_SOURCE", None)),
        "cuda": {"arch": getattr(target, "arch", None), "archs": list(getattr(target, "archs", ())),
                 "cuda_graph": bool(getattr(target, "cuda_graph", False))},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def kernel_census(executable, cuda_source: str | None, entries=("decode", "decode_b1n1", "encode", "mel")) -> dict:
    """Per entry point: VM calls of compiled functions, CUDA kernel launches they make outside CUDA
    graphs, graph replays, and kernels inside the captured graphs (read from the VM's bytecode text
    and the generated CUDA source)."""
    import re
    from collections import Counter

    kernels = Counter()
    for name in re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+?)_kernel(?:_\d+)?\(", cuda_source or ""):
        kernels[name] += 1
    kernels = {k: v // 2 if v % 2 == 0 else v for k, v in kernels.items()}   # declaration + definition
    dispatched = set(getattr(sys.modules.get("targets.cuda"), "SMALL_M_DISPATCHED", set()))
    dispatched |= {k for k in kernels if re.match(r"gemm_q\w+_m_", k)}   # quantized: GEMV or GEMM per call
    kernels = {k: (1 if k in dispatched else v) for k, v in kernels.items()}   # one tier runs per call
    text = executable.as_text()
    sections, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^@(\w+):", line)
        if m:
            current = sections.setdefault(m.group(1), [])
        elif current is not None and line.strip().startswith("call"):
            current.append(line.split()[1])
    out = {}
    for entry in entries:
        if entry not in sections:
            continue
        calls = [c for c in sections[entry] if not c.startswith("vm.builtin") and c not in sections]
        captured = [c for c in sections[entry] if c == "vm.builtin.cuda_graph.run_or_capture"]
        inside = sum(kernels.get(c, 0) for sec, lines in sections.items()
                     if sec.startswith(f"{entry}_cuda_graph_capture") for c in lines)
        out[entry] = {"vm_instructions": len(sections[entry]), "function_calls": len(calls),
                      "kernel_launches": sum(kernels.get(c, 0) for c in calls),
                      "graph_replays": len(captured), "kernels_in_graphs": inside}
    return out


def fill_random_weights(artifact_dir: Path, *, seed: int = 0, std: float = 0.02, shard_dir: Path | None = None) -> float:
    """Write random shards for a weight-less artifact and list them in its manifest; returns GB.

    Values are windows of one N(0, std) pool (norm gains 1, mel filters positive): timing does not
    depend on them, and drawing 4.4 G independent normals would cost the device a minute.
    ``shard_dir``: write the shards there and symlink them into the artifact (shared by variants)."""
    from safetensors.numpy import save_file

    artifact_dir = Path(artifact_dir)
    shard_dir = Path(shard_dir) if shard_dir else artifact_dir
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    rng = np.random.default_rng(seed)
    pool = (std * rng.standard_normal(1 << 26, dtype=np.float32))
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"weights-{len(shards):05d}.safetensors"
            save_file(current, str(shard_dir / name))
            shards.append(name)
            current, size = {}, 0

    for p in manifest["params"]:
        dtype = np.dtype(p["dtype"])
        shape = tuple(p["shape"])
        count = int(np.prod(shape))
        if p["name"].endswith("norm.weight"):
            array = np.ones(shape, dtype)
        elif p["name"].endswith(".scales"):
            # packed f16 block scales (Q4_K: f16 d/dmin, then scale bytes): every half a small
            # positive float16, so no random bit pattern decodes to inf/NaN
            halves = (np.abs(np.resize(pool, count * 2)) * 0.05 + 1e-4).astype(np.float16)
            array = halves.view(np.uint32).reshape(shape)
        elif dtype == np.uint32:   # packed quantized levels: any bits are valid
            array = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
        else:
            offset = int(rng.integers(0, pool.size))
            flat = np.resize(np.roll(pool, -offset)[: min(count, pool.size)], count)
            array = flat.reshape(shape).astype(dtype, copy=False)
            if p["name"] == "mel_frontend.filters":
                array = np.abs(array)
        if size + array.nbytes > SHARD_BYTES:
            flush()
        current[p["name"]] = np.ascontiguousarray(array)
        size += array.nbytes
        total += array.nbytes
    flush()
    _link_shards(artifact_dir, shard_dir, shards, manifest, seed)
    return total / 1e9


def _link_shards(artifact_dir: Path, shard_dir: Path, shards, manifest, seed):
    if shard_dir != artifact_dir:
        for name in shards:
            link = artifact_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(shard_dir / name)
    manifest["weights"] = list(shards)
    manifest["weights_random_seed"] = seed
    (artifact_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def ensure_weights(artifact_dir: Path, cache_root: Path = Path("/tmp/voxc_random_weights")) -> tuple[float, float]:
    """Random weights for a weight-less artifact, written once per parameter list and shared by every
    artifact of that list (full_cuda, full_cuda_graph). Returns (GB, seconds spent writing)."""
    import hashlib

    artifact_dir = Path(artifact_dir)
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    key = hashlib.sha1(json.dumps(manifest["params"]).encode()).hexdigest()[:12]
    shard_dir = cache_root / key
    gb = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in manifest["params"]) / 1e9
    t0 = time.perf_counter()
    done = shard_dir / "shards.json"
    if done.exists():
        _link_shards(artifact_dir, shard_dir, json.loads(done.read_text()), manifest, 0)
    elif manifest["weights"] and all((artifact_dir / s).exists() for s in manifest["weights"]):
        pass
    else:
        fill_random_weights(artifact_dir, shard_dir=shard_dir)
        done.write_text(json.dumps(json.loads((artifact_dir / MANIFEST).read_text())["weights"]))
    return gb, time.perf_counter() - t0


def build_tiny_pair(out_root: Path, target=None, *, quantization: str | None = None,
                    dtype: str | None = None) -> tuple[Path, Path]:
    """The tiny test checkpoint built twice from the same weights: cuda and llvm artifacts (both
    with the same ``quantization`` and ``dtype``)."""
    from targets import get_target
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    out_root = Path(out_root)
    ckpt = make_tiny(out_root / "tiny_ckpt")
    cuda_dir = out_root / "tiny_cuda"
    llvm_dir = out_root / "tiny_llvm"
    import targets as t
    from voxc import build as vb

    # voxc.build.build with two changes: this target object, and the target's own graph export
    # (targets/cuda.py adds static-shape entry points; voxc.build has no hook for it yet)
    original_target, original_export = t.get_target, vb.export_graph
    if target is not None:
        t.get_target = lambda name: target if name == "cuda" else original_target(name)
    vb.export_graph = lambda cfg, tgt: tgt.export_graph(cfg) if hasattr(tgt, "export_graph") \
        else original_export(cfg, tgt)
    try:
        build(ckpt, "cuda", cuda_dir, progress=False, quantization=quantization, dtype=dtype)
    finally:
        t.get_target, vb.export_graph = original_target, original_export
    build(ckpt, "llvm", llvm_dir, progress=False, quantization=quantization, dtype=dtype)
    return cuda_dir, llvm_dir


# Attention-only modules at the full model's shapes: (name, heads, kv heads, head dim, window, layers)
ATTENTION_CASES = (("dec", 32, 8, 128, 8192, 3), ("enc", 32, 32, 64, 750, 2))


def build_attention_modules(target, out_path: Path) -> Path:
    """One library with ``dec``/``enc`` functions: (q, k, v, cache, slots, starts) -> ring attention of
    the last layer, through targets/cuda.py's kernel swap (bench/device/tiny_check.py checks it)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec
    from tvm import tirx

    from schedules.ring_attention import ring_attention_func

    class Attention(nn.Module):
        def __init__(self, heads, kv_heads, head_dim, window, layers):
            self.args = (heads, kv_heads, head_dim, window)
            self.layers = layers

        def forward(self, q, k, v, cache, slots, starts):
            b, n, heads, head_dim = q.shape
            return op.tensor_ir_op(
                ring_attention_func(*self.args, "float32"), "ring_attention",
                args=[q, k, v, cache, slots, starts, tirx.IntImm("int64", self.layers - 1)],
                out=nn.Tensor.placeholder((b, n, heads, head_dim), "float32"))

    import tvm

    merged = None
    for name, heads, kv_heads, head_dim, window, layers in ATTENTION_CASES:
        module = Attention(heads, kv_heads, head_dim, window, layers)
        mod, _ = module.export_tvm(spec={"forward": {
            "q": spec.Tensor(["b", "n", heads, head_dim], "float32"),
            "k": spec.Tensor(["b", "n", kv_heads, head_dim], "float32"),
            "v": spec.Tensor(["b", "n", kv_heads, head_dim], "float32"),
            "cache": spec.Tensor([layers, 2, "s", window, kv_heads, head_dim], "float32"),
            "slots": spec.Tensor(["b"], "int32"), "starts": spec.Tensor(["b"], "int32")}})
        merged = _merge(merged if merged is not None else tvm.IRModule(), mod, name)
    ex = target.compile(merged)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out_path))
    return out_path


def _merge(a, b, name):
    """``a`` plus ``b``'s functions, ``b``'s ``forward`` renamed ``name`` and its PrimFuncs suffixed."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _M(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.renamed = {}

        def visit_global_var_(self, op):
            return self.renamed.get(op, op)

        def run(self):
            for gv, func in b.functions_items():
                if not isinstance(func, relax.Function):
                    self.renamed[gv] = self.builder_.add_func(func, f"{gv.name_hint}_{name}")
            for gv, func in b.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.add_func(self.visit_expr(func).with_attr("global_symbol", name), name)
            return self.builder_.get()

    return _M(a).run()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["full", "tiny", "attn"])
    ap.add_argument("out")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--archs", default=None, help="comma list, e.g. sm_90 (default: targets.cuda.DEFAULT_ARCHS)")
    ap.add_argument("--tiers", default=None, help="small-M tiers 'maxM:bucket,...', e.g. 4:4,64:8")
    ap.add_argument("--no-static", action="store_true", help="no static-shape entry points")
    ap.add_argument("--dtype", default=None, help="float32 or float16 (default: the target's)")
    ap.add_argument("--quantization", default=None, help="q4_0, q4_k or q8_0 (default: dense)")
    args = ap.parse_args(argv)
    from targets.cuda import TARGET
    from voxc.config import ModelConfig

    target = TARGET
    if args.cuda_graph:
        target = dataclasses.replace(target, cuda_graph=True)
    if args.archs:
        target = dataclasses.replace(target, archs=tuple(args.archs.split(",")))
    if args.tiers:
        tiers = tuple(tuple(int(x) for x in t.split(":")) for t in args.tiers.split(","))
        target = dataclasses.replace(target, small_m_tiers=tiers)
    if args.no_static:
        target = dataclasses.replace(target, static_entries=())
    if args.dtype:
        target = dataclasses.replace(target, model_dtype=args.dtype)
    t0 = time.perf_counter()
    if args.what == "full":
        from voxc.quant.formats import QType
        quant = QType.parse(args.quantization).value if args.quantization else None
        out = build_manifest_only(ModelConfig(), target, Path(args.out), quantization=quant)
    elif args.what == "attn":
        out = build_attention_modules(target, Path(args.out))
    else:
        out = build_tiny_pair(Path(args.out), target if target is not TARGET else None,
                              quantization=args.quantization, dtype=args.dtype)
    print(f"built {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
