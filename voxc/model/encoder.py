"""Causal conv stem + sliding-window transformer encoder, streamed in chunks of mel frames."""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from voxc.artifact import CONV0_CONTEXT, CONV1_CONTEXT
from voxc.config import EncoderConfig
from voxc.model.layers import (RingAttention, SwiGLU, conv1d_frames, last_frames, pre_norm_layers,
                               read_slot_rows, residual_rms_norm, rms_norm, write_slot_rows)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig, dtype: str, cache_dtype: str):
        self.attention_norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)
        self.attention = RingAttention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim,
                                       cfg.sliding_window, cfg.rope_theta, biases=True, dtype=dtype,
                                       cache_dtype=cache_dtype)
        self.ffn_norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden_dim, down_bias=True, dtype=dtype)

    def forward(self, x, h, next_norm, cache, pages, starts):
        """As voxc.model.layers.pre_norm_layers runs it."""
        attn, cache = self.attention(h, cache, pages, starts)
        x, h = residual_rms_norm(x, attn, self.ffn_norm)
        x, h = residual_rms_norm(x, self.feed_forward(h), next_norm)
        return x, h, cache


class Encoder(nn.Module):
    """Causal conv stem + transformer layers + final norm.

    Stem: conv0 (k3, s1) -> GELU -> conv1 (k3, s2) -> GELU, left-padded only.  The left context
    of each conv is carried between calls as state (CONV0_CONTEXT mel frames, CONV1_CONTEXT conv0
    outputs); a fresh stream starts from zero state, which is exactly the reference's zero left
    padding, so chunked and whole-clip runs agree.
    """

    CONV0_CONTEXT = CONV0_CONTEXT
    CONV1_CONTEXT = CONV1_CONTEXT

    def __init__(self, cfg: EncoderConfig, dtype: str, cache_dtype: str | None = None):
        self.cfg = cfg
        self.conv0 = nn.Conv1D(cfg.num_mel_bins, cfg.dim, 3, stride=1, bias=True, dtype=dtype)
        self.conv1 = nn.Conv1D(cfg.dim, cfg.dim, 3, stride=2, bias=True, dtype=dtype)
        self.layers = nn.ModuleList([EncoderLayer(cfg, dtype, cache_dtype or dtype) for _ in range(cfg.n_layers)])
        self.norm = rms_norm(cfg.dim, cfg.norm_eps, dtype)

    def stem(self, mel: nn.Tensor, conv0_state: nn.Tensor, conv1_state: nn.Tensor, slots: nn.Tensor):
        """mel [b, n_mels, t] (t even) -> frames [b, t/2, dim]; the conv contexts of each stream are
        read from and written back to its slot of the state rings ([slots, context, channels])."""
        b = mel.shape[0]
        zeros = op.zeros((b,), "int32")
        context0 = read_slot_rows(conv0_state, slots, zeros, self.CONV0_CONTEXT)
        h = op.gelu(conv1d_frames(context0, mel, self.conv0, stride=1, channels_first=True))
        context1 = read_slot_rows(conv1_state, slots, zeros, self.CONV1_CONTEXT)
        frames = op.gelu(conv1d_frames(context1, h, self.conv1, stride=2))
        conv0_state = write_slot_rows(conv0_state, last_frames(context0, mel, self.CONV0_CONTEXT, channels_first=True),
                                      slots, zeros)
        conv1_state = write_slot_rows(conv1_state, last_frames(context1, h, self.CONV1_CONTEXT), slots, zeros)
        return frames, conv0_state, conv1_state

    def transformer(self, frames, caches, pages, starts):
        """``caches``: each layer's paged ring KV cache, ``pages [b, pages_per_ring]`` the streams' rows
        of the encoder's page table; returns the output and the updated caches."""
        return pre_norm_layers(self.layers, self.norm, frames, caches, pages, starts)
