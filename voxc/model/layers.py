"""Building blocks shared by the encoder and the decoder."""
from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from schedules.ring_attention import int8_roundtrip_func, ring_append_func, ring_attention_func
from schedules.row_norm import NAME as RESIDUAL_RMS_NORM, residual_rms_norm_te
from schedules.slot_rows import slot_rows_read, slot_rows_write_func

def linear(in_features: int, out_features: int, bias: bool = False, dtype: str = "float32") -> nn.Module:
    """A projection ``[out, in]``: a dense nn.Linear; voxc.model.quantization swaps it for a quantized
    layer where the build asks for one."""
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def rms_norm(dim: int, eps: float, dtype: str = "float32") -> nn.Module:
    return nn.RMSNorm(dim, axes=-1, epsilon=eps, bias=False, dtype=dtype)


def residual_rms_norm(x: nn.Tensor, residual: nn.Tensor, norm: nn.RMSNorm,
                      delay: tuple[nn.Tensor, nn.Tensor, int] | None = None) -> tuple[nn.Tensor, nn.Tensor]:
    """``(x + residual, norm(x + residual))`` as one kernel (schedules/row_norm.py; the GPU targets swap
    in its hand-written form by the PrimFunc's ``voxc_kernel`` attribute).  ``delay = (ring, slots,
    row)``: the norm's output is also scaled by row ``row`` of each stream's slot of ``ring`` (the
    decoder's ada-norm delay scales)."""
    eps = float(norm.epsilon)
    row = -1 if delay is None else delay[2]
    attrs = {"voxc_kernel": RESIDUAL_RMS_NORM, "voxc_eps": eps, "voxc_delay_row": row}

    def compute(xt, rt, wt, *ring_slots):
        return residual_rms_norm_te(xt, rt, wt, eps, (*ring_slots, row) if ring_slots else None)

    summed, normed = op.tensor_expr_op(compute, RESIDUAL_RMS_NORM + ("" if delay is None else "_scaled"),
                                       [x, residual, norm.weight, *(delay[:2] if delay else ())], attrs=attrs)
    return summed, normed


def pre_norm_layers(layers: nn.ModuleList, final_norm: nn.RMSNorm, x: nn.Tensor, caches, pages, starts,
                    extra=lambda index: ()):
    """Runs pre-norm transformer layers whose ``forward(x, h, next_norm, cache, pages, starts, *extra)``
    takes the residual stream ``x`` with its attention norm ``h`` and returns the new stream, ``next_norm``
    of it and the updated cache: each residual add meets the norm that reads it in one kernel
    (:func:`residual_rms_norm`), so a layer applies the next layer's attention norm, and the last
    layer the tower's final norm.  Returns the final norm's output and the updated caches."""
    updated = []
    h = layers[0].attention_norm(x)
    for index, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
        next_norm = layers[index + 1].attention_norm if index + 1 < len(layers) else final_norm
        x, h, cache = layer(x, h, next_norm, cache, pages, starts, *extra(index))
        updated.append(cache)
    return h, updated


def swiglu_gate(gate_up: nn.Tensor, hidden: int) -> nn.Tensor:
    """``silu(gate) * up`` of a stacked ``[..., 2 * hidden]`` projection output (gate columns first),
    as one elementwise kernel: a split, a silu and a multiply were three launches per layer (TVM's
    fusion does not cross the split's tuple).  Computed in float32, stored in the input's dtype."""

    def compute(t: te.Tensor):
        def value(*index):
            *lead, j = index
            gate = t[(*lead, j)].astype("float32")
            up = t[(*lead, j + hidden)].astype("float32")
            return (gate / (tirx.const(1.0, "float32") + tirx.exp(-gate)) * up).astype(t.dtype)

        return te.compute((*t.shape[:-1], hidden), value, name="swiglu_gate")

    return op.tensor_expr_op(compute, "swiglu_gate", [gate_up])


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); Mistral's names (w1 gate, w3 up, w2 down).

    w1 and w3 run as one matmul ``w13`` (rows of w1, then of w3; voxc.loader.names.STACKED_PROJECTIONS):
    one GEMV launch reads both weights of a decode step, one kernel (:func:`swiglu_gate`) gates them."""

    def __init__(self, dim: int, hidden_dim: int, down_bias: bool, dtype: str):
        self.hidden_dim = hidden_dim
        self.w13 = linear(dim, 2 * hidden_dim, dtype=dtype)
        self.w2 = linear(hidden_dim, dim, bias=down_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.w2(swiglu_gate(self.w13(x), self.hidden_dim))


def stacked_heads(x: nn.Tensor, first: int, heads: int, head_dim: int, name: str,
                  rope: tuple[nn.Tensor, float] | None = None) -> nn.Tensor:
    """Heads ``first .. first + heads`` of a stacked projection's output ``x [b, n, width]`` as
    ``[b, n, heads, head_dim]``, with the rotary embedding applied when ``rope = (starts, theta)``.

    One kernel reads its part of ``x`` directly: cutting q/k/v apart first (a split) and rotating
    afterwards cost five launches per layer instead of three.  RoPE is Mistral's interleaved-pair
    layout (pairs (2i, 2i+1) of each head rotate); ``starts [b]`` int32 is the absolute position of
    ``x[:, 0]``.  Frequencies follow the reference (float32 ``theta ** (-2i / d)`` times the float32
    position); the rotation is computed in float32 and stored back in x's dtype.
    """
    base = first * head_dim

    def column(xt, bi, i, h, d):
        return xt[bi, i, base + h * head_dim + d]

    def compute(xt: te.Tensor, *st: te.Tensor):
        shape = (xt.shape[0], xt.shape[1], heads, head_dim)
        if not st:
            return te.compute(shape, lambda bi, i, h, d: column(xt, bi, i, h, d), name=name)
        theta = rope[1]

        def rotated(bi, i, h, d):
            pair = d // 2
            exponent = (pair * 2).astype("float32") / tirx.const(head_dim, "float32")
            inv_freq = tirx.const(1.0, "float32") / tirx.power(tirx.const(theta, "float32"), exponent)
            angle = (st[0][bi] + i.astype("int32")).astype("float32") * inv_freq
            cos, sin = tirx.cos(angle), tirx.sin(angle)
            even = column(xt, bi, i, h, pair * 2).astype("float32")
            odd = column(xt, bi, i, h, pair * 2 + 1).astype("float32")
            rotated_value = tirx.if_then_else(d % 2 == 0, even * cos - odd * sin, even * sin + odd * cos)
            return rotated_value.astype(xt.dtype)

        return te.compute(shape, rotated, name=name)

    return op.tensor_expr_op(compute, name, [x] if rope is None else [x, rope[0]])


class RingAttention(nn.Module):
    """Self-attention with biases as configured, RoPE, exact sliding window over a ring KV cache in
    pages (this layer's own pool ``[n_pages, 2, page_rows, n_kv_heads, head_dim]``, or with
    ``cache_dtype`` int8 ``[n_pages, page_bytes]`` (voxc.artifact.Int8KvPage), read and written
    through the batch's page-table rows, schedules/ring_attention.py)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 window: int, rope_theta: float, biases: bool, dtype: str, cache_dtype: str | None = None):
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.rope_theta, self.dtype = window, rope_theta, dtype
        self.cache_dtype = cache_dtype or dtype
        # q, k and v as one matmul (rows of wq, wk, wv; voxc.loader.names.STACKED_PROJECTIONS): one
        # GEMV launch per decode step.  With biases, k's part of the stacked bias is zero (wk has none).
        self.wqkv = linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=biases, dtype=dtype)
        self.wo = linear(n_heads * head_dim, dim, bias=biases, dtype=dtype)

    def forward(self, x: nn.Tensor, cache: nn.Tensor, pages: nn.Tensor, starts: nn.Tensor):
        """``pages [b, pages_per_ring]``: each stream's row of the tower's page table (:func:`page_table_rows`)."""
        b, n, _ = x.shape
        qkv = self.wqkv(x)
        rope = (starts, self.rope_theta)
        q = stacked_heads(qkv, 0, self.n_heads, self.head_dim, "rope_q", rope)
        k = stacked_heads(qkv, self.n_heads, self.n_kv_heads, self.head_dim, "rope_k", rope)
        v = stacked_heads(qkv, self.n_heads + self.n_kv_heads, self.n_kv_heads, self.head_dim, "heads_v")
        k_seen, v_seen = k, v
        if self.cache_dtype == "int8":   # the chunk's keys as the cache will give them back
            k_seen, v_seen = (op.tensor_ir_op(int8_roundtrip_func(self.n_kv_heads, self.head_dim, self.dtype),
                                              "int8_roundtrip", args=[t], out=nn.Tensor.placeholder(t.shape, self.dtype))
                              for t in (k, v))
        attn = op.tensor_ir_op(
            ring_attention_func(self.n_heads, self.n_kv_heads, self.head_dim, self.window, self.dtype,
                                kv_dtype=self.cache_dtype),
            "ring_attention", args=[q, k_seen, v_seen, cache, pages, starts],
            out=nn.Tensor.placeholder((b, n, self.n_heads, self.head_dim), self.dtype))
        cache = op.tensor_ir_inplace_op(
            ring_append_func(self.n_kv_heads, self.head_dim, self.window, self.dtype, kv_dtype=self.cache_dtype),
            "ring_append", args=[cache, k, v, pages, starts], inplace_indices=[0],
            out=nn.Tensor.placeholder(cache.shape, self.cache_dtype))
        out = self.wo(op.reshape(attn, (b, n, self.n_heads * self.head_dim)))
        return out, cache


def sinusoidal_embedding(values: nn.Tensor, dim: int, theta: float = 10000.0) -> nn.Tensor:
    """[b] float -> [b, dim]: cat(cos(v f), sin(v f)), f = exp(-ln(theta) * i / (dim/2))."""
    half = dim // 2

    def compute(vt: te.Tensor):
        def emb(bi, j):
            i = tirx.if_then_else(j < half, j, j - half)
            freq = tirx.exp(tirx.const(-math.log(theta), "float32") * i.astype("float32")
                            / tirx.const(half, "float32"))
            angle = vt[bi] * freq
            return tirx.if_then_else(j < half, tirx.cos(angle), tirx.sin(angle))

        return te.compute((vt.shape[0], dim), emb, name="time_embedding")

    return op.tensor_expr_op(compute, "time_embedding", [values])


def page_table_rows(table: nn.Tensor, slots: nn.Tensor) -> nn.Tensor:
    """[n_slots, pages_per_ring] int32 page table -> [b, pages_per_ring]: the rows of streams ``slots``
    (gathered once per call; every layer's attention reads them)."""

    def compute(t: te.Tensor, s: te.Tensor):
        return te.compute((s.shape[0], t.shape[1]), lambda bi, j: t[s[bi].astype("int64"), j], name="page_rows")

    return op.tensor_expr_op(compute, "page_table_rows", [table, slots])


def read_slot_rows(ring: nn.Tensor, slots: nn.Tensor, offsets: nn.Tensor, count) -> nn.Tensor:
    """[n_slots, rows, width] ring -> [b, count, width]: each stream's rows offsets[b] .. + count."""
    return op.tensor_expr_op(lambda r, s, o: slot_rows_read(r, s, o, count), "slot_rows_read", [ring, slots, offsets])


def write_slot_rows(ring: nn.Tensor, rows: nn.Tensor, slots: nn.Tensor, offsets: nn.Tensor) -> nn.Tensor:
    """Write rows [b, n, width] into each stream's slot of the ring, in place; returns the ring."""
    return op.tensor_ir_inplace_op(
        slot_rows_write_func(int(ring.shape[2]), ring.dtype), "slot_rows_write",
        args=[ring, rows, slots, offsets], inplace_indices=[0], out=nn.Tensor.placeholder(ring.shape, ring.dtype))


def _context_then_body(context: te.Tensor, body: te.Tensor, channels_first: bool):
    """Frame ``f`` of the stream [context frames; body frames] as ``at(bi, f, channel)``: ``context``
    [b, c, channels], ``body`` [b, channels, t] (``channels_first``) or [b, t, channels].  Both indices
    are clamped, so neither branch reads out of bounds."""
    c = context.shape[1]

    def at(bi, f, ch):
        g = tirx.max(f - c, 0)
        from_body = body[bi, ch, g] if channels_first else body[bi, g, ch]
        return tirx.if_then_else(f < c, context[bi, tirx.min(f, c - 1), ch], from_body)

    length = body.shape[2] if channels_first else body.shape[1]
    return at, c + length


def last_frames(context: nn.Tensor, body: nn.Tensor, count: int, *, channels_first: bool = False) -> nn.Tensor:
    """The last ``count`` frames [b, count, channels] of [context; body] (the carried context of a
    causal conv; see :func:`conv1d_frames` for the layouts)."""

    def compute(ctx: te.Tensor, x: te.Tensor):
        at, length = _context_then_body(ctx, x, channels_first)
        return te.compute((ctx.shape[0], count, ctx.shape[2]), lambda bi, j, ch: at(bi, length - count + j, ch),
                          name="last_frames")

    return op.tensor_expr_op(compute, "last_frames", [context, body])


def conv1d_frames(context: nn.Tensor, body: nn.Tensor, conv: nn.Conv1D, stride: int, *,
                  channels_first: bool = False) -> nn.Tensor:
    """``conv`` (weight [out, in, k], bias) with no padding over the frames [context; body] -> [b, t_out,
    out], t_out = (frames - k) // stride + 1.  ``context`` [b, c, in] (a state ring's rows), ``body``
    [b, t, in] or, ``channels_first``, [b, in, t] (the mel input).

    A matmul: each output frame's k input frames side by side ([b, t_out, in * k], the weight's own
    order, gathered straight from the two inputs: no concatenated copy) times the weight viewed as
    [out, in * k].  So a target runs the stem's convolutions with its matmul schedules (TVM's default
    conv1d schedule took 24 ms of a 400 ms stream step on 2 CPU cores for 40 MFLOP)."""
    out_channels, in_channels, taps = (int(d) for d in conv.weight.shape)

    def columns(ctx: te.Tensor, x: te.Tensor):
        at, length = _context_then_body(ctx, x, channels_first)
        return te.compute((ctx.shape[0], (length - taps) // stride + 1, in_channels * taps),
                          lambda bi, i, ck: at(bi, i * stride + ck % taps, ck // taps), name="conv_columns")

    cols = op.tensor_expr_op(columns, "conv_columns", [context, body])
    weight = op.reshape(conv.weight, [out_channels, in_channels * taps])
    return op.matmul(cols, op.permute_dims(weight, [1, 0])) + conv.bias
