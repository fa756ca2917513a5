"""Stacked projections (q/k/v as ``wqkv``, w1/w3 as ``w13``): the graph's weight is its parts' rows,
concatenated exactly for every storage, from checkpoints that keep the parts separate."""
from __future__ import annotations

import numpy as np
import pytest

from voxc.loader.names import (STACKED_PROJECTIONS, expected_shapes, graph_weight_storage, stacked_into, stacked_parts,
                               unstack)
from voxc.loader.source import WeightSource
from voxc.loader.tiny import tiny_weights
from voxc.quant.formats import QType, QuantTensor, from_kernel_layout, quantize_tensor, to_kernel_layout
from voxc.quant.gguf_writer import write_voxc_gguf
from voxc.tokenizer import write_tiny_tekken

from references import q4k_config


def test_stacked_names_map_both_ways():
    cfg = q4k_config()
    want = expected_shapes(cfg)
    for tower in ("enc", "dec"):
        for stack, parts in STACKED_PROJECTIONS.items():
            name = f"{tower}.layers.0.{stack}.weight"
            assert stacked_parts(name) == tuple(f"{tower}.layers.0.{p}.weight" for p in parts)
            assert all(p in want and stacked_into(p) == name for p in stacked_parts(name))
    assert stacked_parts("dec.layers.0.attention.wo.weight") is None
    assert stacked_into("dec.layers.0.feed_forward.w2.weight") is None


def test_stacked_storage_is_the_parts_or_the_most_precise():
    q, k, v = stacked_parts("dec.layers.1.attention.wqkv.weight")
    stack = "dec.layers.1.attention.wqkv.weight"
    assert graph_weight_storage(stack, 256, "q4_k") is QType.Q4_K
    assert graph_weight_storage(stack, 96, "q4_k") is QType.Q8_0          # no part fits Q4_K's blocks
    assert graph_weight_storage(stack, 256, "q4_k", {v: QType.Q8_0}) is QType.Q8_0
    assert graph_weight_storage(stack, 256, "q4_0", {q: QType.Q4_K}) is QType.Q8_0   # a 4-bit mix
    assert graph_weight_storage(stack, 256, "q4_k", {k: None}) is None     # a float part keeps it float


@pytest.fixture(scope="module")
def q4k_gguf(tmp_path_factory):
    """voxc's Q4_K GGUF of a tiny model whose widths fit Q4_K: every projection stored in blocks."""
    root = tmp_path_factory.mktemp("stacked")
    cfg = q4k_config()
    tekken = write_tiny_tekken(root / "tekken.json")
    path = root / "tiny-q4_k.gguf"
    write_voxc_gguf(tiny_weights(cfg, seed=3), cfg, tekken.read_bytes(), path, "q4_k")
    return WeightSource(path, progress=False)


@pytest.mark.parametrize("stack", ["dec.layers.1.attention.wqkv", "enc.layers.0.attention.wqkv",
                                   "dec.layers.0.feed_forward.w13"])
def test_quantized_parts_stack_row_blocks_exactly(q4k_gguf, stack):
    """Q4_K's 256-wide super-blocks run along a row: the stacked kernel layout is the layout of the
    parts' GGUF blocks concatenated row-wise, and dequantizes to the parts' rows."""
    parts = [q4k_gguf.get(p) for p in stacked_parts(stack + ".weight")]
    assert all(isinstance(p, QuantTensor) and p.qtype is QType.Q4_K for p in parts)
    rows = sum(p.shape[0] for p in parts)
    whole = QuantTensor(QType.Q4_K, (rows, parts[0].shape[1]), np.concatenate([p.data for p in parts]))
    stacked = {f: q4k_gguf.graph_param(f"{stack}.{f}", "q4_k", {}) for f in ("qweight", "scales")}
    for field, array in to_kernel_layout(whole).items():
        np.testing.assert_array_equal(stacked[field], array)
    np.testing.assert_array_equal(from_kernel_layout(stacked, QType.Q4_K, whole.shape).dequantize(),
                                  np.concatenate([p.dequantize() for p in parts]))
    # a dense build of the same file: the parts dequantized, stacked
    np.testing.assert_array_equal(q4k_gguf.graph_param(stack + ".weight", None, {}),
                                  np.concatenate([p.dequantize() for p in parts]))


def test_stacked_bias_has_zeros_for_a_part_without_one(q4k_gguf):
    """The encoder's wq and wv have biases, its wk none: k's rows of the stacked bias add nothing."""
    q, k, v = (q4k_gguf.get(f"enc.layers.0.attention.w{p}.weight") for p in "qkv")
    bias = q4k_gguf.graph_param("enc.layers.0.attention.wqkv.bias", "q4_k", {})
    np.testing.assert_array_equal(bias, np.concatenate([q4k_gguf.get("enc.layers.0.attention.wq.bias"),
                                                        np.zeros(k.shape[0]),
                                                        q4k_gguf.get("enc.layers.0.attention.wv.bias")]))


def test_requantized_parts_share_the_stack_storage(q4k_gguf):
    """A part the file stores in another type than the stack's is re-quantized to the stack's."""
    stack = "dec.layers.0.attention.wqkv"
    q, k, v = stacked_parts(stack + ".weight")
    stacked = {f: q4k_gguf.graph_param(f"{stack}.{f}", "q4_k", {v: QType.Q8_0}) for f in ("qweight", "scales")}
    parts = [quantize_tensor(q4k_gguf.get(p).dequantize(), QType.Q8_0) for p in (q, k, v)]
    rows = sum(p.shape[0] for p in parts)
    np.testing.assert_array_equal(from_kernel_layout(stacked, QType.Q8_0, (rows, parts[0].shape[1])).dequantize(),
                                  np.concatenate([p.dequantize() for p in parts]))


def test_unstack_gives_back_the_checkpoint_tensors(q4k_gguf):
    """A stacked graph tensor read back as its parts (bench/cuda_hf_baseline.py loads artifacts so)."""
    cfg = q4k_gguf.config
    bias = q4k_gguf.graph_param("enc.layers.0.attention.wqkv.bias", None, {})
    assert [(n, a.tolist()) for n, a in unstack("enc.layers.0.attention.wqkv.bias", bias, cfg)] == \
        [(n, q4k_gguf.get(n).tolist()) for n in ("enc.layers.0.attention.wq.bias", "enc.layers.0.attention.wv.bias")]
    weight = q4k_gguf.graph_param("dec.layers.0.feed_forward.w13.weight", None, {})
    for name, rows in unstack("dec.layers.0.feed_forward.w13.weight", weight, cfg):
        np.testing.assert_array_equal(rows, q4k_gguf.get(name).dequantize())
