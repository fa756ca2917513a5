"""GQA decoder with ada-RMSNorm delay conditioning; token and audio embeddings are summed.

The delay conditioning depends on a stream's delay only: :meth:`Decoder.delay_scales` computes every
layer's scale once per stream (the graph's ``set_delay`` entry keeps them as per-stream state), and
each decode step reads them instead of recomputing two small matmuls per layer."""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from voxc.config import DecoderConfig
from voxc.model.layers import RingAttention, SwiGLU, linear, pre_norm_layers, residual_rms_norm, rms_norm


class AdaNorm(nn.Module):
    """Per-layer scale 1 + w_out(gelu(w_in t_cond)) applied after the FFN norm."""

    def __init__(self, dim: int, bottleneck: int, dtype: str):
        self.w_in = linear(dim, bottleneck, dtype=dtype)
        self.w_out = linear(bottleneck, dim, dtype=dtype)

    def forward(self, t_cond: nn.Tensor) -> nn.Tensor:
        return self.w_out(op.gelu(self.w_in(t_cond))) + 1.0


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str, cache_dtype: str):
        self.attention_norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)
        self.attention = RingAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                       cfg.sliding_window, cfg.rope_theta, biases=False, dtype=dtype,
                                       cache_dtype=cache_dtype)
        self.ffn_norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)
        self.ada_norm = AdaNorm(cfg.dim, cfg.ada_norm_dim, dtype)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden_dim, down_bias=False, dtype=dtype)

    def forward(self, x, h, next_norm, cache, pages, starts, delay_scales, slots, index):
        """As voxc.model.layers.pre_norm_layers runs it.  ``delay_scales [n_slots, n_layers, dim]``:
        the streams' ada-norm scales (AdaNorm's outputs, filled by ``set_delay``); this layer's is row
        ``index`` of each stream's slot."""
        attn, cache = self.attention(h, cache, pages, starts)
        x, h = residual_rms_norm(x, attn, self.ffn_norm, (delay_scales, slots, index))
        x, h = residual_rms_norm(x, self.feed_forward(h), next_norm)
        return x, h, cache


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str, cache_dtype: str | None = None):
        self.cfg = cfg
        self.layers = nn.ModuleList([DecoderLayer(cfg, dtype, cache_dtype or dtype) for _ in range(cfg.n_layers)])
        self.norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)

    def delay_scales(self, t_cond: nn.Tensor) -> list[nn.Tensor]:
        """``t_cond [b, dim]`` -> each layer's ada-norm scale ``[b, 1, dim]``, in layer order."""
        return [op.unsqueeze(layer.ada_norm(t_cond), 1) for layer in self.layers]

    def forward(self, x, delay_scales, caches, pages, slots, starts):
        """``delay_scales [n_slots, n_layers, dim]``: the per-stream state :meth:`delay_scales` fills;
        each layer reads its row of the streams' slots.  ``caches``: each layer's paged ring KV cache,
        ``pages [b, pages_per_ring]`` the streams' rows of the decoder's page table; returns the final
        hidden state and the updated caches."""
        return pre_norm_layers(self.layers, self.norm, x, caches, pages, starts,
                               lambda index: (delay_scales, slots, index))
