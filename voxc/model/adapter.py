"""4x frame concatenation + MLP: encoder frames -> one decoder-sized audio embedding per text token."""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from voxc.model.layers import linear


class Adapter(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, downsample: int, dtype: str):
        self.downsample = downsample
        self.encoder_dim = encoder_dim
        self.w_in = linear(encoder_dim * downsample, decoder_dim, dtype=dtype)
        self.w_out = linear(decoder_dim, decoder_dim, dtype=dtype)

    def forward(self, frames: nn.Tensor) -> nn.Tensor:
        """frames [b, t, enc_dim] (t a multiple of the downsample factor) -> [b, t/4, dec_dim]."""
        b, t, _ = frames.shape
        grouped = op.reshape(frames, (b, t // self.downsample, self.encoder_dim * self.downsample))
        return self.w_out(op.gelu(self.w_in(grouped)))
