"""Build artifacts for the device runs through ``voxc.build.build``, including weight-less ones.

A full-size artifact holds ~17 GB (float32) of weights, far over what can travel to the GPU machine
(64 MiB a call), so the benchmark ships the compiled library and the manifest only
(``build(..., weights=False)``), and :func:`ensure_weights` writes random weights in the artifact
layout (voxc.artifact.WeightShardWriter) on the device.

    python bench/cuda_build.py full OUT_DIR [--cuda-graph] [--quantization q4_k]   # ModelConfig(), no weights
    python bench/cuda_build.py tiny OUT_DIR [--no-cuda]     # tiny checkpoint -> OUT_DIR/{tiny_cuda,tiny_llvm}
    python bench/cuda_build.py attn OUT.so [--tiny]         # ring attention alone (tiny_check.py)
    (--target llvm: full and attn for the CPU; --target vulkan: full, and tiny -> OUT_DIR/{tiny_vulkan,tiny_llvm}
     (WGSL kernels with this machine's host code: targets/vulkan.py); --tiny-config: full of ModelConfig.tiny())

The weight-less artifacts and the tiny cuda build get a ``bench`` section in their manifest: build
seconds, the CUDA settings and a census of kernel launches per entry point (from the VM bytecode
and targets.base.CompileReport).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # last: a voxc snapshot already on the path (the device's pack) stays first
    sys.path.append(str(ROOT))

from voxc import artifact  # noqa: E402  (numpy + stdlib only: importable on the runtime-only device)

RANDOM_WEIGHTS_DIR = Path(os.environ.get("VOXC_RANDOM_WEIGHTS_DIR", "/tmp/voxc_random_weights"))
_DONE = "random-weights.json"   # in a shared directory of random weights: its file list and seed


# ---- building -------------------------------------------------------------------------------------
def config_checkpoint(cfg, directory: Path) -> Path:
    """A checkpoint directory with ``params.json`` for ``cfg`` and the tiny tokenizer, no weights:
    what ``build(..., weights=False)`` needs.  The bench never decodes text, so any tokenizer of at
    most ``cfg``'s vocabulary does."""
    from voxc.tokenizer import write_tiny_tekken

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(cfg.to_params_json(), indent=1))
    write_tiny_tekken(directory / "tekken.json")
    return directory


def build_weightless(cfg, target, out_dir: Path, *, quantization: str | None = None, dtype: str | None = None,
                     force: bool = False, extra: dict | None = None, kv_int8: str | None = None) -> Path:
    """Compile ``cfg`` for ``target`` (a name or a targets.base.TargetSpec) into ``out_dir`` without
    weights (the manifest says ``weights_included: false``; :func:`ensure_weights` fills them)."""
    from targets.base import CompileReport
    from voxc.build import build

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = CompileReport()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="voxc-bench-config-") as tmp:
        ckpt = config_checkpoint(cfg, Path(tmp) / "ckpt")
        build(ckpt, target, out_dir, progress=False, weights=False, quantization=quantization, dtype=dtype,
              force=force, report=report, kv_int8=kv_int8)
    record_bench_info(out_dir, target, report, time.perf_counter() - t0, extra)
    return out_dir


def build_tiny_pair(out_root: Path, target=None, *, quantization: str | None = None, dtype: str | None = None,
                    cuda: bool = True, twin_cpu: str = "generic", config=None,
                    kv_int8: str | None = None) -> tuple[Path | None, Path]:
    """The tiny test checkpoint built twice from the same weights: for ``target`` (default: the cuda
    target; any GPU target, e.g. vulkan) into ``tiny_<target name>`` and for llvm into ``tiny_llvm``,
    both with the same ``quantization`` and ``dtype``.  The llvm twin is compiled for ``twin_cpu``
    (generic: any x86-64 CPU, so the GPU machine's host runs it whatever this machine's CPU).
    ``cuda=False``: the llvm twin only.  ``config``: the checkpoint's ModelConfig (default
    ModelConfig.tiny()).  ``kv_int8``: both twins' 8-bit KV caches (voxc build --kv-int8)."""
    from targets.base import CompileReport
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    out_root = Path(out_root)
    ckpt = make_tiny(out_root / "tiny_ckpt", config=config, force=True)
    cuda_dir = None
    if cuda:
        from targets.cuda import TARGET

        target = TARGET if target is None else target
        cuda_dir = out_root / f"tiny_{target.name}"
        report = CompileReport()
        t0 = time.perf_counter()
        build(ckpt, target, cuda_dir, progress=False, quantization=quantization, dtype=dtype, force=True,
              report=report, kv_int8=kv_int8)
        record_bench_info(cuda_dir, target, report, time.perf_counter() - t0)
    llvm_dir = out_root / "tiny_llvm"
    build(ckpt, "llvm", llvm_dir, progress=False, quantization=quantization, dtype=dtype, cpu=twin_cpu, force=True,
          kv_int8=kv_int8)
    return cuda_dir, llvm_dir


def record_bench_info(out_dir: Path, target, report, seconds: float, extra: dict | None = None) -> dict:
    """Add the ``bench`` section (build time, CUDA settings, kernel census) to the artifact's manifest."""
    out_dir = Path(out_dir)
    manifest = artifact.read_manifest(out_dir)
    info = {"build_seconds": round(seconds, 1)}
    # a native library of CUDA or CPU kernels: a web bundle's wasm does not load here, and a vulkan
    # library's WGSL kernels load only through its device plugin (and the census reads CUDA source)
    if manifest["library"].endswith(".so") and manifest["device_kind"] != "webgpu":
        info["kernel_calls"] = kernel_census(vm_text(out_dir / manifest["library"]), report.device_source,
                                             report.small_m_dispatched)
    if hasattr(target, "archs"):
        info["cuda"] = {"arch": target.arch, "archs": list(target.archs), "cuda_graph": bool(target.cuda_graph),
                        "small_m_tiers": [list(t) for t in target.small_m_tiers],
                        "static_entries": [e.name for e in target.static_entries]}
    info.update(extra or {})
    artifact.write_manifest(out_dir, {**manifest, "bench": info})
    return info


def vm_text(library: Path) -> str:
    """The Relax VM bytecode of a compiled artifact library, as text (this machine needs TVM)."""
    import tvm
    from tvm import relax

    return relax.VMExecutable(tvm.runtime.load_module(str(library))).as_text()


def kernel_census(text: str, device_source: str | None, small_m_dispatched=(),
                  entries=("decode", "decode_b1n1", "encode", "encode_b1t8", "mel")) -> dict:
    """Per entry point: VM calls of compiled functions, kernel launches they make outside CUDA
    graphs, graph replays, and kernels inside the captured graphs (read from the VM's bytecode
    ``text`` and the generated CUDA source).  A function in ``small_m_dispatched`` (one kernel per
    row-count tier, targets.gpu_pipeline) launches one kernel per call."""
    kernels = Counter()
    for name in re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+?)_kernel(?:_\d+)?\(", device_source or ""):
        kernels[name] += 1
    kernels = {k: v // 2 if v % 2 == 0 else v for k, v in kernels.items()}   # declaration + definition
    dispatched = set(small_m_dispatched) | {k for k in kernels if re.match(r"gemm_q\w+_m_", k)}
    kernels = {k: (1 if k in dispatched else v) for k, v in kernels.items()}   # one tier runs per call
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


# ---- random weights (on the device: numpy and voxc.artifact only) ---------------------------------
def random_params(params: list[dict], *, seed: int = 0, std: float = 0.02):
    """(name, array) for every parameter of a manifest's list: valid weights for timing.

    Values are windows of one N(0, std) pool (norm gains 1, mel filters positive): timing does not
    depend on them, and drawing 4.4 G independent normals would cost the device a minute.  Packed
    quantized levels take any bits; block scales (``.scales``: f16 halves, or Q4_K's header of f16
    d/dmin and scale bytes) are small positive float16 values, so no bit pattern decodes to inf/NaN."""
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(p["shape"])) for p in params)
    pool = std * rng.standard_normal(min(1 << 26, max(1 << 16, total)), dtype=np.float32)
    for p in params:
        dtype = artifact.numpy_dtype(p["dtype"])
        shape = tuple(p["shape"])
        count = int(np.prod(shape))
        if p["name"].endswith("norm.weight"):
            array = np.ones(shape, dtype)
        elif p["name"].endswith(".scales"):
            halves = (np.abs(np.resize(pool, count * 2)) * 0.05 + 1e-4).astype(np.float16)
            array = halves.view(np.uint32).reshape(shape)
        elif dtype == np.uint32:   # packed quantized levels
            array = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
        else:
            offset = int(rng.integers(0, pool.size))
            flat = np.resize(pool[offset:] if count <= pool.size - offset else pool, count)   # repeats cyclically
            array = flat.reshape(shape).astype(dtype, copy=False)
            if p["name"] == artifact.MEL_FILTERS:
                array = np.abs(array)
        yield p["name"], array


def write_random_weights(directory: Path, params: list[dict], *, seed: int = 0, std: float = 0.02) -> list[str]:
    """tensor-cache.json + params_shard_*.bin of :func:`random_params` in ``directory``; returns the
    file names."""
    writer = artifact.WeightShardWriter(Path(directory), artifact.NATIVE_SHARD_BYTES)
    for name, array in random_params(params, seed=seed, std=std):
        writer.add(name, array)
    writer.finish()
    return [artifact.WEIGHT_INDEX] + [s["dataPath"] for s in writer.shards]


def link_weights(artifact_dir: Path, shard_dir: Path, manifest: dict, files: list[str], seed: int) -> None:
    """Symlink ``files`` of ``shard_dir`` into the artifact (unless they are there) and rewrite its
    manifest's file list with sizes only."""
    if shard_dir.resolve() != artifact_dir.resolve():
        for old in artifact_dir.glob(artifact.SHARD_NAME.format("*")):
            old.unlink()
        for name in files:
            link = artifact_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(shard_dir.resolve() / name)
    artifact.write_manifest(artifact_dir, {**manifest, "weights_random_seed": seed}, hashes=False)


def ensure_weights(artifact_dir: Path, cache_root: Path = RANDOM_WEIGHTS_DIR) -> tuple[float, float]:
    """Random weights for a weight-less artifact, written once per parameter list under ``cache_root``
    (env VOXC_RANDOM_WEIGHTS_DIR) and shared by every artifact of that list (full_cuda,
    full_cuda_graph).  An artifact that holds its weights is left alone.  Returns (GB, seconds spent
    writing or linking)."""
    artifact_dir = Path(artifact_dir)
    manifest = artifact.read_manifest(artifact_dir)
    gb = sum(int(np.prod(p["shape"])) * artifact.numpy_dtype(p["dtype"]).itemsize for p in manifest["params"]) / 1e9
    t0 = time.perf_counter()
    if manifest.get("weights_included", True):
        return gb, 0.0
    key = hashlib.sha1(json.dumps(manifest["params"]).encode()).hexdigest()[:12]
    shard_dir = Path(cache_root) / key
    done = shard_dir / _DONE
    if not done.exists():   # written beside, then renamed into place: a shared directory is whole or absent
        staging = shard_dir.with_name(f"{shard_dir.name}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        files = write_random_weights(staging, manifest["params"])
        (staging / _DONE).write_text(json.dumps({"files": files, "seed": 0}))
        shutil.rmtree(shard_dir, ignore_errors=True)
        os.replace(staging, shard_dir)
    record = json.loads(done.read_text())
    link_weights(artifact_dir, shard_dir, manifest, record["files"], record["seed"])
    return gb, time.perf_counter() - t0


# ---- ring attention alone ---------------------------------------------------------------------------
# (name, heads, kv heads, head dim, window): the full model's shapes, and small ones for a CPU
ATTENTION_CASES = (("dec", 32, 8, 128, 8192), ("enc", 32, 32, 64, 750))
TINY_ATTENTION_CASES = (("dec", 4, 2, 16, 64), ("enc", 4, 4, 8, 24))


def build_attention_modules(target, out_path: Path, cases=ATTENTION_CASES) -> Path:
    """One library with a function per case (``dec``, ``enc``): (q, k, v, cache, pages, starts) ->
    ring attention over one layer's pool of pages (the model's page size, voxc.artifact.kv_page_rows;
    ``pages``: each sequence's page-table row), through the target's own attention kernels
    (targets/cuda.py's split-K swap, targets/llvm.py's CPU kernel).  ``<out>.json`` lists the cases
    (tiny_check.py)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec

    from schedules.ring_attention import ring_attention_func
    from voxc.artifact import kv_page_rows, kv_pages_per_stream

    def method(name, heads, kv_heads, head_dim, window):
        def forward(self, q, k, v, cache, pages, starts):
            b, n = q.shape[0], q.shape[1]
            return op.tensor_ir_op(
                ring_attention_func(heads, kv_heads, head_dim, window, "float32"), f"ring_attention_{name}",
                args=[q, k, v, cache, pages, starts],
                out=nn.Tensor.placeholder((b, n, heads, head_dim), "float32"))
        forward.__name__ = name
        return forward

    Attention = type("Attention", (nn.Module,), {c[0]: method(*c) for c in cases})
    specs = {name: {"q": spec.Tensor(["b", "n", heads, head_dim], "float32"),
                    "k": spec.Tensor(["b", "n", kv_heads, head_dim], "float32"),
                    "v": spec.Tensor(["b", "n", kv_heads, head_dim], "float32"),
                    "cache": spec.Tensor(["n_pages", 2, kv_page_rows(window), kv_heads, head_dim], "float32"),
                    "pages": spec.Tensor(["b", kv_pages_per_stream(window)], "int32"),
                    "starts": spec.Tensor(["b"], "int32")}
             for name, heads, kv_heads, head_dim, window in cases}
    mod, _ = Attention().export_tvm(spec=specs)
    executable = target.compile(mod)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out_path))
    out_path.with_suffix(".json").write_text(json.dumps(
        {"target": target.name, "cases": [{**dict(zip(("name", "heads", "kv_heads", "head_dim", "window"), c)),
                                           "page_rows": kv_page_rows(c[4])} for c in cases]}))
    return out_path


# ---- command line -----------------------------------------------------------------------------------
def cuda_target(args):
    from targets.cuda import TARGET

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
    if args.span_registers:
        target = dataclasses.replace(target, attention_span_in_registers=True)
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["full", "tiny", "attn"])
    ap.add_argument("out")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--archs", default=None, help="comma list, e.g. sm_90 (default: targets.cuda.DEFAULT_ARCHS)")
    ap.add_argument("--tiers", default=None, help="small-M tiers 'maxM:bucket,...', e.g. 4:4,64:8")
    ap.add_argument("--no-static", action="store_true", help="no static-shape entry points")
    ap.add_argument("--span-registers", action="store_true",
                    help="ring attention keeps its key span in registers (CudaTarget.attention_span_in_registers)")
    ap.add_argument("--dtype", default=None, help="float32 or float16 (default: the target's)")
    ap.add_argument("--quantization", default=None, help="q4_0, q4_k or q8_0 (default: dense)")
    ap.add_argument("--no-cuda", action="store_true", help="tiny: the llvm twin only (no nvcc here)")
    ap.add_argument("--target", default="cuda", choices=["cuda", "llvm", "vulkan"],
                    help="the target (default cuda; llvm for a rehearsal on the CPU: full and attn; vulkan: "
                         "full and tiny)")
    ap.add_argument("--tiny", action="store_true", help="attn: small shapes (a CPU run) instead of the model's")
    ap.add_argument("--tiny-config", action="store_true", help="full: ModelConfig.tiny() (a rehearsal) instead of "
                                                               "ModelConfig()")
    ap.add_argument("--force", action="store_true", help="full: replace an existing artifact")
    ap.add_argument("--kv-int8", default=None, help="full, tiny: 8-bit KV caches for these towers (encoder, "
                                                    "decoder, all; voxc build --kv-int8)")
    ap.add_argument("--q4k-config", action="store_true",
                    help="tiny: every input width a multiple of 256 (tests/references.py q4k_config), so that "
                         "Q4_K and Q8_0 quantize every layer instead of falling back to dense ones")
    args = ap.parse_args(argv)
    if args.what == "attn" and args.target == "vulkan":
        ap.error("attn: cuda or llvm (the ring attention alone has no vulkan build)")
    from voxc.config import ModelConfig

    t0 = time.perf_counter()
    if args.target == "llvm":
        from targets.llvm import TARGET as target
    elif args.target == "vulkan":
        from targets.vulkan import TARGET as target
    else:
        target = cuda_target(args)
    if args.what == "full":
        cfg = ModelConfig.tiny() if args.tiny_config else ModelConfig()
        out = build_weightless(cfg, target, Path(args.out), quantization=args.quantization, dtype=args.dtype,
                               force=args.force, kv_int8=args.kv_int8)
    elif args.what == "attn":
        out = build_attention_modules(target, Path(args.out), TINY_ATTENTION_CASES if args.tiny else ATTENTION_CASES)
    else:
        config = None
        if args.q4k_config:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from references import q4k_config

            config = q4k_config()
        gpu_target = target if args.target == "vulkan" else cuda_target(args)
        out = build_tiny_pair(Path(args.out), None if args.no_cuda else gpu_target,
                              quantization=args.quantization, dtype=args.dtype, cuda=not args.no_cuda, config=config,
                              kv_int8=args.kv_int8)
    print(f"built {out} in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
