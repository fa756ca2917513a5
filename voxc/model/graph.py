"""The whole Voxtral Realtime model as one Relax module: the graph every target compiles.

Exported entry points (all batched over ``b`` sequences; ``slots`` picks each sequence's row in
the KV caches, ``starts`` its absolute position):

* ``mel(samples)``: PCM window -> log-mel frames (see voxc.model.mel for the framing contract).
* ``encode(mel, conv0_state, conv1_state, enc_cache, slots, starts)``: a chunk of mel frames
  (a multiple of 8 per text token) -> one audio embedding per text token, new conv states, cache.
* ``encode_stages``: the same computation, also returning the conv-stem and encoder outputs
  (used by the stage-by-stage oracle tests; no separate model).
* ``decode(tokens, audio, audio_offsets, delay_tokens, dec_cache, slots, starts)``: embeds the
  tokens, adds the audio embedding rows ``audio_offsets .. +n``, runs the decoder, and returns the
  last position's logits, its greedy token, and the cache.
"""
from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from voxc.model.adapter import Adapter
from voxc.model.config import ModelConfig
from voxc.model.decoder import Decoder
from voxc.model.encoder import Encoder
from voxc.model.layers import gather_rows, sinusoidal_embedding


class VoxtralGraph(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str = "float32", mel_dtype: str = "float64"):
        from voxc.model.mel import LogMel

        self.cfg = cfg
        self.dtype = dtype
        self.mel_frontend = LogMel(cfg.audio, cfg.encoder.num_mel_bins, compute_dtype=mel_dtype)
        self.enc = Encoder(cfg.encoder, dtype)
        self.adapter = Adapter(cfg.encoder.dim, cfg.decoder.dim, cfg.audio.downsample_factor, dtype)
        self.tok_embeddings = nn.Embedding(cfg.decoder.vocab_size, cfg.decoder.dim, dtype=dtype)
        self.dec = Decoder(cfg.decoder, dtype)

    # ---- audio side -------------------------------------------------------------------------
    def mel(self, samples: nn.Tensor):
        return self.mel_frontend(samples)

    def encode_stages(self, mel, conv0_state, conv1_state, enc_cache, slots, starts):
        frames, conv0_state, conv1_state = self.enc.stem(mel, conv0_state, conv1_state)
        hidden, enc_cache = self.enc.transformer(frames, enc_cache, slots, starts)
        audio = self.adapter(hidden)
        return audio, conv0_state, conv1_state, enc_cache, frames, hidden

    def encode(self, mel, conv0_state, conv1_state, enc_cache, slots, starts):
        return self.encode_stages(mel, conv0_state, conv1_state, enc_cache, slots, starts)[:4]

    # ---- text side --------------------------------------------------------------------------
    def decode(self, tokens, audio, audio_offsets, delay_tokens, dec_cache, slots, starts):
        b, n = tokens.shape
        embedded = op.take(self.tok_embeddings.weight, op.reshape(tokens, (b * n,)), axis=0)
        x = op.reshape(embedded, (b, n, self.cfg.decoder.dim)) + gather_rows(audio, audio_offsets, n)
        t_cond = sinusoidal_embedding(delay_tokens, self.cfg.decoder.dim)
        hidden, dec_cache = self.dec(x, t_cond, dec_cache, slots, starts)
        last = _last_row(hidden)
        logits = op.matmul(last, op.permute_dims(self.tok_embeddings.weight))
        next_tokens = op.topk(logits, k=1, axis=-1, ret_type="indices", dtype="int32")
        return logits, op.reshape(next_tokens, (b,)), dec_cache

    # ---- export -----------------------------------------------------------------------------
    def export_spec(self) -> dict:
        e, d = self.cfg.encoder, self.cfg.decoder
        mel_bins = e.num_mel_bins
        enc_cache = spec.Tensor([e.n_layers, 2, "enc_slots", e.sliding_window, e.n_heads, e.head_dim], self.dtype)
        dec_cache = spec.Tensor([d.n_layers, 2, "dec_slots", d.sliding_window, d.n_kv_heads, d.head_dim],
                                self.dtype)
        encode_args = {
            "mel": spec.Tensor(["b", mel_bins, "t"], self.dtype),
            "conv0_state": spec.Tensor(["b", mel_bins, Encoder.CONV0_CONTEXT], self.dtype),
            "conv1_state": spec.Tensor(["b", e.dim, Encoder.CONV1_CONTEXT], self.dtype),
            "enc_cache": enc_cache,
            "slots": spec.Tensor(["b"], "int32"),
            "starts": spec.Tensor(["b"], "int32"),
        }
        return {
            "mel": {"samples": spec.Tensor(["n_samples"], "float32")},
            "encode": dict(encode_args),
            "encode_stages": dict(encode_args),
            "decode": {
                "tokens": spec.Tensor(["b", "n"], "int32"),
                "audio": spec.Tensor(["b", "m", d.dim], self.dtype),
                "audio_offsets": spec.Tensor(["b"], "int32"),
                "delay_tokens": spec.Tensor(["b"], "float32"),
                "dec_cache": dec_cache,
                "slots": spec.Tensor(["b"], "int32"),
                "starts": spec.Tensor(["b"], "int32"),
            },
        }


def _last_row(hidden: nn.Tensor) -> nn.Tensor:
    """[b, n, d] -> [b, d]: the last position of each sequence."""

    def compute(h: te.Tensor):
        return te.compute((h.shape[0], h.shape[2]), lambda bi, d: h[bi, h.shape[1] - 1, d], name="last_row")

    return op.tensor_expr_op(compute, "last_row", [hidden])
