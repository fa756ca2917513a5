"""The one table of tensor names: voxc's graph names, and how each checkpoint layout maps onto them.

voxc's graph keeps Mistral's own conventions (q/k rows in interleaved-pair RoPE order, [out, in]
weights) so the official ``consolidated.safetensors`` loads with renaming only; other layouts
(transformers, GGUF) are converted to this one by their loaders.
"""
from __future__ import annotations

import re

from voxc.config import ModelConfig
from voxc.quant import stacked_storage, weight_storage

# voxc names of the projection weights (and the token table) a quantized model stores in blocks.
QUANTIZED_WEIGHT = re.compile(r"^(tok_embeddings\.weight|adapter\.w_(in|out)\.weight|"
                              r"(enc|dec)\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight|"
                              r"dec\.layers\.\d+\.ada_norm\.w_(in|out)\.weight)$")

# Projections of one input that the graph runs as one matmul (voxc.model.layers): graph projection
# -> the checkpoint projections whose rows it stacks, in this order.  Checkpoints, GGUF files and
# storage overrides keep the separate names; only the graph (and so the artifact) has the stacked
# tensors, built by WeightSource.graph_param.  A part without a bias (the encoder's wk) contributes
# zeros to a stacked bias.
STACKED_PROJECTIONS = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}
_STACKED_TENSOR = re.compile(r"^((?:enc|dec)\.layers\.\d+\.)(" + "|".join(map(re.escape, STACKED_PROJECTIONS))
                             + r")\.(\w+)$")


def stacked_parts(name: str) -> tuple[str, ...] | None:
    """The checkpoint tensors whose rows make graph tensor ``name``, in order
    (``dec.layers.0.attention.wqkv.weight`` -> its wq, wk, wv weights); None for a tensor that is
    not stacked.  Any field name passes through (weight, bias, qweight, scales)."""
    m = _STACKED_TENSOR.match(name)
    if not m:
        return None
    prefix, projection, field = m.groups()
    return tuple(f"{prefix}{part}.{field}" for part in STACKED_PROJECTIONS[projection])


def unstack(name: str, array, cfg: ModelConfig) -> list[tuple[str, object]]:
    """Graph tensor ``name`` (any field: its rows are per output row) as the checkpoint tensors it
    holds: ``[(part name, its rows of array)]``, without the zero rows of a bias the model lacks (the
    encoder's wk); ``[(name, array)]`` for a tensor that is not stacked."""
    parts = stacked_parts(name)
    if parts is None:
        return [(name, array)]
    shapes = expected_shapes(cfg)
    out, start = [], 0
    for part in parts:
        rows = shapes[part.rpartition(".")[0] + ".weight"][0]
        if part.endswith((".weight", ".bias")) and part not in shapes:
            start += rows
            continue
        out.append((part, array[start:start + rows]))
        start += rows
    return out


def graph_weight_storage(name: str, in_features: int, qtype, overrides=None):
    """How a build stores graph weight ``name``: voxc.quant.weight_storage for a checkpoint weight,
    voxc.quant.stacked_storage of its parts' storages for a stacked one."""
    parts = stacked_parts(name) or (name,)
    return stacked_storage([weight_storage(part, in_features, qtype, overrides) for part in parts])


_STACK_OF_PART = {part: stack for stack, parts in STACKED_PROJECTIONS.items() for part in parts}
_PART_TENSOR = re.compile(r"^((?:enc|dec)\.layers\.\d+\.)(" + "|".join(map(re.escape, _STACK_OF_PART))
                          + r")\.(\w+)$")


def stacked_into(name: str) -> str | None:
    """The graph tensor whose rows include checkpoint tensor ``name``
    (``dec.layers.0.attention.wk.weight`` -> ``dec.layers.0.attention.wqkv.weight``); None if none."""
    m = _PART_TENSOR.match(name)
    if not m:
        return None
    prefix, part, field = m.groups()
    return f"{prefix}{_STACK_OF_PART[part]}.{field}"


OFFICIAL_PREFIX = "mm_streams_embeddings.embedding_module."
OFFICIAL_ENCODER = OFFICIAL_PREFIX + "whisper_encoder."

# (official-name regex, voxc-name template).  Order matters only for readability.
_OFFICIAL_TO_VOXC = [
    (r"(?:mm_streams_embeddings\.embedding_module\.)?tok_embeddings\.weight", "tok_embeddings.weight"),
    (r"norm\.weight", "dec.norm.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"dec.layers.\1.attention_norm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"dec.layers.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"dec.layers.\1.attention.w\2.weight"),
    (r"layers\.(\d+)\.feed_forward\.w([123])\.weight", r"dec.layers.\1.feed_forward.w\2.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.weight", r"dec.layers.\1.ada_norm.w_in.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.weight", r"dec.layers.\1.ada_norm.w_out.weight"),
    (re.escape(OFFICIAL_ENCODER) + r"conv_layers\.([01])\.conv\.(weight|bias)", r"enc.conv\1.\2"),
    (re.escape(OFFICIAL_ENCODER) + r"transformer\.norm\.weight", "enc.norm.weight"),
    (re.escape(OFFICIAL_ENCODER) + r"transformer\.layers\.(\d+)\.attention_norm\.weight",
     r"enc.layers.\1.attention_norm.weight"),
    (re.escape(OFFICIAL_ENCODER) + r"transformer\.layers\.(\d+)\.ffn_norm\.weight", r"enc.layers.\1.ffn_norm.weight"),
    (re.escape(OFFICIAL_ENCODER) + r"transformer\.layers\.(\d+)\.attention\.w([qkvo])\.(weight|bias)",
     r"enc.layers.\1.attention.w\2.\3"),
    (re.escape(OFFICIAL_ENCODER) + r"transformer\.layers\.(\d+)\.feed_forward\.w([123])\.(weight|bias)",
     r"enc.layers.\1.feed_forward.w\2.\3"),
    (re.escape(OFFICIAL_PREFIX) + r"audio_language_projection\.0\.weight", "adapter.w_in.weight"),
    (re.escape(OFFICIAL_PREFIX) + r"audio_language_projection\.2\.weight", "adapter.w_out.weight"),
]
_OFFICIAL_TO_VOXC = [(re.compile("^" + p + "$"), r) for p, r in _OFFICIAL_TO_VOXC]


def official_to_voxc(name: str) -> str | None:
    """voxc name of an official checkpoint tensor, or None if the name is not part of the model."""
    for pat, rep in _OFFICIAL_TO_VOXC:
        if pat.match(name):
            return pat.sub(rep, name)
    return None


def voxc_to_official(name: str) -> str:
    """Inverse of :func:`official_to_voxc` (used by ``voxc make-tiny`` to write the official layout)."""
    table = [
        (r"tok_embeddings\.weight", OFFICIAL_PREFIX + "tok_embeddings.weight"),
        (r"dec\.norm\.weight", "norm.weight"),
        (r"dec\.layers\.(\d+)\.ada_norm\.w_in\.weight", r"layers.\1.ada_rms_norm_t_cond.0.weight"),
        (r"dec\.layers\.(\d+)\.ada_norm\.w_out\.weight", r"layers.\1.ada_rms_norm_t_cond.2.weight"),
        (r"dec\.layers\.(.*)", r"layers.\1"),
        (r"enc\.conv([01])\.(weight|bias)", OFFICIAL_ENCODER + r"conv_layers.\1.conv.\2"),
        (r"enc\.norm\.weight", OFFICIAL_ENCODER + "transformer.norm.weight"),
        (r"enc\.layers\.(.*)", OFFICIAL_ENCODER + r"transformer.layers.\1"),
        (r"adapter\.w_in\.weight", OFFICIAL_PREFIX + "audio_language_projection.0.weight"),
        (r"adapter\.w_out\.weight", OFFICIAL_PREFIX + "audio_language_projection.2.weight"),
    ]
    for pat, rep in table:
        if re.match("^" + pat + "$", name):
            return re.sub("^" + pat + "$", rep, name)
    raise KeyError(name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape, in voxc names (PyTorch [out, in(, k)] order)."""
    e, d = cfg.encoder, cfg.decoder
    shapes: dict[str, tuple[int, ...]] = {
        "enc.conv0.weight": (e.dim, e.num_mel_bins, 3), "enc.conv0.bias": (e.dim,),
        "enc.conv1.weight": (e.dim, e.dim, 3), "enc.conv1.bias": (e.dim,),
        "enc.norm.weight": (e.dim,),
        "adapter.w_in.weight": (d.dim, e.dim * cfg.audio.downsample_factor),
        "adapter.w_out.weight": (d.dim, d.dim),
        "tok_embeddings.weight": (d.vocab_size, d.dim),
        "dec.norm.weight": (d.dim,),
    }
    eq = e.n_heads * e.head_dim
    for i in range(e.n_layers):
        p = f"enc.layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (e.dim,), p + "ffn_norm.weight": (e.dim,),
            p + "attention.wq.weight": (eq, e.dim), p + "attention.wq.bias": (eq,),
            p + "attention.wk.weight": (eq, e.dim),
            p + "attention.wv.weight": (eq, e.dim), p + "attention.wv.bias": (eq,),
            p + "attention.wo.weight": (e.dim, eq), p + "attention.wo.bias": (e.dim,),
            p + "feed_forward.w1.weight": (e.hidden_dim, e.dim),
            p + "feed_forward.w2.weight": (e.dim, e.hidden_dim), p + "feed_forward.w2.bias": (e.dim,),
            p + "feed_forward.w3.weight": (e.hidden_dim, e.dim),
        })
    dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    for i in range(d.n_layers):
        p = f"dec.layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d.dim,), p + "ffn_norm.weight": (d.dim,),
            p + "attention.wq.weight": (dq, d.dim), p + "attention.wk.weight": (dkv, d.dim),
            p + "attention.wv.weight": (dkv, d.dim), p + "attention.wo.weight": (d.dim, dq),
            p + "feed_forward.w1.weight": (d.hidden_dim, d.dim),
            p + "feed_forward.w2.weight": (d.dim, d.hidden_dim),
            p + "feed_forward.w3.weight": (d.hidden_dim, d.dim),
            p + "ada_norm.w_in.weight": (d.ada_norm_dim, d.dim),
            p + "ada_norm.w_out.weight": (d.dim, d.ada_norm_dim),
        })
    return shapes


def rope_rows(name: str, cfg: ModelConfig) -> int | None:
    """Number of heads whose rows are in RoPE order for q/k weights (and the encoder q bias), else None.

    The official layout stores each head's rows as interleaved pairs; transformers stores them
    split-half.  Loaders of the HF layout permute these tensors back (see ``hf.py``).
    """
    m = re.match(r"^(enc|dec)\.layers\.\d+\.attention\.w([qk])\.(weight|bias)$", name)
    if not m:
        return None
    tower = cfg.encoder if m.group(1) == "enc" else cfg.decoder
    if m.group(2) == "q":
        return tower.n_heads
    return tower.n_heads if m.group(1) == "enc" else tower.n_kv_heads
