"""Quantization: GGUF block formats, the fused dequant+matmul kernels (llvm run, WGSL run on
lavapipe, CUDA compiled to cubin), QuantLinear/QuantEmbedding in Relax, and GGUF files in voxc's
and every community layout."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct

import gguf
import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import te, tirx
from gguf import GGMLQuantizationType as GT

from schedules.dequant_matmul import (gemv_or_gemm, make_embedding_kernel, make_kernel, thread_extents)
from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import expected_shapes, rope_rows, voxc_to_official
from voxc.config import AudioConfig, DecoderConfig, EncoderConfig, ModelConfig
from voxc.quant import formats
from voxc.quant.formats import QType, QuantTensor, quantize, quantize_tensor
from voxc.loader.gguf import read_gguf
from voxc.model.quant_linear import QuantEmbedding, QuantLinear
from voxc.quant.gguf_writer import write_voxc_gguf
from voxc.quant.packing import pack_linear_weight

QTYPES = [QType.Q4_0, QType.Q8_0, QType.Q4_K]
GGML = {QType.Q4_0: GT.Q4_0, QType.Q8_0: GT.Q8_0, QType.Q4_K: GT.Q4_K}
LLVM = tvm.target.Target("llvm")


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _awkward_rows(rng, rows, cols):
    """Gaussian rows plus the cases quantizers get wrong: zeros, constants, one outlier, tiny values."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[0] = 0
    x[1] = 0.5
    x[2, 3] = 40.0
    x[3] *= 1e-4          # f16 scales go subnormal
    x[4] = -np.abs(x[4])  # all negative
    return x


# ---- formats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_dequantize_is_bit_exact_with_gguf(qtype):
    rng = np.random.default_rng(1)
    data = quantize(_awkward_rows(rng, 9, 512), qtype)
    assert np.array_equal(_bits(formats.dequantize(data, qtype)), _bits(gguf.quants.dequantize(data, GGML[qtype])))
    # Arbitrary block bytes (every nibble / 6-bit scale pattern), with finite f16 scales.
    raw = rng.integers(0, 256, (16, 2 * qtype.block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, qtype.block_bytes)
    n_scales = 2 if qtype is QType.Q4_K else 1
    blocks[:, :2 * n_scales] = np.frombuffer(
        rng.uniform(-0.05, 0.05, blocks.shape[0] * n_scales).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2 * n_scales)
    assert np.array_equal(_bits(formats.dequantize(raw, qtype)), _bits(gguf.quants.dequantize(raw, GGML[qtype])))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0], ids=lambda q: q.value)
def test_quantize_matches_ggml_reference_bytes(qtype):
    x = _awkward_rows(np.random.default_rng(2), 11, 256)
    assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, GGML[qtype]))


def test_q4_k_quantizer_round_trips_through_gguf_and_beats_q4_0():
    rng = np.random.default_rng(3)
    x = _awkward_rows(rng, 64, 1024)
    blocks = quantize(x, QType.Q4_K)
    ours = formats.dequantize(blocks, QType.Q4_K)
    assert np.array_equal(_bits(ours), _bits(gguf.quants.dequantize(blocks, GT.Q4_K)))
    assert np.array_equal(ours[0], np.zeros(1024, np.float32))
    assert np.allclose(ours[1], 0.5, rtol=1e-2)
    gauss = rng.standard_normal((256, 1024)).astype(np.float32)

    def rel(q):
        return np.linalg.norm(formats.dequantize(quantize(gauss, q), q) - gauss) / np.linalg.norm(gauss)
    # ggml's Q4_K reference reaches ~0.07 on Gaussian data, Q4_0 ~0.086.
    assert rel(QType.Q4_K) < 0.075 < rel(QType.Q4_0) < 0.09
    # the weighted least-squares search must beat a plain min/max grid of the same format
    naive = gauss.reshape(-1, 32)
    lo, hi = np.minimum(naive.min(1, keepdims=True), 0), naive.max(1, keepdims=True)
    step = (hi - lo) / 15
    minmax = np.clip(np.rint((naive - lo) / step), 0, 15) * step + lo
    assert rel(QType.Q4_K) < np.linalg.norm(minmax - naive) / np.linalg.norm(naive)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
@pytest.mark.parametrize("cols_blocks", [1, 3])
def test_kernel_layout_is_lossless(qtype, cols_blocks):
    x = _awkward_rows(np.random.default_rng(4), 7, qtype.block_size * cols_blocks)
    qt = quantize_tensor(x, qtype)
    params = formats.to_kernel_layout(qt)
    assert {k: v.shape for k, v in params.items()} == formats.kernel_layout_shapes(qtype, *x.shape)
    assert all(v.dtype == np.uint32 for v in params.values())
    assert np.array_equal(formats.from_kernel_layout(params, qtype, x.shape).data, qt.data)


def test_format_errors():
    with pytest.raises(VoxcError, match="multiple of 256"):
        quantize(np.zeros((2, 96), np.float32), "q4_k")
    with pytest.raises(VoxcError, match="NaN"):
        quantize(np.full((1, 32), np.nan, np.float32), "q8_0")
    with pytest.raises(VoxcError, match="unknown quantization type 'q3_k'"):
        QType.parse("q3_k")
    with pytest.raises(VoxcError, match="needs 72 bytes"):
        QuantTensor(QType.Q4_0, (2, 64), np.zeros(10, np.uint8))


# ---- kernels on llvm --------------------------------------------------------------------------

def _case(qtype, n, k, rows, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    qt = quantize_tensor(w, qtype)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, :7] += 3.0                                   # activations with a non-zero mean per group
    wd = qt.dequantize().astype(np.float64)
    return formats.to_kernel_layout(qt), x, wd


def _check(y, x, wd):
    ref = x.astype(np.float64) @ wd.T
    bound = np.abs(x).astype(np.float64) @ np.abs(wd).T      # scale of fp32 rounding in a dot product
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= 2e-6 * bound + 1e-30).all(), f"max err/bound {(err / bound).max():.2e}"


def _run_llvm(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=LLVM)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib[func.attrs["global_symbol"]](*args)
    return args[-1].numpy()


SHAPES = {QType.Q4_0: [(37, 96), (1, 32), (64, 512)], QType.Q8_0: [(13, 64), (40, 512)],
          QType.Q4_K: [(37, 256), (9, 768)]}


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_llvm_gemv_matches_float64(qtype):
    for n, k in SHAPES[qtype]:
        for batch in (1, 3, 16):
            params, x, wd = _case(qtype, n, k, batch)
            y = _run_llvm(make_kernel(qtype, n, k, batch), x, params["qweight"], params["scales"],
                          np.zeros((batch, n), np.float32))
            _check(y, x, wd)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_llvm_gemm_matches_float64(qtype):
    """The symbolic-row kernel: the GEMV path up to MAX_GEMV_BATCH rows, the GEMM path above."""
    from schedules.dequant_matmul import MAX_GEMV_BATCH

    n, k = SHAPES[qtype][0]
    func = make_kernel(qtype, n, k, None)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=LLVM)
    for rows in (1, 5, MAX_GEMV_BATCH, MAX_GEMV_BATCH + 1, 67):
        params, x, wd = _case(qtype, n, k, rows, seed=rows)
        args = [tvm.runtime.tensor(a) for a in (x, params["qweight"], params["scales"], np.zeros((rows, n), np.float32))]
        lib[func.attrs["global_symbol"]](*args)
        _check(args[-1].numpy(), x, wd)


def test_llvm_float16_activations():
    params, x, wd = _case(QType.Q4_K, 21, 512, 2)
    x16 = x.astype(np.float16)
    y = _run_llvm(make_kernel("q4_k", 21, 512, 2, dtype="float16"), x16, params["qweight"], params["scales"],
                  np.zeros((2, 21), np.float16))
    ref = x16.astype(np.float64) @ wd.T
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()


def test_llvm_embedding_rows():
    for qtype in QTYPES:
        w = np.random.default_rng(5).standard_normal((50, 256)).astype(np.float32)
        qt = quantize_tensor(w, qtype)
        p = formats.to_kernel_layout(qt)
        ids = np.array([3, 0, 49, 3, 17], np.int32)
        y = _run_llvm(make_embedding_kernel(qtype, 50, 256), ids, p["qweight"], p["scales"], np.zeros((5, 256), np.float32))
        assert np.array_equal(_bits(y), _bits(qt.dequantize()[ids]))


def test_batch_rule_and_spec_errors():
    assert [gemv_or_gemm(r) for r in (1, 16, 17)] == ["gemv", "gemv", "gemm"]
    assert gemv_or_gemm(tvm.tirx.Var("s", "int64")) == "gemm"
    with pytest.raises(VoxcError, match="multiple of 256"):
        make_kernel("q4_k", 8, 96, 1)
    with pytest.raises(VoxcError, match="no dequant"):
        make_kernel("q4_0", 8, 64, 1, target="metal")


def test_webgpu_float16_activations_need_shader_f16():
    """float16 activations (the vulkan target's q4f16) make WGSL that enables f16, which the
    artifact records and the loader checks; float32 ones never need it (browsers)."""
    from targets.webgpu import shader_info

    for dtype, features in (("float16", ["shader-f16"]), ("float32", [])):
        func = make_kernel("q4_0", 8, 64, 1, dtype=dtype, target="webgpu")
        ex = tvm.compile(tvm.IRModule({func.attrs["global_symbol"]: func}),
                         target=tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm"}))
        assert shader_info(ex)["required_features"] == features


# ---- Relax modules ----------------------------------------------------------------------------

def test_quant_linear_and_embedding_in_relax():
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import spec

    class Toy(nn.Module):
        def __init__(self):
            self.emb = QuantEmbedding(300, 256, "q4_k")
            self.up = QuantLinear(256, 96, "q8_0", bias=True)
            self.down = QuantLinear(96 * 0 + 256, 40, "q4_0")

        def step(self, ids):
            h = self.emb.lookup(ids)
            return self.emb.project(h), self.up(h), self.down(h)

    rng = np.random.default_rng(6)
    dense = {"emb": rng.standard_normal((300, 256)), "up": rng.standard_normal((96, 256)),
             "down": rng.standard_normal((40, 256))}
    qtypes = {"emb": "q4_k", "up": "q8_0", "down": "q4_0"}
    packed = {k: pack_linear_weight(v.astype(np.float32), qtypes[k]) for k, v in dense.items()}
    bias = rng.standard_normal(96).astype(np.float32)
    values = {f"{k}.{s}": a for k, p in packed.items() for s, a in p.items()} | {"up.bias": bias}
    deq = {k: formats.dequantize_kernel_layout(p, qtypes[k], dense[k].shape).astype(np.float64) for k, p in packed.items()}
    for seq, kind in ((1, "gemv"), ("s", "gemm")):
        mod, params = Toy().export_tvm(spec={"step": {"ids": spec.Tensor([1, seq], "int32")}})
        assert any(gv.name_hint.startswith(f"{kind}_") for gv in mod.get_global_vars())
        vm = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())
        n = 1 if seq == 1 else 19
        ids = rng.integers(0, 300, (1, n)).astype(np.int32)
        out = vm["step"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(values[name]) for name, _ in params])
        h = deq["emb"][ids[0]]
        for got, ref in zip(out, [h @ deq["emb"].T, h @ deq["up"].T + bias, h @ deq["down"].T]):
            assert np.abs(got.numpy()[0] - ref).max() <= 2e-5 * np.abs(ref).max()


def test_relax_builds_for_gpu_targets():
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import spec

    class Toy(nn.Module):
        def __init__(self):
            self.lin = QuantLinear(256, 64, "q4_k")

        def forward(self, x):
            return self.lin(x)

    for target in (tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"),
                   tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})):
        with target:
            mod, _ = Toy().export_tvm(spec={"forward": {"x": spec.Tensor(["s", 256], "float32")}})
        names = [gv.name_hint for gv in mod.get_global_vars()]
        assert f"gemm_q4_k_64x256_m_float32_{target.kind.name}" in names
        with target:   # once a CUDA runtime is loaded (tests/test_cuda.py), nvcc runs and needs the arch
            tvm.compile(mod, target=target)
    toy = Toy()
    toy.lin.kernel_target = "webgpu"   # as voxc.model.quantization sets it for a build's target
    mod, _ = toy.export_tvm(spec={"forward": {"x": spec.Tensor([1, 256], "float32")}})
    assert "gemv_q4_k_64x256_b1_float32_webgpu" in [gv.name_hint for gv in mod.get_global_vars()]


# ---- WGSL on lavapipe -------------------------------------------------------------------------

def _wgpu_adapter():
    try:
        import wgpu
    except ImportError:
        return None, "wgpu is not installed (pip install wgpu==0.32.0)"
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as exc:   # noqa: BLE001
        return None, f"no WebGPU adapter (apt-get install mesa-vulkan-drivers for lavapipe): {exc}"
    if adapter is None:
        return None, "no WebGPU adapter (apt-get install mesa-vulkan-drivers for lavapipe)"
    return adapter, ""


def _webgpu_module_of(func):
    """The WGSL module of one scheduled PrimFunc compiled for webgpu as voxc does (TIR pipeline included)."""
    from targets.gpu_pipeline import wgsl_tir_pipeline
    ex = tvm.compile(tvm.IRModule({func.attrs["global_symbol"]: func}),
                     target=tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm"}),
                     tir_pipeline=wgsl_tir_pipeline())
    return ex.mod.imports[0]


def run_wgsl(func, arrays: dict[str, np.ndarray], m: int | None = None, f16: bool = False,
             wide: tuple[str, ...] = ()) -> np.ndarray:
    """Compile one scheduled PrimFunc for webgpu as voxc does (TIR pipeline included), run its WGSL
    with wgpu, return the output.  ``arrays`` by buffer name (extra names are ignored).  Without
    ``f16`` the WGSL must not need shader-f16 (browsers); with it, the device is asked for the feature
    (the vulkan target's q4f16).  ``wide``: bindings that must be arrays of vec4 (one 128-bit load each)."""
    import wgpu

    device_module = _webgpu_module_of(func)
    source = device_module.inspect_source("wgsl")
    for name in wide:
        assert re.search(rf"var<storage, read> {name}_ptr : array<vec4<u32>>;", source), name
    assert f16 or not re.search(r"\bf16\b", source), "WGSL must not need shader-f16"
    (entry,) = json.loads(device_module.inspect_source("func_info"))
    ext = thread_extents(func, m)
    grid = (ext.get("blockIdx.x", 1), ext.get("blockIdx.y", 1), ext.get("blockIdx.z", 1))
    assert ext.get("threadIdx.x", 1) * ext.get("threadIdx.y", 1) <= 256
    assert max(grid) <= 65535
    adapter, _ = _wgpu_adapter()
    if f16 and "shader-f16" not in adapter.features:
        pytest.skip("the adapter lacks shader-f16")
    device = adapter.request_device_sync(required_features=["shader-f16"] if f16 else [])
    pipeline = device.create_compute_pipeline(
        layout="auto", compute={"module": device.create_shader_module(code=source), "entry_point": entry})
    entries, output = [], None
    for index, kind, access, name in re.findall(r"@binding\((\d+)\) var<(storage|uniform)(?:, (\w+))?> (\w+)", source):
        if kind == "uniform":          # PODArgs: symbolic sizes, then packGridDimX
            fields = re.search(r"struct PODArgs \{([^}]*)\}", source).group(1)
            values = [grid[0] if f.split(":")[0].strip() == "packGridDimX" else m
                      for f in fields.split(",") if f.strip()]
            words = np.zeros(4 * ((len(values) + 3) // 4), np.uint32)
            words[:len(values)] = values
            buf = device.create_buffer_with_data(data=words.tobytes(), usage=wgpu.BufferUsage.UNIFORM)
        else:
            array = arrays[name.removesuffix("_ptr")]
            buf = device.create_buffer_with_data(data=np.ascontiguousarray(array).tobytes(),
                                                 usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
            if access == "read_write":
                output = (buf, array)
        entries.append({"binding": int(index), "resource": {"buffer": buf, "offset": 0, "size": buf.size}})
    encoder = device.create_command_encoder()
    compute = encoder.begin_compute_pass()
    compute.set_pipeline(pipeline)
    compute.set_bind_group(0, device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries))
    compute.dispatch_workgroups(*grid)
    compute.end()
    device.queue.submit([encoder.finish()])
    buf, like = output
    # (buffers are padded to whole 4-byte words: an odd number of f16 reads back one more)
    return np.frombuffer(device.queue.read_buffer(buf), like.dtype, count=like.size).reshape(like.shape)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_wgsl_kernels_on_lavapipe(qtype):
    adapter, why = _wgpu_adapter()
    if adapter is None:
        pytest.skip(why)
    n, k = SHAPES[qtype][0]
    for rows, batch in ((1, 1), (3, 3), (45, None)):
        params, x, wd = _case(qtype, n, k, rows)
        # the GEMM alone (run_wgsl runs one kernel; the one-row GEMV branch of the dispatched kernel
        # runs in the browser tests, tests/test_webgpu_quant.py)
        y = run_wgsl(make_kernel(qtype, n, k, batch, target="webgpu", dispatch_rows=False),
                     {"x": x, "qweight": params["qweight"], "scales": params["scales"],
                      "acc": np.zeros((rows, n), np.float32), "y": np.zeros((rows, n), np.float32)}, m=rows)
        _check(y, x, wd)
    qt = quantize_tensor(np.random.default_rng(7).standard_normal((20, k)).astype(np.float32), qtype)
    p = formats.to_kernel_layout(qt)
    ids = np.array([19, 0, 7], np.int32)
    rows = run_wgsl(make_embedding_kernel(qtype, 20, k, target="webgpu"),
                    {"ids": ids, "qweight": p["qweight"], "scales": p["scales"], "rows": np.zeros((3, k), np.float32)}, m=3)
    assert np.array_equal(_bits(rows), _bits(qt.dequantize()[ids]))


# Small odd shapes: Q4_0 with an odd group count (one group per unit), odd row counts (one row per
# thread, fewer warps), and 2560 wide: 40-80 units, so lanes take several steps, the last one partial
@pytest.mark.parametrize("offset, words, wide", [(0, 64, True), (2, 64, False), (0, 62, True)])
def test_storage_bindings_widen_only_for_aligned_vector_reads(offset, words, wide):
    """targets.gpu_pipeline.wide_storage_params declares a binding as array<vec4<u32>> only where every
    access is a 4-lane read at a provable multiple of 4 (whatever the binding's size: each vector read
    is one the scalar kernel read whole); an unaligned read keeps the scalar array."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def f(var_a: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "f"})
        a = T.match_buffer(var_a, (words,), "uint32")
        y = T.match_buffer(var_y, (15,), "uint32")
        for tx in T.thread_binding(15, thread="threadIdx.x"):
            with T.sblock("b"):
                w = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                for v in T.vectorized(4):
                    w[v] = a[tx * 4 + offset + v]
                y[tx] = w[0] + w[3]

    source = _webgpu_module_of(f).inspect_source("wgsl")
    assert bool(re.search(r"a_ptr : array<vec4<u32>>;", source)) is wide, source
    assert re.search(r"y_ptr : array<u32>;", source)          # scalar stores keep the scalar array


WEBGPU_GEMV_SHAPES = {QType.Q4_0: [(7, 96), (100, 256), (36, 512), (20, 2560)],
                      QType.Q8_0: [(7, 256), (100, 256), (36, 512), (20, 2560)],
                      QType.Q4_K: [(7, 256), (100, 256), (36, 512), (9, 768), (20, 2560)]}


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_webgpu_gemv_on_lavapipe(qtype):
    """schedules/gpu_gemv.py's WebGPU form (workgroup-memory reduction, f16 scales from integer ops)
    against the float64 reference: what make_kernel routes batches 1..8 to on webgpu, and the
    other lane layouts (several lane groups per warp, lanes finishing several outputs)."""
    from schedules.gpu_gemv import gpu_gemv

    adapter, why = _wgpu_adapter()
    if adapter is None:
        pytest.skip(why)
    for n, k in WEBGPU_GEMV_SHAPES[qtype]:
        for batch in (1, 2, 8):
            params, x, wd = _case(qtype, n, k, batch, seed=n + batch)
            arrays = {"x": x, "qweight": params["qweight"], "scales": params["scales"], "y": np.zeros((batch, n), np.float32)}
            func = make_kernel(qtype, n, k, batch, target="webgpu")
            assert func.script().count("T.tvm_storage_sync") == 1     # gpu_gemv's one barrier, not the TE schedule
            # 128-bit weight loads (Q4_0 and Q8_0 read one 32-bit scale word: scalar)
            _check(run_wgsl(func, arrays, wide=("qweight", "scales") if qtype is QType.Q4_K else ("qweight",)), x, wd)
        # other lane layouts; split-K (warps sharing rows, a step each in turn: some with no unit at all)
        for lanes, splits in ((4, 1), (16, 1), (4, 3), (8, 2)):
            params, x, wd = _case(qtype, n, k, 4, seed=lanes + splits)
            func = gpu_gemv(qtype, n, k, 4, lanes_per_row=lanes, steps_in_flight=2, k_splits=splits,
                            warps=1 if splits > 1 else None, target="webgpu")
            y = run_wgsl(func.with_attr("global_symbol", f"gemv_l{lanes}s{splits}"),
                         {"x": x, "qweight": params["qweight"], "scales": params["scales"], "y": np.zeros((4, n), np.float32)})
            _check(y, x, wd)


def test_webgpu_gemv_symbolic_rows_on_lavapipe():
    """The symbolic-row form (chunks of 4 rows on blockIdx.y, rows past m masked), which CUDA's
    row dispatch uses for 3..32 rows; WebGPU's dispatch does not route to it yet."""
    from schedules.gpu_gemv import gpu_gemv

    adapter, why = _wgpu_adapter()
    if adapter is None:
        pytest.skip(why)
    for qtype, n, k in ((QType.Q4_K, 36, 512), (QType.Q4_0, 7, 96)):
        func = gpu_gemv(qtype, n, k, 4, symbolic_rows=True, target="webgpu").with_attr("global_symbol", "gemv_m")
        for m in (1, 5):
            params, x, wd = _case(qtype, n, k, m)
            _check(run_wgsl(func, {"x": x, "qweight": params["qweight"], "scales": params["scales"],
                                   "y": np.zeros((m, n), np.float32)}, m=m), x, wd)


def test_webgpu_gemv_float16_on_lavapipe():
    """float16 activations (the vulkan target's q4f16 builds, on adapters with shader-f16): the f16
    loads, f32 accumulation, an f16 result."""
    adapter, why = _wgpu_adapter()
    if adapter is None:
        pytest.skip(why)
    for qtype, (n, k) in ((QType.Q4_K, (36, 512)), (QType.Q4_0, (7, 96)), (QType.Q8_0, (100, 256))):
        for batch in (1, 2):
            params, x, wd = _case(qtype, n, k, batch)
            x16 = x.astype(np.float16)
            y = run_wgsl(make_kernel(qtype, n, k, batch, dtype="float16", target="webgpu"),
                         {"x": x16, "qweight": params["qweight"], "scales": params["scales"],
                          "y": np.zeros((batch, n), np.float16)}, f16=True)
            ref = x16.astype(np.float64) @ wd.T
            assert np.abs(y.astype(np.float64) - ref).max() <= 2e-3 * np.abs(ref).max()


# ---- CUDA: compile to cubin -------------------------------------------------------------------

def _gemm_kernel_count(n, k, dtype):
    """Kernels of a CUDA GEMM's forms: a split-K tile form is two (slices, sum), a dequantize-first
    form two (the dequantization, the matmul), a cuBLAS form one (the dequantization; cuBLAS runs
    its own)."""
    from schedules.dequant_matmul import cuda_gemm_plan
    per_form = {"tiles": lambda form: 1 + (form.splits > 1), "dequantize_first": lambda form: 2,
                "cublas": lambda form: 1}
    return sum(per_form[form.form](form) for form in cuda_gemm_plan(n, k, dtype))


def test_split_k_follows_the_measured_cost_model():
    from schedules.dequant_matmul import (CUBLAS_MIN_ROWS, DEQUANTIZE_FIRST_MAX_ELEMENTS, SPLIT_K_MAX_ROWS,
                                          cuda_gemm_plan, split_k_count)
    # the best split counts measured on an H100 (bench/RESULTS.md, tenth run; bench/gemm_gpu.py)
    measured_best = {(3072, 9216, 256): 2, (3072, 4096, 64): 4, (1024, 3072, 64): 12, (1024, 3072, 256): 6,
                     (5120, 1280, 64): 5, (5120, 1280, 256): 1, (1280, 5120, 64): 10, (1280, 5120, 384): 4,
                     (1280, 2048, 128): 8, (3072, 3072, 384): 3}
    for (n, k, rows), best in measured_best.items():
        assert split_k_count(n, k, rows) == best, (n, k, rows)
    assert split_k_count(131072, 3072, 64) == 1             # the LM head's 1024 column tiles fill the GPU
    assert split_k_count(64, 256, 64) == 1                  # one super-block: nothing to split
    for n, k in ((3072, 9216), (1280, 5120), (5120, 1280), (1024, 3072), (300, 1792), (131072, 3072), (36, 512)):
        for rows in (1, 64, 128, 200, 256, 384, 512, 4096):
            assert (k // 256) % split_k_count(n, k, rows) == 0     # whole super-blocks per slice
        fits = n * k <= DEQUANTIZE_FIRST_MAX_ELEMENTS             # a bounded workspace
        for dtype, cublas, last in (("float16", True, "cublas" if fits else "tiles"),
                                    ("float16", False, "dequantize_first" if fits else "tiles"),
                                    ("float32", True, "cublas" if fits else "tiles")):
            plan = cuda_gemm_plan(n, k, dtype, cublas=cublas)
            bounds = [form.rows for form in plan[:-1]]
            split_rows = CUBLAS_MIN_ROWS if last == "cublas" else SPLIT_K_MAX_ROWS
            assert plan[-1].rows is None and bounds == sorted(bounds) and all(rows <= split_rows for rows in bounds)
            assert all(form.form == "tiles" for form in plan[:-1])   # the workspace forms only for many rows
            assert plan[-1].form == last, (n, k, dtype, cublas, plan)
            if last != "tiles":
                assert plan[-1].splits == 1
    assert cuda_gemm_plan(3072, 9216, "bfloat16")[-1].form == "dequantize_first"   # a dtype cuBLAS is not given


def test_chain_runs_the_producer_then_the_consumer():
    """schedules.dequant_matmul._chain (split-K's slices + their sum in one function): the producer's
    output becomes a buffer of the merged function, for a symbolic row count, checked on llvm."""
    from schedules.dequant_matmul import _chain
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, 5), "float32", name="x")
    part = te.compute((3, m, 5), lambda s, a, i: x[a, i] * (s + 1).astype("float32"), name="part")
    part_in = te.placeholder((3, m, 5), "float32", name="part")
    y = te.compute((m, 5), lambda a, i: part_in[0, a, i] + part_in[1, a, i] * part_in[2, a, i], name="y")
    merged = _chain(te.create_prim_func([x, part]), te.create_prim_func([part_in, y]))
    assert len(merged.params) == 2
    lib = tvm.compile(tvm.IRModule({"main": merged}), target=LLVM)
    xs = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((7, 5), np.float32))
    lib["main"](tvm.runtime.tensor(xs), out)
    np.testing.assert_allclose(out.numpy(), xs + 6 * xs * xs, rtol=1e-6)
    other = te.placeholder((3, m, 5), "float32", name="other")
    y_other = te.compute((m, 5), lambda a, i: other[0, a, i], name="y")
    with pytest.raises(VoxcError, match="writes .part., the consumer reads other"):
        _chain(te.create_prim_func([x, part]), te.create_prim_func([other, y_other]))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_compile_to_cubin():
    from tvm.support import nvcc
    funcs, kernels = {}, 0
    for qtype in QTYPES:
        n, k = SHAPES[qtype][-1]
        for batch, dtype in ((1, "float32"), (4, "float32"), (16, "float16"), (None, "float32"), (None, "float16")):
            f = make_kernel(qtype, n, k, batch, dtype=dtype, target="cuda")
            funcs[f.attrs["global_symbol"]] = f
            # a symbolic-row GEMM also holds the GEMVs it dispatches few rows to (1, 2, <=24 rows) and
            # its tensor-core forms
            kernels += 3 + _gemm_kernel_count(n, k, dtype) if batch is None else 1
        f = make_embedding_kernel(qtype, 100, k, target="cuda")
        funcs[f.attrs["global_symbol"]] = f
        kernels += 1
    for arch in ("sm_80", "sm_90"):
        target = tvm.target.Target({"kind": "cuda", "arch": arch})
        # With TVM's CUDA runtime loaded (after tests/test_cuda.py) the build compiles the source through
        # the nvcc callback, which records it; without, the module keeps the source itself.
        import targets.cuda as cuda_target
        from targets.base import CompileReport
        report = CompileReport()
        with target, cuda_target.fatbin_compiler([arch], report):
            module = tvm.compile(tvm.IRModule(funcs), target=target)
        source = report.device_source or module.mod.imports[0].inspect_source("")
        assert len(re.findall(r"__global__ void[^;{]*\{", source)) == kernels   # definitions
        assert "__shfl_down_sync" in source            # GEMV rows reduce inside a warp
        assert "uint2" in source and "float4" in source   # vector loads: Q8_0 words, activations
        with target:
            cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
        assert len(cubin) > 10000


# ---- GGUF files -------------------------------------------------------------------------------

def toy_config() -> ModelConfig:
    """Small, but every input width is a multiple of 256 (K-quants) except the ada up-projection
    (32), like the 4B model; head sizes are the 4B ones so that the Rust layout's shape inference
    (which cannot see head sizes) finds this config."""
    return ModelConfig(
        EncoderConfig(dim=256, n_layers=1, n_heads=4, head_dim=64, hidden_dim=512),
        DecoderConfig(dim=256, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=128, hidden_dim=512, vocab_size=1280),
        AudioConfig()).validate()


@pytest.fixture(scope="module")
def toy():
    cfg = toy_config()
    rng = np.random.default_rng(8)
    weights = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    return cfg, weights


def _tekken_bytes() -> bytes:
    from voxc.tokenizer import tiny_tekken_dict
    return json.dumps(tiny_tekken_dict()).encode()


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_voxc_gguf_round_trip(tmp_path, toy, qtype):
    cfg, weights = toy
    path = tmp_path / "m.gguf"
    tok = _tekken_bytes()
    plan = write_voxc_gguf(weights, cfg, tok, path, qtype)
    assert plan["dec.layers.0.ada_norm.w_out.weight"] == ("Q8_0" if qtype is QType.Q4_K else qtype.name)
    assert plan["enc.conv1.weight"] == "F16" and plan["dec.norm.weight"] == "F32" and plan["enc.layers.0.attention.wq.bias"] == "F32"
    got_cfg, tensors, meta = read_gguf(path)
    assert got_cfg == cfg
    assert meta["layout"] == "voxc" and meta["qtype"] == qtype.value
    assert meta["left_pad_tokens"] == (76 if qtype is QType.Q4_0 else 32)
    assert meta["tokenizer_json"] == tok
    seen = set()
    for name, value in tensors:
        seen.add(name)
        kind = plan[name]
        if kind in ("Q4_0", "Q8_0", "Q4_K"):
            assert isinstance(value, QuantTensor) and value.qtype.name == kind
            assert np.array_equal(value.data, quantize(weights[name], kind.lower()))
        elif kind == "F16":
            assert np.array_equal(value, weights[name].astype(np.float16))
        else:
            assert np.array_equal(value, weights[name])
    assert seen == set(expected_shapes(cfg))
    _, _, meta = read_gguf(path.__fspath__(), config=cfg)
    write_voxc_gguf(weights, cfg, None, tmp_path / "p.gguf", "q4_0", left_pad_tokens=40)
    assert read_gguf(tmp_path / "p.gguf")[2]["left_pad_tokens"] == 40


# Community layouts: writer-side name maps (voxc -> file name), the inverse of the reader's tables.
def _sub(table):
    def rename(name):
        for pat, rep in table:
            if re.match("^" + pat + "$", name):
                return re.sub("^" + pat + "$", rep, name)
        raise KeyError(name)
    return rename


_L = r"(\d+)"
CRISPASR_NAMES = _sub([
    (r"enc\.conv0\.(\w+)", r"audio.conv.1.\1"), (r"enc\.conv1\.(\w+)", r"audio.conv.2.\1"),
    (r"enc\.norm\.weight", "audio.ln_post.weight"),
    (rf"enc\.layers\.{_L}\.attention_norm\.weight", r"audio.blk.\1.attn_norm.weight"),
    (rf"enc\.layers\.{_L}\.ffn_norm\.weight", r"audio.blk.\1.ffn_norm.weight"),
    (rf"enc\.layers\.{_L}\.attention\.w([qkv])\.(\w+)", r"audio.blk.\1.attn_\2.\3"),
    (rf"enc\.layers\.{_L}\.attention\.wo\.(\w+)", r"audio.blk.\1.attn_out.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w1\.(\w+)", r"audio.blk.\1.ffn_gate.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w2\.(\w+)", r"audio.blk.\1.ffn_down.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w3\.(\w+)", r"audio.blk.\1.ffn_up.\2"),
    (r"adapter\.w_in\.weight", "proj1.weight"), (r"adapter\.w_out\.weight", "proj2.weight"),
    (r"tok_embeddings\.weight", "token_embd.weight"), (r"dec\.norm\.weight", "output_norm.weight"),
    (rf"dec\.layers\.{_L}\.attention_norm\.weight", r"blk.\1.attn_norm.weight"),
    (rf"dec\.layers\.{_L}\.ffn_norm\.weight", r"blk.\1.ffn_norm.weight"),
    (rf"dec\.layers\.{_L}\.attention\.w([qkv])\.weight", r"blk.\1.attn_\2.weight"),
    (rf"dec\.layers\.{_L}\.attention\.wo\.weight", r"blk.\1.attn_output.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w1\.weight", r"blk.\1.ffn_gate.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w2\.weight", r"blk.\1.ffn_down.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w3\.weight", r"blk.\1.ffn_up.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_in\.weight", r"blk.\1.ada_norm_down.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_out\.weight", r"blk.\1.ada_norm_up.weight"),
])
TRANSCRIBE_NAMES = _sub([
    (r"enc\.conv([01])\.(\w+)", r"enc.conv.\1.\2"), (r"enc\.norm\.weight", "enc.final_norm.weight"),
    (rf"enc\.layers\.{_L}\.attention_norm\.weight", r"enc.blocks.\1.norm_attn.weight"),
    (rf"enc\.layers\.{_L}\.ffn_norm\.weight", r"enc.blocks.\1.norm_ffn.weight"),
    (rf"enc\.layers\.{_L}\.attention\.w([qkv])\.(\w+)", r"enc.blocks.\1.attn.\2.\3"),
    (rf"enc\.layers\.{_L}\.attention\.wo\.(\w+)", r"enc.blocks.\1.attn.out.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w1\.(\w+)", r"enc.blocks.\1.ffn.gate.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w2\.(\w+)", r"enc.blocks.\1.ffn.down.\2"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w3\.(\w+)", r"enc.blocks.\1.ffn.up.\2"),
    (r"adapter\.w_in\.weight", "proj.linear_1.weight"), (r"adapter\.w_out\.weight", "proj.linear_2.weight"),
    (r"tok_embeddings\.weight", "dec.token_embd.weight"), (r"dec\.norm\.weight", "dec.output_norm.weight"),
    (rf"dec\.layers\.{_L}\.attention_norm\.weight", r"dec.blocks.\1.norm_attn.weight"),
    (rf"dec\.layers\.{_L}\.ffn_norm\.weight", r"dec.blocks.\1.norm_ffn.weight"),
    (rf"dec\.layers\.{_L}\.attention\.w([qkvo])\.weight", r"dec.blocks.\1.attn.\2.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w1\.weight", r"dec.blocks.\1.ffn.gate.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w2\.weight", r"dec.blocks.\1.ffn.down.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w3\.weight", r"dec.blocks.\1.ffn.up.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_in\.weight", r"dec.blocks.\1.ada.linear_1.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_out\.weight", r"dec.blocks.\1.ada.linear_2.weight"),
])
VOXTRAL_CPP_NAMES = _sub([
    (r"enc\.conv([01])\.(\w+)", r"enc.conv\1.\2"), (r"enc\.norm\.weight", "enc.norm.weight"),
    (rf"enc\.layers\.{_L}\.attention_norm\.weight", r"enc.blk.\1.attn_norm.weight"),
    (rf"enc\.layers\.{_L}\.ffn_norm\.weight", r"enc.blk.\1.ffn_norm.weight"),
    (rf"enc\.layers\.{_L}\.attention\.w([qkvo])\.(\w+)", r"enc.blk.\1.attn_\2.\3"),
    (rf"enc\.layers\.{_L}\.feed_forward\.w([123])\.(\w+)", r"enc.blk.\1.ffn_w\2.\3"),
    (r"adapter\.w_in\.weight", "adapter.0.weight"), (r"adapter\.w_out\.weight", "adapter.2.weight"),
    (r"tok_embeddings\.weight", "tok_embeddings.weight"), (r"dec\.norm\.weight", "norm.weight"),
    (rf"dec\.layers\.{_L}\.attention_norm\.weight", r"dec.blk.\1.attn_norm.weight"),
    (rf"dec\.layers\.{_L}\.ffn_norm\.weight", r"dec.blk.\1.ffn_norm.weight"),
    (rf"dec\.layers\.{_L}\.attention\.w([qkvo])\.weight", r"dec.blk.\1.attn_\2.weight"),
    (rf"dec\.layers\.{_L}\.feed_forward\.w([123])\.weight", r"dec.blk.\1.ffn_w\2.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_in\.weight", r"dec.blk.\1.ada0.weight"),
    (rf"dec\.layers\.{_L}\.ada_norm\.w_out\.weight", r"dec.blk.\1.ada2.weight"),
])

_LINEAR = re.compile(r".*(attention\.w[qkvo]|feed_forward\.w[123]|adapter\.w_(in|out)|ada_norm\.w_(in|out)|tok_embeddings)\.weight$")


def _random_k_blocks(rng, rows, cols, gtype):
    """Valid random blocks of a type gguf cannot quantize (Q6_K): random bytes, sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[gtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.frombuffer(np.full(rows * cols // block, 0.001, np.float16).tobytes(), np.uint8).reshape(rows, -1, 2)
    raw[:, :, -2:] = d                                    # Q6_K keeps d in its last two bytes
    return raw.reshape(rows, -1)


def _write(path, arch, kvs, tensors):
    """tensors: (name, array, raw GGML type or None); kvs: (method, key, value) or (key, list, subtype)."""
    w = gguf.GGUFWriter(path, arch)
    for item in kvs:
        if item[0] == "array":
            _, key, values, sub = item
            w.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            getattr(w, item[0])(item[1], item[2])
    for name, array, raw in tensors:
        if raw is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_order(name, array, cfg):
    heads = rope_rows(name, cfg)
    return array if heads is None else hf.interleaved_to_split_half(array, heads)


def _layout_file(path, layout, cfg, weights, rng):
    """A synthetic file of ``layout`` and, per voxc name, the expected (kind, value) after reading."""
    tensors, expect, kvs = [], {}, []
    e, d = cfg.encoder, cfg.decoder
    for name, w in weights.items():
        if layout == "trevors":
            file_name, arr = voxc_to_official(name), w
            kind = "Q4_0" if _LINEAR.match(name) else "F32"
        elif layout == "crispasr":
            file_name, arr = CRISPASR_NAMES(name), _hf_order(name, w, cfg)
            kind = ("F32" if "ada_norm" in name else "Q4_K") if _LINEAR.match(name) else \
                   ("F16" if name.startswith("enc.conv") and name.endswith("weight") else "F32")
        elif layout == "transcribe_cpp":
            file_name, arr = TRANSCRIBE_NAMES(name), _hf_order(name, w, cfg)
            if name == "tok_embeddings.weight":
                kind = "Q6_K"
            elif name.endswith("attention.wo.weight") or name.endswith("ada_norm.w_out.weight"):
                kind = "Q8_0"
            else:
                kind = "Q4_K" if _LINEAR.match(name) else "F32"
        elif layout == "audio_cpp":
            file_name, arr = hf.voxc_to_hf(name), _hf_order(name, w, cfg)
            if "embed" in file_name:
                kind = "F16"
            elif w.ndim == 2 and file_name.endswith(".weight"):
                kind = "Q8_0"
            else:
                kind = "BF16"
        elif layout == "voxtral_cpp":
            file_name, arr = VOXTRAL_CPP_NAMES(name), w
            if name == "tok_embeddings.weight" or name.endswith("wv.weight") or name.endswith("w2.weight"):
                kind = "Q6_K"
            elif name.endswith("ada_norm.w_out.weight") or name.startswith("enc.conv") and w.ndim == 3:
                kind = "F16"
            else:
                kind = "Q4_K" if _LINEAR.match(name) else "F32"
        if kind in ("Q4_0", "Q8_0", "Q4_K"):
            blob = quantize(arr, kind.lower())
            tensors.append((file_name, blob, GT[kind]))
            expect[name] = ("quant", kind, quantize(w, kind.lower()))
        elif kind == "Q6_K":
            blob = _random_k_blocks(rng, *arr.shape, GT.Q6_K)
            tensors.append((file_name, blob, GT.Q6_K))
            value = gguf.quants.dequantize(blob, GT.Q6_K).reshape(arr.shape)
            heads = rope_rows(name, cfg) if layout != "voxtral_cpp" else None
            expect[name] = ("array", kind, value if heads is None else hf.split_half_to_interleaved(value, heads))
        elif kind == "BF16":
            tensors.append((file_name, gguf.quants.quantize(arr, GT.BF16), GT.BF16))
            expect[name] = ("array", kind, w.astype(ml_dtypes.bfloat16).astype(np.float32))
        elif kind == "F16":
            tensors.append((file_name, arr.astype(np.float16), None))
            expect[name] = ("array", kind, w.astype(np.float16))
        else:
            tensors.append((file_name, arr, None))
            expect[name] = ("array", kind, w)

    specials = [f"<SPECIAL_{i}>" for i in range(1000)]
    pieces = [bytes([b]) for b in range(256)] + [b"ab", b"cd"]
    arch = {"trevors": "voxtral", "crispasr": "voxtral4b", "transcribe_cpp": "voxtral_realtime",
            "audio_cpp": "audiocpp", "voxtral_cpp": "voxtral_realtime"}[layout]
    if layout == "crispasr":
        p = "voxtral4b."
        kvs += [("add_uint32", p + "audio.n_layers", e.n_layers), ("add_uint32", p + "audio.d_model", e.dim),
                ("add_uint32", p + "audio.n_heads", e.n_heads), ("add_uint32", p + "audio.head_dim", e.head_dim),
                ("add_uint32", p + "audio.ff_dim", e.hidden_dim), ("add_float32", p + "audio.rope_theta", e.rope_theta),
                ("add_uint32", p + "llm.n_layers", d.n_layers), ("add_uint32", p + "llm.d_model", d.dim),
                ("add_uint32", p + "llm.n_heads", d.n_heads), ("add_uint32", p + "llm.n_kv_heads", d.n_kv_heads),
                ("add_uint32", p + "llm.head_dim", d.head_dim), ("add_uint32", p + "llm.ff_dim", d.hidden_dim),
                ("add_uint32", p + "llm.vocab_size", d.vocab_size), ("add_uint32", p + "llm.ada_norm_dim", 32),
                ("add_uint32", p + "proj.frame_stack", 4), ("add_string", "tokenizer.tekken.pattern", "PAT"),
                ("array", "tokenizer.tekken.specials", specials, gguf.GGUFValueType.STRING)]
        blob = b"".join(struct.pack("<H", len(pc)) + pc for pc in pieces)
        tensors.append(("tokenizer.tekken.vocab_tensor", np.frombuffer(blob, np.uint8).astype(np.float32), None))
        tensors.append(("audio.mel_filters", np.zeros((201, 128), np.float32), None))
    elif layout == "transcribe_cpp":
        p = "stt.voxtral_realtime."
        kvs += [("add_uint32", p + "encoder.n_layers", e.n_layers), ("add_uint32", p + "encoder.d_model", e.dim),
                ("add_uint32", p + "encoder.n_heads", e.n_heads), ("add_uint32", p + "encoder.head_dim", e.head_dim),
                ("add_uint32", p + "encoder.ffn_dim", e.hidden_dim), ("add_uint32", p + "decoder.n_layers", d.n_layers),
                ("add_uint32", p + "decoder.hidden_size", d.dim), ("add_uint32", p + "decoder.intermediate_size", d.hidden_dim),
                ("add_uint32", p + "decoder.n_heads", d.n_heads), ("add_uint32", p + "decoder.n_kv_heads", d.n_kv_heads),
                ("add_uint32", p + "decoder.head_dim", d.head_dim), ("add_uint32", p + "decoder.vocab_size", d.vocab_size),
                ("add_uint32", p + "time.ada_hidden", 32), ("add_string", "tokenizer.ggml.model", "gpt2"),
                ("array", "tokenizer.ggml.tokens", specials + ["a", "Ġb", "ab"], gguf.GGUFValueType.STRING),
                ("array", "tokenizer.ggml.token_type", [3] * 1000 + [1, 1, 1], gguf.GGUFValueType.INT32)]
        tensors.append(("frontend.window", np.zeros(400, np.float32), None))
    elif layout == "voxtral_cpp":
        p = "voxtral."
        kvs += [("add_int32", p + "encoder.dim", e.dim), ("add_int32", p + "encoder.n_layers", e.n_layers),
                ("add_int32", p + "encoder.n_heads", e.n_heads), ("add_int32", p + "encoder.head_dim", e.head_dim),
                ("add_int32", p + "encoder.hidden_dim", e.hidden_dim), ("add_int32", p + "decoder.dim", d.dim),
                ("add_int32", p + "decoder.n_layers", d.n_layers), ("add_int32", p + "decoder.n_heads", d.n_heads),
                ("add_int32", p + "decoder.n_kv_heads", d.n_kv_heads), ("add_int32", p + "decoder.head_dim", d.head_dim),
                ("add_int32", p + "decoder.hidden_dim", d.hidden_dim), ("add_int32", p + "vocab_size", d.vocab_size),
                ("add_int32", p + "ada_rms_norm_t_cond_dim", 32), ("add_int32", p + "audio.n_left_pad_tokens", 32),
                ("add_string", p + "tokenizer.pattern", "PAT"),
                ("array", p + "tokenizer.vocab_token_bytes_b64",
                 [base64.b64encode(pc).decode() for pc in pieces], gguf.GGUFValueType.STRING),
                ("array", p + "tokenizer.special_token_strings", specials, gguf.GGUFValueType.STRING)]
    elif layout == "audio_cpp":
        files = {"config.json": json.dumps(hf.hf_config_dict(cfg)).encode(), "tekken.json": _tekken_bytes()}
        offsets = np.cumsum([0] + [len(v) for v in files.values()]).tolist()
        kvs += [("add_uint32", "audiocpp.model_spec.version", 1),
                ("add_string", "audiocpp.model_spec.family", "voxtral_realtime"),
                ("array", "audiocpp.embedded_files.names", list(files), gguf.GGUFValueType.STRING),
                ("array", "audiocpp.embedded_files.offsets", offsets, gguf.GGUFValueType.UINT64),
                ("array", "audiocpp.embedded_files.data", list(b"".join(files.values())), gguf.GGUFValueType.UINT8)]
    _write(path, arch, kvs, tensors)
    return expect


LAYOUTS = ["trevors", "crispasr", "transcribe_cpp", "audio_cpp", "voxtral_cpp"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_community_gguf_layouts(tmp_path, toy, layout):
    cfg, weights = toy
    path = tmp_path / f"{layout}.gguf"
    expect = _layout_file(path, layout, cfg, weights, np.random.default_rng(9))
    got_cfg, tensors, meta = read_gguf(path)
    assert meta["layout"] == layout
    assert got_cfg == cfg
    got = dict(tensors)
    assert set(got) == set(expect)
    for name, (kind, gtype, value) in expect.items():
        assert meta["tensor_types"][name] == gtype
        if kind == "quant":
            assert isinstance(got[name], QuantTensor) and np.array_equal(got[name].data, value), name
        else:
            assert isinstance(got[name], np.ndarray) and np.array_equal(got[name], value), name
    if layout == "trevors":
        assert meta["qtype"] == "q4_0" and meta["left_pad_tokens"] == 76 and meta["tokenizer_json"] is None
        # browser shards: plain byte chunks of the file
        data = path.read_bytes()
        shards = []
        for i in range(0, len(data), 300_000):
            shard = tmp_path / f"shard-{i:08d}"
            shard.write_bytes(data[i:i + 300_000])
            shards.append(shard)
        assert len(shards) > 1
        _, tensors2, _ = read_gguf(shards)
        assert all(np.array_equal(getattr(v, "data", v), getattr(got[n], "data", got[n])) for n, v in tensors2)
    else:
        assert meta["left_pad_tokens"] == 32
        tok = json.loads(meta["tokenizer_json"])
        assert len(tok["special_tokens"]) == 1000
        if layout != "audio_cpp":
            assert b"ab" in [base64.b64decode(v["token_bytes"]) for v in tok["vocab"]]
    if layout in ("transcribe_cpp", "voxtral_cpp"):
        assert "tok_embeddings.weight" in meta["transcoded"]
    if layout in ("crispasr", "transcribe_cpp"):
        assert meta["ignored_tensors"]


def test_gguf_errors(tmp_path, toy):
    cfg, weights = toy
    good = tmp_path / "good.gguf"
    write_voxc_gguf(weights, cfg, None, good, "q8_0")
    data = good.read_bytes()

    def variant(name, blob):
        p = tmp_path / name
        p.write_bytes(blob)
        return p

    with pytest.raises(VoxcError, match="truncated"):
        read_gguf(variant("cut.gguf", data[:-5000]))
    # Patch the type id of one tensor in the index to 99.
    key = b"dec.layers.1.feed_forward.w2.weight"
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    bad = bytearray(data)
    struct.pack_into("<I", bad, at + 4 + 8 * n_dims, 99)
    with pytest.raises(VoxcError, match=r"dec\.layers\.1\.feed_forward\.w2\.weight: unknown GGML type id 99"):
        read_gguf(variant("type.gguf", bytes(bad)))
    with pytest.raises(VoxcError, match="not a readable GGUF"):
        read_gguf(variant("junk.gguf", b"not a gguf at all" * 10))
    with pytest.raises(VoxcError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
    wrong = dict(weights)
    wrong["dec.layers.0.attention.wk.weight"] = np.zeros((64, 256), np.float32)
    with pytest.raises(VoxcError, match="wk.weight has shape"):
        write_voxc_gguf(wrong, cfg, None, tmp_path / "w.gguf", "q8_0")
    missing = {k: v for k, v in weights.items() if k != "enc.norm.weight"}
    with pytest.raises(VoxcError, match="missing"):
        write_voxc_gguf(missing, cfg, None, tmp_path / "w.gguf", "q8_0")

    # community files: a wrong shape, a missing tensor, a text-only llama.cpp file
    path = tmp_path / "t.gguf"
    _write(path, "voxtral", [], [(voxc_to_official(n), w[:, :-32] if n == "dec.layers.1.feed_forward.w3.weight" else w, None)
                                for n, w in weights.items()])
    with pytest.raises(VoxcError, match=r"layers\.1\.feed_forward\.w3\.weight .*has shape \(512, 224\)"):
        read_gguf(path, config=cfg)
    _write(path, "voxtral", [], [(voxc_to_official(n), w, None) for n, w in weights.items() if n != "enc.norm.weight"])
    with pytest.raises(VoxcError, match="lacks 1 tensor.*enc.norm.weight"):
        read_gguf(path, config=cfg)
    _write(path, "llama", [], [("token_embd.weight", np.zeros((8, 32), np.float32), None)])
    with pytest.raises(VoxcError, match="llama.cpp text model"):
        read_gguf(path)


@pytest.mark.parametrize("target", ["webgpu", "cuda"])
def test_gpu_gemm_dispatches_one_row_to_the_gemv(target):
    """A symbolic-row GPU kernel holds the batch-1 GEMV, the GEMV of 4-row chunks (up to 24 rows on CUDA, 32 on WebGPU) and the
    tiled GEMM (CUDA also a 2-row GEMV), and the host chooses by the row count."""
    if target == "cuda":
        from targets import cuda as tc
        if shutil.which("nvcc") is None:
            pytest.skip("no nvcc")
    func = make_kernel(QType.Q4_K, 64, 256, None, target=target)
    text = func.script()
    chunked_up_to = {"cuda": 24, "webgpu": 32}[target]
    assert "tvm_thread_invariant(m == 1)" in text and f"tvm_thread_invariant(m <= {chunked_up_to})" in text
    gemv_body = make_kernel(QType.Q4_K, 64, 256, 1, target=target).script()
    assert gemv_body.count("T.thread_binding") and text.count("T.thread_binding") > gemv_body.count("T.thread_binding")
    if target == "webgpu":
        ex = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm"}))
        assert len(json.loads(ex.mod.imports[0].inspect_source("func_info"))) == 3
    else:
        tc.prepare_toolchain()
        target_obj = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
        from targets.base import CompileReport
        report = CompileReport()
        with target_obj, tc.fatbin_compiler(("sm_90",), report):
            tvm.compile(tvm.IRModule({"main": func}), target=target_obj)
        assert report.device_source.count("__global__") >= 4


# ---- int8-activation GEMV (schedules/int8_gemv.py) ----------------------------------------------

def _int8_reference(x, wd, qtype):
    """x quantized per 32 elements as the kernel does (Q4_K's min term uses the float group sums)."""
    g = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = (np.round(g * inv) * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)
    return xq @ wd.T


@pytest.mark.parametrize("isa", ["vnni", "avx2", "generic"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.value)
def test_llvm_int8_gemv(qtype, isa):
    from schedules import int8_gemv
    native = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    have = int8_gemv.int8_isa(tvm.target.codegen.llvm_get_cpu_features(native))
    if isa != "generic" and not (have == isa or (have, isa) == ("vnni", "avx2")):
        pytest.skip(f"this CPU has no {isa}")
    if not int8_gemv.supports(qtype, isa):
        pytest.skip(f"no int8 {qtype.value} kernel on {isa}")
    # rows 1 (one per accumulator), 2 (two slots), 3 and 5 (four slots, padded), 4 and 16 (whole blocks)
    for n, k, batches in [(37, 256, (1, 3, 16)), (64, 512, (1, 2, 4, 5)), (8, 1024, (1, 3))]:
        for batch in batches:
            params, x, wd = _case(qtype, n, k, batch)
            func = make_kernel(qtype, n, k, batch, int8=isa)
            assert "_i8" in func.attrs["global_symbol"]
            lib = tvm.compile(tvm.IRModule({"main": func}), target=native if isa != "generic" else LLVM)
            args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, params["qweight"], params["scales"],
                                                                np.zeros((batch, n), np.float32))]
            lib[func.attrs["global_symbol"]](*args)
            y = args[-1].numpy().astype(np.float64)
            bound = np.abs(x).astype(np.float64) @ np.abs(wd).T
            ref = x.astype(np.float64) @ wd.T
            # against the int8-rounded activations: float32 accumulation error only (Q4_K: its min
            # term uses the exact group sums, so the reference differs by the rounding there)
            tight = 2e-6 if qtype is not QType.Q4_K else 5e-3
            assert (np.abs(y - _int8_reference(x, wd, qtype)) <= tight * bound).all()
            # against float activations: the int8 rounding, about 1e-3 of sum |x| |w| (measured
            # 1.0e-3 .. 1.3e-3 at 64x512)
            assert (np.abs(y - ref) <= 5e-3 * bound).all()


def test_int8_isa_choice_and_aarch64_dotprod_compiles():
    from schedules import int8_gemv
    assert int8_gemv.int8_isa({"+avx512vnni", "+avx512vl", "+avx2"}) == "vnni"
    assert int8_gemv.int8_isa({"avxvnni", "avx2"}) == "vnni"
    assert int8_gemv.int8_isa({"avx2", "fma"}) == "avx2"
    assert int8_gemv.int8_isa({"neon", "dotprod"}) == "dotprod"
    assert int8_gemv.int8_isa({"sse2"}) == "generic"
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    for qtype in QTYPES:
        func = make_kernel(qtype, 64, 512, 2, int8="dotprod")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=arm)
        assert "sdot" in lib.mod.inspect_source("asm") if hasattr(lib, "mod") else True
