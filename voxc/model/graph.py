"""The whole Voxtral Realtime model as one Relax module: the graph every target compiles.

Exported entry points, all batched over ``b`` streams.  ``slots`` picks each stream's row in the
device-resident state, ``starts`` its absolute position (encoder frames for ``encode``, tokens
for ``decode``).  The state is updated in place and returned:

* ``conv0_state [S, 2, n_mels]``, ``conv1_state [S, 1, enc_dim]``: the causal convs' left context;
* ``enc_cache``, ``dec_cache``: ring KV caches (schedules/ring_attention.py);
* ``audio_ring [S, AUDIO_RING_ROWS, dec_dim]``: audio embeddings between encoder and decoder,
  token position ``p`` at row ``p mod AUDIO_RING_ROWS``.

* ``mel(samples [b, n])``: PCM windows -> log-mel frames (voxc.model.mel has the framing contract).
* ``encode(mel, conv0_state, conv1_state, enc_cache, audio_ring, slots, starts)``: a chunk of mel
  frames (8 per text token) -> one audio embedding per token, written to ``audio_ring``.
* ``encode_stages``: the same computation, also returning the conv-stem output, the encoder output
  and the embeddings (the stage-by-stage oracle tests use it; there is no separate model).
* ``decode(tokens [b, n], audio_ring, delay_tokens, dec_cache, slots, starts)``: embeds the tokens,
  adds the audio embeddings of the same positions, runs the decoder; returns the last position's
  logits, its greedy token and the updated cache.
"""
from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from voxc.model.adapter import Adapter
from voxc.model.config import AUDIO_RING_ROWS, ModelConfig
from voxc.model.decoder import Decoder
from voxc.model.encoder import Encoder
from voxc.model.layers import apply_storage_overrides, embedding, read_slot_rows, sinusoidal_embedding, write_slot_rows


class VoxtralGraph(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str = "float32", mel_dtype: str = "float64"):
        from voxc.model.mel import LogMel

        self.cfg = cfg
        self.dtype = dtype
        self.mel_frontend = LogMel(cfg.audio, cfg.encoder.num_mel_bins, compute_dtype=mel_dtype)
        self.enc = Encoder(cfg.encoder, dtype)
        self.adapter = Adapter(cfg.encoder.dim, cfg.decoder.dim, cfg.audio.downsample_factor, dtype)
        self.tok_embeddings = embedding(cfg.decoder.vocab_size, cfg.decoder.dim, dtype)
        self.dec = Decoder(cfg.decoder, dtype)
        apply_storage_overrides(self)

    # ---- audio side -------------------------------------------------------------------------
    def mel(self, samples: nn.Tensor):
        mel = self.mel_frontend(samples)
        return mel if self.dtype == "float32" else mel.astype(self.dtype)

    def encode_stages(self, mel, conv0_state, conv1_state, enc_cache, audio_ring, slots, starts):
        frames, conv0_state, conv1_state = self.enc.stem(mel, conv0_state, conv1_state, slots)
        hidden, enc_cache = self.enc.transformer(frames, enc_cache, slots, starts)
        audio = self.adapter(hidden)
        token_starts = op.divide(starts, op.full((1,), self.cfg.audio.downsample_factor, "int32"))
        audio_ring = write_slot_rows(audio_ring, audio, slots, token_starts)
        return conv0_state, conv1_state, enc_cache, audio_ring, frames, hidden, audio

    def encode(self, mel, conv0_state, conv1_state, enc_cache, audio_ring, slots, starts):
        return self.encode_stages(mel, conv0_state, conv1_state, enc_cache, audio_ring, slots, starts)[:4]

    # ---- text side --------------------------------------------------------------------------
    def decode(self, tokens, audio_ring, delay_tokens, dec_cache, slots, starts):
        n = tokens.shape[1]
        x = self.tok_embeddings.lookup(tokens) + read_slot_rows(audio_ring, slots, starts, n)
        t_cond = sinusoidal_embedding(delay_tokens, self.cfg.decoder.dim).astype(self.dtype)
        hidden, dec_cache = self.dec(x, t_cond, dec_cache, slots, starts)
        last = _last_row(hidden)
        logits = self.tok_embeddings.project(last)
        next_tokens = op.topk(logits, k=1, axis=-1, ret_type="indices", dtype="int32")
        return logits, op.reshape(next_tokens, (tokens.shape[0],)), dec_cache

    # ---- export -----------------------------------------------------------------------------
    def export_spec(self) -> dict:
        e, d = self.cfg.encoder, self.cfg.decoder
        mel_bins = e.num_mel_bins
        enc_cache = spec.Tensor([e.n_layers, 2, "n_slots", e.sliding_window, e.n_heads, e.head_dim], self.dtype)
        dec_cache = spec.Tensor([d.n_layers, 2, "n_slots", d.sliding_window, d.n_kv_heads, d.head_dim], self.dtype)
        state = {
            "conv0_state": spec.Tensor(["n_slots", Encoder.CONV0_CONTEXT, mel_bins], self.dtype),
            "conv1_state": spec.Tensor(["n_slots", Encoder.CONV1_CONTEXT, e.dim], self.dtype),
            "enc_cache": enc_cache,
            "audio_ring": spec.Tensor(["n_slots", AUDIO_RING_ROWS, d.dim], self.dtype),
        }
        encode_args = {"mel": spec.Tensor(["b", mel_bins, "t"], self.dtype), **state,
                       "slots": spec.Tensor(["b"], "int32"), "starts": spec.Tensor(["b"], "int32")}
        return {
            "mel": {"samples": spec.Tensor(["b", "n_samples"], "float32")},
            "encode": dict(encode_args),
            "encode_stages": dict(encode_args),
            "decode": {
                "tokens": spec.Tensor(["b", "n"], "int32"),
                "audio_ring": state["audio_ring"],
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
