"""Every GPU kernel voxc builds launches within CUDA's limits, checked on the host (no GPU needed).

A kernel whose block or grid is out of range builds and compiles without complaint and only fails at
launch (CUDA_ERROR_INVALID_VALUE), so this walks the scheduled TIR of each kernel for its launch
dimensions (``blockIdx.*`` / ``threadIdx.*`` bindings, symbolic sizes bound to concrete values) and
reads the static shared memory of each ``__global__`` function off the CUDA source TVM generates,
for tiny/odd configurations and the full model's shapes, in float32 and float16:

* ring attention (split-K partial + merge, schedules/ring_attention.py) and the ring append and
  slot-ring write (scheduled by dlight, as in targets/cuda.py's pipeline);
* the fused dequant GEMV / GEMM (with its one-row GEMV dispatch) and the quantized row gather
  (schedules/dequant_matmul.py).

Limits: block x, y <= 1024, z <= 64, x*y*z <= 1024; grid x <= 2^31 - 1, y, z <= 65535; static
shared memory <= 48 KiB per block (more needs the dynamic opt-in, which no voxc kernel uses).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

tvm = pytest.importorskip("tvm")

from tvm import tirx  # noqa: E402

from schedules import dequant_matmul as dm  # noqa: E402
from schedules import ring_attention as ra  # noqa: E402
from schedules.slot_rows import slot_rows_write_func  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402

MAX_BLOCK = {"threadIdx.x": 1024, "threadIdx.y": 1024, "threadIdx.z": 64}
MAX_GRID = {"blockIdx.x": 2**31 - 1, "blockIdx.y": 65535, "blockIdx.z": 65535}
MAX_THREADS = 1024
MAX_SHARED = 48 * 1024

# What targets/cuda.py compiles with (CudaTarget.tvm_target): dlight sizes its blocks from these.
CUDA_TARGET = {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152,
               "max_threads_per_block": 1024, "thread_warp_size": 32, "registers_per_block": 65536}


def _target():
    return tvm.target.Target(CUDA_TARGET, host={"kind": "llvm"})


# ---- launch dimensions from TIR -------------------------------------------------------------------
def launch_dims(func: tirx.PrimFunc, sizes: dict[str, int]) -> list[dict[str, int]]:
    """One dict per kernel of ``func`` (each outermost nest of thread bindings is one launch):
    thread tag -> extent, with the function's symbolic sizes bound by name from ``sizes``."""
    kernels: list[dict[str, int]] = []

    def extent(expr) -> int:
        analyzer = tvm.sym.Analyzer()
        for var in tirx.analysis.undefined_vars(expr):
            if var.name not in sizes:
                raise KeyError(f"launch extent {expr} needs a value for {var.name!r}")
            analyzer.bind(var, tirx.const(sizes[var.name], var.ty.dtype))
        value = analyzer.simplify(expr)
        assert isinstance(value, tirx.IntImm), f"extent {expr} -> {value} is not a constant"
        return int(value)

    def walk(node, kernel):
        if isinstance(node, tirx.For):
            if node.kind == tirx.ForKind.THREAD_BINDING:
                if kernel is None:
                    kernel = {}
                    kernels.append(kernel)
                tag = node.thread_binding.thread_tag
                kernel[tag] = max(kernel.get(tag, 1), extent(node.extent))
            walk(node.body, kernel)
        elif isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
            if kernel is None:
                kernel = {}
                kernels.append(kernel)
            tag = node.node.thread_tag
            kernel[tag] = max(kernel.get(tag, 1), extent(node.value))
            walk(node.body, kernel)
        elif isinstance(node, tirx.SeqStmt):
            for child in node.seq:
                walk(child, kernel)
        elif isinstance(node, tvm.s_tir.SBlockRealize):
            walk(node.block, kernel)
        elif isinstance(node, tvm.s_tir.SBlock):
            if node.init is not None:
                walk(node.init, kernel)
            walk(node.body, kernel)
        elif isinstance(node, tirx.IfThenElse):
            walk(node.then_case, kernel)
            if node.else_case is not None:
                walk(node.else_case, kernel)
        elif hasattr(node, "body"):
            walk(node.body, kernel)

    walk(func.body, None)
    return kernels


def launch_problems(name: str, kernel: dict[str, int]) -> list[str]:
    problems = [f"{name}: {tag} = {kernel[tag]} > {limit}"
                for tag, limit in {**MAX_BLOCK, **MAX_GRID}.items() if kernel.get(tag, 1) > limit]
    threads = 1
    for tag in MAX_BLOCK:
        threads *= kernel.get(tag, 1)
    if threads > MAX_THREADS:
        problems.append(f"{name}: {threads} threads per block > {MAX_THREADS} ({kernel})")
    return problems


# ---- shared memory from the CUDA source -----------------------------------------------------------
_SIZES = {"float": 4, "half": 2, "float2": 8, "float4": 16, "half2": 4, "half4": 8, "uint": 4, "int": 4,
          "uint2": 8, "uint4": 16, "int2": 8, "int4": 16, "double": 8, "int64_t": 8, "uint64_t": 8,
          "signed char": 1, "char": 1, "uchar": 1, "unsigned char": 1, "short": 2, "ushort": 2,
          "__nv_bfloat16": 2, "nv_bfloat16": 2}
_SHARED = re.compile(r"__shared__\s+(?:alignas\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+\w+\[(\d+)\];")


def cuda_source(funcs: dict[str, tirx.PrimFunc]) -> str:
    """The CUDA C that TVM generates for ``funcs`` (codegen only: nvcc never runs)."""
    import tvm_ffi

    captured: list[str] = []

    def capture(code, *_):
        captured.append(code)
        raise RuntimeError("voxc test: CUDA source captured")

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", capture, override=True)
    try:
        # With TVM's CUDA runtime loaded (an earlier test prepared the toolchain) the compile hook runs
        # and hands us the source; without it TVM keeps the source in the module.
        ex = tvm.compile(mod, target=_target())
        return ex.mod.imports[0].inspect_source("")
    except Exception:  # noqa: BLE001 - the capture hook aborts the compile on purpose
        if not captured:
            raise
        return captured[-1]
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def shared_bytes(source: str, dynamic_ok: bool = False) -> dict[str, tuple[int, int | None]]:
    """(static shared memory, ``__launch_bounds__`` threads) of each ``__global__`` function defined
    in ``source``.  Dynamic shared memory is refused unless ``dynamic_ok`` (then its size is checked
    on the TIR: :func:`dynamic_shared_bytes`)."""
    out = {}
    heads = list(re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\([^)]*\)\s*\{', source))
    for i, head in enumerate(heads):
        body = source[head.end():heads[i + 1].start() if i + 1 < len(heads) else len(source)]
        assert dynamic_ok or "extern __shared__" not in body, f"{head.group(2)} uses dynamic shared memory"
        total = 0
        for ctype, count in _SHARED.findall(body):
            assert ctype in _SIZES, f"unknown shared type {ctype!r} in {head.group(2)}"
            total += _SIZES[ctype] * int(count)
        out[head.group(2)] = (total, int(head.group(1)) if head.group(1) else None)
    return out


def source_problems(source: str, dynamic_ok: bool = False) -> list[str]:
    problems = []
    for kernel, (used, bound) in shared_bytes(source, dynamic_ok).items():
        if used > MAX_SHARED:
            problems.append(f"{kernel}: {used} bytes of shared memory > {MAX_SHARED}")
        if bound is not None and bound > MAX_THREADS:
            problems.append(f"{kernel}: __launch_bounds__({bound}) > {MAX_THREADS} threads")
    return problems


def check_kernels(funcs: dict[str, tirx.PrimFunc], sizes: list[dict[str, int]]) -> list[str]:
    """Launch limits of every kernel of ``funcs`` for each binding of ``sizes``, and shared memory."""
    problems = []
    for name, func in funcs.items():
        for binding in sizes:
            for kernel in launch_dims(func, binding):
                problems += launch_problems(f"{name} {binding}", kernel)
    return problems + source_problems(cuda_source(funcs))


def dlight_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` as targets/cuda.py's pipeline schedules an unscheduled PrimFunc (dlight's default rules)."""
    from tvm.s_tir import dlight as dl

    from tvm import relax

    target = _target()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        mod = relax.transform.AnnotateTIROpPattern()(mod)     # as LegalizeOps + AnnotateTIROpPattern leave it
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    assert launch_dims(mod["main"], _ANY_SIZES), "dlight bound no threads"
    return mod["main"]


_ANY_SIZES = {"b": 1, "n": 1, "n_layers": 1, "n_slots": 1, "rows": 1, "n_pages": 1}


# ---- configurations ------------------------------------------------------------------------------
def _full_size():
    from voxc.config import ModelConfig

    cfg = ModelConfig()
    e, d = cfg.encoder, cfg.decoder
    return e, d


# (n_heads, n_kv_heads, head_dim, window[, page rows]): the tiny model's towers and its small-window
# variant, odd head counts and sizes, GQA/MQA ratios (a 64- and a 37-head group: split and masked head
# blocks), head sizes 2..256, windows down to 1, pages of one row up to the default 64 (a window that is
# not a multiple of its pages, 750 = 11 x 64 + 46, 100 = 64 + 36)
ODD_ATTENTION = [
    (4, 4, 8, 750), (4, 2, 12, 8192), (4, 4, 8, 8), (4, 2, 12, 16),
    (3, 1, 40, 5), (7, 7, 72, 33), (12, 4, 80, 1), (6, 2, 96, 64), (5, 5, 2, 3), (10, 5, 6, 7),
    (64, 1, 128, 100), (37, 1, 128, 300), (16, 2, 256, 512), (8, 8, 256, 4), (2, 1, 64, 8192),
    (4, 2, 16, 37, 5), (3, 3, 8, 7, 1), (8, 2, 64, 150, 64),
]


def _attention_sizes(window: int) -> list[dict[str, int]]:
    # b x n query rows on grid x: a decode step, a chunk, and a long chunk past the window; pools of one
    # page to many
    return [{"b": b, "n": n, "n_layers": 2, "n_slots": 4, "n_pages": pages}
            for b, n, pages in ((1, 1, 1), (4, 9, 40), (2, window + 37, 1000))]


def _attention_funcs(heads, kv_heads, head_dim, window, dtype, problems: list[str], page_rows=None):
    """The CUDA kernels of one attention config; a kernel that cannot be built is a problem too."""
    tag = f"{heads}_{kv_heads}_{head_dim}_{window}_{page_rows}_{dtype}"
    builders = {
        f"partial_{tag}": lambda: ra.ring_attention_partial_cuda(heads, kv_heads, head_dim, window, dtype, page_rows),
        f"merge_{tag}": lambda: ra.ring_attention_merge_cuda(heads, kv_heads, head_dim, window, dtype),
        f"append_{tag}": lambda: dlight_scheduled(ra.ring_append_func(kv_heads, head_dim, window, dtype, page_rows)),
    }
    funcs = {}
    for name, build in builders.items():
        try:
            funcs[name] = build()
        except Exception as exc:  # noqa: BLE001 - reported with the launch problems
            problems.append(f"{name}: cannot be built ({type(exc).__name__}: {str(exc)[:200]})")
    return funcs


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ring_attention_launches_are_legal_for_odd_configs(dtype):
    problems = []
    for heads, kv_heads, head_dim, window, *page_rows in ODD_ATTENTION:
        funcs = _attention_funcs(heads, kv_heads, head_dim, window, dtype, problems, *page_rows)
        problems += check_kernels(funcs, _attention_sizes(window))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ring_attention_launches_are_legal_at_full_size(dtype):
    enc, dec = _full_size()
    problems = []
    for heads, kv_heads, head_dim, window in ((enc.n_heads, enc.n_heads, enc.head_dim, enc.sliding_window),
                                              (dec.n_heads, dec.n_kv_heads, dec.head_dim, dec.sliding_window)):
        funcs = _attention_funcs(heads, kv_heads, head_dim, window, dtype, problems)
        problems += check_kernels(funcs, _attention_sizes(window) + [
            {"b": 64, "n": 1, "n_layers": 32, "n_slots": 64, "n_pages": 64 * 128},
            {"b": 256, "n": 1, "n_layers": 32, "n_slots": 256, "n_pages": 256 * 128}])
    assert not problems, "\n".join(problems)


def test_full_size_attention_layout_is_unchanged():
    """The launch-limit rules leave the measured full-size layouts (bench/RESULTS.md) as they were; the
    encoder's (one query head per kv head) take 4 query rows per block, which share each K/V tile."""
    enc, dec = _full_size()
    want = {("dec", "float32"): (32, 4, 1, 4, 32), ("dec", "float16"): (16, 4, 2, 2, 32),
            ("enc", "float32"): (16, 4, 2, 2, 3), ("enc", "float16"): (8, 4, 4, 1, 3)}
    for (tower, dtype), shape in want.items():
        heads, kv, d, w = ((dec.n_heads, dec.n_kv_heads, dec.head_dim, dec.sliding_window) if tower == "dec"
                           else (enc.n_heads, enc.n_heads, enc.head_dim, enc.sliding_window))
        lay = ra.cuda_kernel_layout(heads, kv, d, w, dtype)
        assert (lay["bdx"], lay["bdy"], lay["bdz"], lay["tile"], lay["n_splits"]) == shape, (tower, dtype, lay)
        assert lay.get("head_blocks", 1) == 1 and lay["query_rows"] == (4 if tower == "enc" else 1)


def test_slot_ring_write_launches_are_legal():
    problems = []
    for width in (1, 7, 128, 1280, 3072):
        for dtype in ("float32", "float16"):
            func = dlight_scheduled(slot_rows_write_func(width, dtype))
            sizes = [{"b": b, "n": n, "n_slots": 8, "rows": rows} for b, n, rows in ((1, 1, 3), (4, 300, 256), (64, 8, 2))]
            problems += check_kernels({f"slot_rows_{width}_{dtype}": func}, sizes)
    assert not problems, "\n".join(problems)


# ---- quantized matmuls and row gathers -------------------------------------------------------------
def _quant_shapes():
    enc, dec = _full_size()
    full = [(dec.dim, dec.hidden_dim), (dec.hidden_dim, dec.dim), (dec.n_heads * dec.head_dim, dec.dim),
            (dec.n_kv_heads * dec.head_dim, dec.dim), (dec.dim, dec.n_heads * dec.head_dim),
            (enc.hidden_dim, enc.dim), (enc.dim, enc.hidden_dim), (dec.vocab_size, dec.dim)]
    odd = [(1, 256), (3, 256), (100, 512), (1268, 48 * 32), (262144, 256)]
    return full, odd


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dequant_kernel_launches_are_legal(dtype):
    full, odd = _quant_shapes()
    shapes = full + odd if dtype == "float32" else full     # the launch does not depend on the dtype
    problems = []
    for qtype in ("q4_0", "q8_0", "q4_k"):
        funcs = {}
        for n, k in shapes:
            if k % (256 if qtype == "q4_k" else 32):
                continue
            # (the symbolic-row kernel's one-row branch is the batch-1 GEMV: checked on its own here)
            for batch in (1, 16):
                funcs[f"gemv_{qtype}_{n}x{k}_b{batch}"] = dm.make_kernel(qtype, n, k, batch, dtype, "cuda")
            funcs[f"gemm_{qtype}_{n}x{k}"] = dm.make_kernel(qtype, n, k, None, dtype, "cuda", dispatch_rows=False)
        for name, func in funcs.items():
            for m in (1, 2, 17, 4096, 65536):
                sizes = {"m": m}
                for kernel in launch_dims(func, sizes):
                    problems += launch_problems(f"{name} m={m}", kernel)
        # The GEMMs (dlight's tensor-core matmul) keep their tiles in dynamic shared memory, which
        # dlight sizes within the target's max_shared_memory_per_block; the runtime passes the size
        # at launch (the GPU check runs them).  That limit must be the 48 KiB without an opt-in.
        assert dm._DLIGHT_CUDA_TARGET["max_shared_memory_per_block"] <= MAX_SHARED
        problems += source_problems(cuda_source(funcs), dynamic_ok=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantized_gather_launches_are_legal(dtype):
    enc, dec = _full_size()
    problems = []
    for qtype in ("q4_0", "q8_0", "q4_k"):
        funcs = {f"embed_{qtype}_{v}x{d}": dm.make_embedding_kernel(qtype, v, d, dtype, "cuda")
                 for v, d in ((dec.vocab_size, dec.dim), (1268, 256), (7, 512))}
        problems += check_kernels(funcs, [{"t": t} for t in (1, 37, 100000)])
    assert not problems, "\n".join(problems)


def test_launch_checker_catches_an_illegal_block():
    """The checker itself: a (1, 1, 128) block, the float16 tiny encoder's launch before the fix."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def bad(a: T.Buffer((128,), "float32")):
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            for tz in T.thread_binding(128, thread="threadIdx.z"):
                with T.sblock("b"):
                    a[tz] = T.float32(0)

    problems = launch_problems("bad", launch_dims(bad, {})[0])
    assert problems == ["bad: threadIdx.z = 128 > 64"]


# ---- the generated CUDA compiles -------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.parametrize("config", [(4, 4, 8, 750, "float16"), (37, 1, 128, 300, "float32"),
                                    (16, 2, 256, 512, "float32"), (16, 2, 256, 512, "float16"), (5, 5, 2, 3, "float32"),
                                    (32, 8, 128, 8192, "float16"), (4, 2, 16, 37, "float32", 5)],
                         ids=lambda c: "_".join(map(str, c)))
def test_ring_attention_odd_configs_compile(config, tmp_path):
    """The paths the odd configs take (a 1-thread x axis, masked head blocks, K/V loads split into
    16-byte pieces, page-table reads) compile with nvcc: TVM's 32-byte float32x8 moves did not
    (make_ulonglong4)."""
    heads, kv_heads, head_dim, window, dtype, *page_rows = config
    source = cuda_source({"partial": ra.ring_attention_partial_cuda(heads, kv_heads, head_dim, window, dtype,
                                                                    *page_rows),
                          "merge": ra.ring_attention_merge_cuda(heads, kv_heads, head_dim, window, dtype)})
    (tmp_path / "k.cu").write_text(source)
    proc = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-w", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- 32-bit indices ---------------------------------------------------------------------------------
def test_weights_past_32_bit_indices_are_refused():
    from voxc.errors import VoxcError

    with pytest.raises(VoxcError, match="32 bits"):
        dm.make_kernel("q8_0", 300000, 32768, 1, "float32", "cuda")      # 2.46e9 packed words
    dm.make_kernel("q8_0", 262144, 8192, 1, "float32", "cuda")             # 5.4e8: fine


def test_symbolic_row_counts_are_checked_on_the_host():
    """GPU GEMMs and every row gather index rows * width in 32 bits: the host refuses a call whose
    row count would wrap (checked here on llvm with a pretend 2^28-element row: at most 7 rows)."""
    import numpy as np

    from voxc.quant.formats import kernel_layout_shapes

    for target in ("cuda", "webgpu"):
        body = dm.make_kernel("q4_0", 131072, 3072, None, "float32", target).body
        assert isinstance(body, tirx.SeqStmt) and isinstance(body.seq[0], tirx.AssertStmt)
    func = dm._guard_rows(dm.embedding_compute(dm.QType.Q8_0, 4, 64, "float32", "llvm"), 2**28, "gather")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    shapes = kernel_layout_shapes("q8_0", 4, 64)
    dev = tvm.cpu()
    weights = [tvm.runtime.tensor(np.zeros(shapes[k], np.uint32), dev) for k in ("qweight", "scales")]
    for rows, ok in ((7, True), (8, False)):
        args = [tvm.runtime.tensor(np.zeros(rows, np.int32), dev), *weights,
                tvm.runtime.tensor(np.zeros((rows, 64), np.float32), dev)]
        if ok:
            lib["main"](*args)
        else:
            with pytest.raises(ValueError, match="at most 7 rows"):
                lib["main"](*args)


def test_gemv_lane_groups_cover_every_row_once_and_launch_legally():
    """Every lanes-per-row choice of the CUDA GEMV (bench/quant_gpu.py's variants) tiles any row
    count exactly (blocks x warps x lane groups x rows per thread = n) with a legal launch."""
    from schedules.gpu_gemv import LANE_GROUPS, WARP, gemv_layout, gpu_gemv, lanes_for

    full, odd = _quant_shapes()
    problems = []
    for n, k in full + odd:
        if k % 256:
            continue
        for lanes, splits in [(lanes, 1) for lanes in LANE_GROUPS] + [(32, 4), (16, 3), (4, 8)]:
            lay = gemv_layout("q4_k", n, k, 1, lanes_per_row=lanes, k_splits=splits)
            assert lay.blocks * lay.warps * (WARP // lay.lanes_per_row) * lay.rows_per_thread == n, (n, k, lanes, lay)
            assert lay.lanes_per_row >= lanes and lay.steps * lay.lanes_per_row * lay.k_splits >= lay.units
            assert lay.threads == (WARP, lay.warps, splits)
            if (n, k) in odd:
                func = gpu_gemv("q4_k", n, k, 4, "float16", lanes_per_row=lanes, steps_in_flight=lanes // 4,
                                k_splits=splits)
                for kernel in launch_dims(func.with_attr("global_symbol", f"gemv_{n}x{k}_l{lanes}s{splits}"), {}):
                    problems += launch_problems(f"gemv {n}x{k} lanes {lanes} k-splits {splits}", kernel)
    assert not problems, "\n".join(problems)
    # 48 units (a 3072-wide Q4_K row) fill 16 lanes in 3 steps; 20 units (1280 wide) fill 4 lanes
    assert (lanes_for(48), lanes_for(20), lanes_for(64), lanes_for(1)) == (16, 4, 32, 4)
    with pytest.raises(VoxcError, match="exceed 1024 cuda threads"):
        gemv_layout("q4_k", 4096, 3072, 1, warps=8, k_splits=8)
    with pytest.raises(VoxcError, match="k_splits must be 1..8"):
        gemv_layout("q4_k", 4096, 3072, 1, k_splits=9)


def test_gemv_default_splits_rows_below_the_lm_head_on_cuda():
    """The CUDA Q4_K default (measured on an H100): rows below SPLIT_K_MAX_N get lanes x splits that
    divide their units where possible; the LM head, 5+ activation rows and WebGPU keep one split; any
    row count still tiles exactly with a legal block."""
    from schedules.gpu_gemv import CUDA_MAX_THREADS, SPLIT_K_MAX_N, WARP, gemv_layout, split_k_default

    assert [split_k_default(u) for u in (48, 144, 64, 20, 32, 80, 1)] == \
        [(16, 3), (16, 3), (32, 2), (32, 1), (32, 1), (32, 3), (32, 1)]
    full, odd = _quant_shapes()
    for n, k in full + odd:
        if k % 256:
            continue
        for rows in (1, 4, 8):
            lay = gemv_layout("q4_k", n, k, rows)
            assert lay.blocks * lay.warps * (WARP // lay.lanes_per_row) * lay.rows_per_thread == n
            assert lay.steps * lay.lanes_per_row * lay.k_splits >= lay.units
            assert WARP * lay.warps * lay.k_splits <= CUDA_MAX_THREADS
            assert (lay.k_splits > 1) <= (rows <= 4 and n < SPLIT_K_MAX_N), (n, k, rows, lay)
    assert gemv_layout("q4_k", 3072, 9216, 1).k_splits == 3
    assert gemv_layout("q4_k", 3072, 9216, 1, target="webgpu").k_splits == 1
    assert gemv_layout("q4_k", 131072, 3072, 1).k_splits == 1
    # a layout the caller names (bench/quant_gpu.py's variants) is built as named, without a split
    assert gemv_layout("q4_k", 3072, 3072, 1, lanes_per_row=32).k_splits == 1
