"""Sliding-window attention over a ring-buffer KV cache, and the in-place append into that ring.

Why ring buffers and not TVM's PagedKVCache (see ../shared/research/kv_cache.md): the paged
cache's per-sequence window is StreamingLLM-style (exact only for one-token steps with W-1) and
its exact per-layer mode crashes on llvm in TVM 0.27, while Voxtral's encoder is fed in chunks of
many frames and both towers must match the reference's exact ``q - W < k <= q`` mask.  A ring of W
slots per layer and sequence gives an exact window for chunks of any length, fixed memory, and a
batch of sequences at different positions (one cache slot per sequence).

Cache layout, one tensor per tower: ``[n_layers, 2 (k, v), n_slots, window, n_kv_heads, head_dim]``.
Position ``p`` of a sequence lives in ring row ``p mod window``.  Queries of a chunk attend to the
ring as it was before the chunk (read first) plus the chunk's own keys; then the chunk's last
``min(n, window)`` keys are written into the ring.
"""
from __future__ import annotations

from tvm import te, tirx

NEG_INF = -3.0e38


def _ring_position(start, row, window):
    """Absolute position held by ring row ``row`` just before a chunk that starts at ``start`` (may be < 0)."""
    last = start - 1
    return last - tirx.floormod(last - row, window)


def ring_attention_func(n_heads: int, n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32"):
    """PrimFunc: out[b, i, h, :] = softmax-weighted sum over visible ring rows and chunk keys.

    Arguments: q [b, n, H, D], k/v [b, n, Hkv, D] (RoPE already applied to q and k),
    cache [L, 2, S, W, Hkv, D], slots [b] int32, starts [b] int32 (position of the chunk's first
    token), layer (scalar). Returns out [b, n, H, D].
    """
    b, n = te.var("b", "int64"), te.var("n", "int64")
    n_layers, n_slots = te.var("n_layers", "int64"), te.var("n_slots", "int64")
    layer = te.var("layer", "int64")
    group = n_heads // n_kv_heads
    scale = tirx.const(head_dim ** -0.5, dtype)
    q = te.placeholder((b, n, n_heads, head_dim), dtype, name="q")
    k = te.placeholder((b, n, n_kv_heads, head_dim), dtype, name="k")
    v = te.placeholder((b, n, n_kv_heads, head_dim), dtype, name="v")
    cache = te.placeholder((n_layers, 2, n_slots, window, n_kv_heads, head_dim), dtype, name="cache")
    slots = te.placeholder((b,), "int32", name="slots")
    starts = te.placeholder((b,), "int32", name="starts")
    n_keys = window + n

    def visible(bi, i, j):
        start = starts[bi].astype("int64")
        query_pos = start + i
        ring_pos = _ring_position(start, j, window)
        from_ring = tirx.all(ring_pos >= 0, ring_pos > query_pos - window)
        jj = j - window
        from_chunk = tirx.all(jj <= i, i - jj < window)
        return tirx.if_then_else(j < window, from_ring, from_chunk)

    def key_or_value(kv_index, chunk, bi, j, kh, d):
        slot = slots[bi].astype("int64")
        return tirx.if_then_else(
            j < window,
            cache[layer, kv_index, slot, tirx.min(j, window - 1), kh, d],
            chunk[bi, tirx.max(j - window, 0), kh, d])

    rd = te.reduce_axis((0, head_dim), name="rd")
    dots = te.compute(
        (b, n_heads, n, n_keys),
        lambda bi, h, i, j: te.sum(q[bi, i, h, rd] * key_or_value(0, k, bi, j, h // group, rd), axis=rd),
        name="dots")
    scores = te.compute(
        (b, n_heads, n, n_keys),
        lambda bi, h, i, j: tirx.if_then_else(visible(bi, i, j), dots[bi, h, i, j] * scale,
                                              tirx.const(NEG_INF, dtype)),
        name="scores")
    rj = te.reduce_axis((0, n_keys), name="rj")
    row_max = te.compute((b, n_heads, n), lambda bi, h, i: te.max(scores[bi, h, i, rj], axis=rj), name="row_max")
    weights = te.compute((b, n_heads, n, n_keys),
                         lambda bi, h, i, j: te.exp(scores[bi, h, i, j] - row_max[bi, h, i]), name="weights")
    rs = te.reduce_axis((0, n_keys), name="rs")
    row_sum = te.compute((b, n_heads, n), lambda bi, h, i: te.sum(weights[bi, h, i, rs], axis=rs), name="row_sum")
    ro = te.reduce_axis((0, n_keys), name="ro")
    weighted = te.compute(
        (b, n, n_heads, head_dim),
        lambda bi, i, h, d: te.sum(weights[bi, h, i, ro] * key_or_value(1, v, bi, ro, h // group, d), axis=ro),
        name="weighted")
    out = te.compute((b, n, n_heads, head_dim),
                     lambda bi, i, h, d: weighted[bi, i, h, d] / row_sum[bi, h, i], name="attn_out")
    return te.create_prim_func([q, k, v, cache, slots, starts, layer, out]).without_attr("global_symbol")


def ring_append_func(n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32"):
    """In-place PrimFunc writing a chunk's last ``min(n, window)`` keys and values into the ring."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def ring_append(var_cache: T.handle, var_k: T.handle, var_v: T.handle, var_slots: T.handle,
                    var_starts: T.handle, layer: T.int64):
        T.func_attr({"tirx.noalias": True})
        n_layers, n_slots, b, n = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (n_layers, 2, n_slots, window, n_kv_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (b, n, n_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (b, n, n_kv_heads, head_dim), dtype)
        slots = T.match_buffer(var_slots, (b,), "int32")
        starts = T.match_buffer(var_starts, (b,), "int32")
        for bi, i, h, d in T.grid(b, T.min(n, window), n_kv_heads, head_dim):
            with T.sblock("append"):
                vb, vi, vh, vd = T.axis.remap("SSSS", [bi, i, h, d])
                # chunk token (n - min(n, W) + vi) goes to ring row (start + that index) mod W
                cache[layer, 0, T.Cast("int64", slots[vb]),
                      T.floormod(T.Cast("int64", starts[vb]) + n - T.min(n, window) + vi, window), vh, vd] = \
                    k[vb, n - T.min(n, window) + vi, vh, vd]
                cache[layer, 1, T.Cast("int64", slots[vb]),
                      T.floormod(T.Cast("int64", starts[vb]) + n - T.min(n, window) + vi, window), vh, vd] = \
                    v[vb, n - T.min(n, window) + vi, vh, vd]

    return ring_append
