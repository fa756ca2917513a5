"""The whole Voxtral Realtime model as one Relax module: the graph every target compiles.

Exported entry points, all batched over ``b`` streams.  ``slots`` picks each stream's row in the
device-resident state, ``starts`` its absolute position (encoder frames for ``encode``, tokens
for ``decode``).  The state is updated in place and returned:

* ``conv0_state [S, 2, n_mels]``, ``conv1_state [S, 1, enc_dim]``: the causal convs' left context;
* ``enc_cache``, ``dec_cache``: ring KV caches in pages (schedules/ring_attention.py), a tuple of one
  pool per layer ``[n_pages, 2, page_rows, kv_heads, head_dim]`` (each kernel binds only its layer's
  buffer; each layer's page count is its own symbolic dim, so a pool that grows layer by layer is
  valid at every step), and ``enc_pages``, ``dec_pages [S, pages_per_ring]`` int32: each tower's page
  table (voxc.runtime.kv_pages fills it), read only;
* ``audio_ring [S, AUDIO_RING_ROWS, dec_dim]``: audio embeddings between encoder and decoder,
  token position ``p`` at row ``p mod AUDIO_RING_ROWS``;
* ``delay_scales [S, n_dec_layers, dec_dim]``: each stream's ada-norm scales, for its delay.

* ``mel(samples [b, n])``: PCM windows -> log-mel frames (voxc.model.mel has the framing contract).
* ``encode(mel, conv0_state, conv1_state, enc_cache, enc_pages, audio_ring, slots, starts)``: a chunk of mel
  frames (8 per text token) -> one audio embedding per token, written to ``audio_ring``.
* ``encode_stages``: the same computation, also returning the conv-stem output, the encoder output
  and the embeddings (the stage-by-stage oracle tests use it; there is no separate model).
* ``set_delay(delay_tokens [b], delay_scales, slots)``: conditions each stream on its delay (in text
  tokens): writes the decoder's per-layer ada-norm scales, which depend on the delay only, to its
  slot of ``delay_scales [S, n_layers, dec_dim]``.  A stream calls it once, when it starts.
* ``decode(tokens [b, n], audio_ring, delay_scales, dec_cache, dec_pages, slots, starts)``: embeds the tokens,
  adds the audio embeddings of the same positions, runs the decoder; returns the last position's
  logits, its greedy token and the updated cache.
"""
from __future__ import annotations

import dataclasses

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from voxc.artifact import ENTRY_POINTS, StaticEntry, state_layout
from voxc.config import ModelConfig
from voxc.model.adapter import Adapter
from voxc.model.decoder import Decoder
from voxc.model.embedding import DenseEmbedding, split_token_table
from voxc.model.encoder import Encoder
from voxc.model.layers import page_table_rows, read_slot_rows, sinusoidal_embedding, write_slot_rows
from voxc.model.mel import LogMel
from voxc.model.quantization import QuantPlan, quantize_graph


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """What a target changes in the graph it compiles; every target starts from the same model.

    ``dtype``: activations, caches and float weights.  ``mel_dtype``: the mel front end's math
    (WebGPU has no f64).  ``quant``: which weights are stored quantized (voxc.model.quantization).
    ``token_table_part_bytes``: split a token table larger than this into row blocks (a device's
    largest storage binding; voxc.model.embedding).  ``packed_params``: the parameters as one
    packed tuple argument (the browser hands the VM one array per call instead of hundreds).
    ``static_entries``: static-shape copies of entry points (voxc.artifact.StaticEntry).
    ``kv_int8``: the towers whose KV caches hold 8-bit values and per-row scales (voxc.artifact.Int8KvPage).
    """

    dtype: str = "float32"
    mel_dtype: str = "float64"
    quant: QuantPlan = QuantPlan()
    token_table_part_bytes: int | None = None
    packed_params: bool = False
    static_entries: tuple[StaticEntry, ...] = ()
    kv_int8: tuple[str, ...] = ()


class VoxtralGraph(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str = "float32", mel_dtype: str = "float64",
                 kv_int8: tuple[str, ...] = ()):
        self.cfg = cfg
        self.dtype = dtype
        self.state = state_layout(cfg, kv_int8)
        self.mel_frontend = LogMel(cfg.audio, cfg.encoder.num_mel_bins, compute_dtype=mel_dtype)
        self.enc = Encoder(cfg.encoder, dtype, self.state["enc_cache"].dtype_for(dtype))
        self.adapter = Adapter(cfg.encoder.dim, cfg.decoder.dim, cfg.audio.downsample_factor, dtype)
        self.tok_embeddings = DenseEmbedding(cfg.decoder.vocab_size, cfg.decoder.dim, dtype)
        self.dec = Decoder(cfg.decoder, dtype, self.state["dec_cache"].dtype_for(dtype))

    @classmethod
    def build(cls, cfg: ModelConfig, options: GraphOptions = GraphOptions()) -> "VoxtralGraph":
        """The graph with ``options``' quantization and token-table split applied."""
        graph = cls(cfg, dtype=options.dtype, mel_dtype=options.mel_dtype, kv_int8=options.kv_int8)
        quantize_graph(graph, options.quant)
        if options.token_table_part_bytes is not None:
            split_token_table(graph, options.token_table_part_bytes)
        return graph

    # ---- audio side -------------------------------------------------------------------------
    def mel(self, samples: nn.Tensor):
        mel = self.mel_frontend(samples)
        return mel if self.dtype == "float32" else mel.astype(self.dtype)

    def encode_stages(self, mel, conv0_state, conv1_state, enc_cache, enc_pages, audio_ring, slots, starts):
        frames, conv0_state, conv1_state = self.enc.stem(mel, conv0_state, conv1_state, slots)
        hidden, enc_cache = self.enc.transformer(frames, enc_cache, page_table_rows(enc_pages, slots), starts)
        audio = self.adapter(hidden)
        token_starts = op.divide(starts, op.full((1,), self.cfg.audio.downsample_factor, "int32"))
        audio_ring = write_slot_rows(audio_ring, audio, slots, token_starts)
        return conv0_state, conv1_state, enc_cache, audio_ring, frames, hidden, audio

    def encode(self, mel, conv0_state, conv1_state, enc_cache, enc_pages, audio_ring, slots, starts):
        return self.encode_stages(mel, conv0_state, conv1_state, enc_cache, enc_pages, audio_ring, slots, starts)[:4]

    # ---- text side --------------------------------------------------------------------------
    def set_delay(self, delay_tokens, delay_scales, slots):
        t_cond = sinusoidal_embedding(delay_tokens, self.cfg.decoder.dim).astype(self.dtype)
        zeros = op.zeros((delay_tokens.shape[0],), "int32")
        # one write per layer (row = layer index): a single concat of every layer's scale fused into
        # one kernel binding n_layers + 1 buffers, over WebGPU's default of 8 per kernel
        for index, scale in enumerate(self.dec.delay_scales(t_cond)):
            delay_scales = write_slot_rows(delay_scales, scale, slots, zeros + index)
        return delay_scales

    def decode(self, tokens, audio_ring, delay_scales, dec_cache, dec_pages, slots, starts):
        n = tokens.shape[1]
        x = self.tok_embeddings.lookup(tokens) + read_slot_rows(audio_ring, slots, starts, n)
        hidden, dec_cache = self.dec(x, delay_scales, dec_cache, page_table_rows(dec_pages, slots), slots, starts)
        last = _last_row(hidden)
        logits = self.tok_embeddings.project(last)
        next_tokens = op.topk(logits, k=1, axis=-1, ret_type="indices", dtype="int32")
        return logits, op.reshape(next_tokens, (tokens.shape[0],)), dec_cache

    # ---- export -----------------------------------------------------------------------------
    def export_spec(self) -> dict:
        """The entry points' argument specs; the state comes from voxc.artifact.state_layout (a
        per-layer entry is a list of specs: the entry point takes and returns it as a tuple; each layer
        of a paged entry has its own page count ``<name>_pages_<layer>``)."""
        mel_bins = self.cfg.encoder.num_mel_bins

        def state_spec(name, entry):
            def tensor(rows):
                return spec.Tensor([rows if d is None else d for d in entry.shape], entry.dtype_for(self.dtype))

            if entry.layers is None:
                return tensor("n_slots")
            return [tensor(f"{name}_pages_{i}" if entry.paged else "n_slots") for i in range(entry.layers)]

        state = {name: state_spec(name, entry) for name, entry in self.state.items()}
        encode_args = {"mel": spec.Tensor(["b", mel_bins, "t"], self.dtype),
                       **{k: state[k] for k in ("conv0_state", "conv1_state", "enc_cache", "enc_pages",
                                                "audio_ring")},
                       "slots": spec.Tensor(["b"], "int32"), "starts": spec.Tensor(["b"], "int32")}
        specs = {
            "mel": {"samples": spec.Tensor(["b", "n_samples"], "float32")},
            "encode": dict(encode_args),
            "encode_stages": dict(encode_args),
            "set_delay": {
                "delay_tokens": spec.Tensor(["b"], "float32"),
                "delay_scales": state["delay_scales"],
                "slots": spec.Tensor(["b"], "int32"),
            },
            "decode": {
                "tokens": spec.Tensor(["b", "n"], "int32"),
                "audio_ring": state["audio_ring"],
                "delay_scales": state["delay_scales"],
                "dec_cache": state["dec_cache"],
                "dec_pages": state["dec_pages"],
                "slots": spec.Tensor(["b"], "int32"),
                "starts": spec.Tensor(["b"], "int32"),
            },
        }
        assert tuple(specs) == ENTRY_POINTS
        return specs


def _last_row(hidden: nn.Tensor) -> nn.Tensor:
    """[b, n, d] -> [b, d]: the last position of each sequence."""

    def compute(h: te.Tensor):
        return te.compute((h.shape[0], h.shape[2]), lambda bi, d: h[bi, h.shape[1] - 1, d], name="last_row")

    return op.tensor_expr_op(compute, "last_row", [hidden])
