"""The transformers (``VoxtralRealtimeForConditionalGeneration``) checkpoint layout, mapped onto voxc's.

Two differences from the official layout: tensor names, and the row order of the RoPE'd
projections.  Mistral stores each head's q/k rows as interleaved pairs (x0, x1), (x2, x3), ...;
transformers' conversion script permutes them to split-half order (all first halves, then all
second halves) for its ``rotate_half`` RoPE.  The encoder's q bias is permuted with its weight;
v, o and the (absent) encoder k bias are not.  Which tensors and how many heads: ``rope_rows()``.

Pure numpy: voxc never imports torch or transformers.
"""
from __future__ import annotations

import re

import numpy as np

from voxc.errors import VoxcError
from voxc.config import ModelConfig

HF_CONFIG_FILE = "config.json"
HF_SINGLE_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
# The LM head is tied to the token embedding, so a voxc checkpoint has no tensor for it.
HF_TIED_NAMES = frozenset({"lm_head.weight"})

_DEC = "language_model.model."
_ENC = "audio_tower."
_LAYER = "{i}"  # placeholder for the layer index in the templates below


def _name_pairs() -> list[tuple[str, str]]:
    """(voxc template, HF on-disk template) for every tensor; ``{i}`` stands for a layer index."""
    pairs = [
        ("tok_embeddings.weight", _DEC + "embed_tokens.weight"),
        ("dec.norm.weight", _DEC + "norm.weight"),
        ("dec.layers.{i}.attention_norm.weight", _DEC + "layers.{i}.input_layernorm.weight"),
        ("dec.layers.{i}.ffn_norm.weight", _DEC + "layers.{i}.post_attention_layernorm.weight"),
        ("dec.layers.{i}.ada_norm.w_in.weight", _DEC + "layers.{i}.ada_rms_norm.linear1.weight"),
        ("dec.layers.{i}.ada_norm.w_out.weight", _DEC + "layers.{i}.ada_rms_norm.linear2.weight"),
        ("enc.norm.weight", _ENC + "norm.weight"),
        ("enc.layers.{i}.attention_norm.weight", _ENC + "layers.{i}.self_attn_layer_norm.weight"),
        ("enc.layers.{i}.ffn_norm.weight", _ENC + "layers.{i}.final_layer_norm.weight"),
        ("adapter.w_in.weight", "multi_modal_projector.linear_1.weight"),
        ("adapter.w_out.weight", "multi_modal_projector.linear_2.weight"),
    ]
    # Mistral's w1/w2/w3 are gate/down/up; HF numbers the two stem convs from 1.
    ffn = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for suffix in ("weight", "bias"):
        pairs += [(f"enc.conv{k}.{suffix}", f"{_ENC}embedder.conv{k + 1}.{suffix}") for k in (0, 1)]
        pairs += [(f"enc.layers.{{i}}.attention.w{p}.{suffix}", f"{_ENC}layers.{{i}}.self_attn.{p}_proj.{suffix}")
                  for p in "qkvo"]
        pairs += [(f"enc.layers.{{i}}.feed_forward.{w}.{suffix}", f"{_ENC}layers.{{i}}.mlp.{hf}.{suffix}")
                  for w, hf in ffn.items()]
    pairs += [(f"dec.layers.{{i}}.attention.w{p}.weight", f"{_DEC}layers.{{i}}.self_attn.{p}_proj.weight")
              for p in "qkvo"]
    pairs += [(f"dec.layers.{{i}}.feed_forward.{w}.weight", f"{_DEC}layers.{{i}}.mlp.{hf}.weight")
              for w, hf in ffn.items()]
    return pairs


_VOXC_TO_HF = dict(_name_pairs())
_HF_TO_VOXC = {hf: voxc for voxc, hf in _VOXC_TO_HF.items()}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _split_layer(name: str) -> tuple[str, str | None]:
    """``'x.layers.3.y'`` -> (``'x.layers.{i}.y'``, ``'3'``)."""
    m = _LAYER_INDEX.search(name)
    if not m:
        return name, None
    return name[:m.start()] + "." + _LAYER + "." + name[m.end():], m.group(1)


def _fill_layer(template: str, index: str | None) -> str:
    return template if index is None else template.replace(_LAYER, index)


def hf_on_disk_name(name: str) -> str:
    """The saved-file spelling of an HF tensor name; in memory the model has other prefixes
    (``model.language_model.layers...`` for ``language_model.model.layers...``, ``model.audio_tower...``)."""
    if name.startswith("model.language_model."):
        return _DEC + name[len("model.language_model."):]
    if name.startswith("model."):
        return name[len("model."):]
    return name


def hf_to_voxc(name: str) -> str | None:
    """voxc name of an HF tensor (on-disk or in-memory spelling); None if it is not a voxc tensor."""
    template, index = _split_layer(hf_on_disk_name(name))
    voxc = _HF_TO_VOXC.get(template)
    return None if voxc is None else _fill_layer(voxc, index)


def voxc_to_hf(name: str, *, in_memory: bool = False) -> str:
    """HF name of a voxc tensor: the saved-file spelling, or the ``state_dict()`` one if ``in_memory``."""
    template, index = _split_layer(name)
    if template not in _VOXC_TO_HF:
        raise KeyError(name)
    hf = _fill_layer(_VOXC_TO_HF[template], index)
    if not in_memory:
        return hf
    if hf.startswith(_DEC):
        return "model.language_model." + hf[len(_DEC):]
    return "model." + hf


# ---- RoPE row order ------------------------------------------------------------------------------
def interleaved_to_split_half(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Official -> HF row order of a q/k weight ``[heads*hd, in]`` or bias ``[heads*hd]``."""
    head_dim = rows.shape[0] // n_heads
    per_head = rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(rows.shape)


def split_half_to_interleaved(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> official row order; the inverse of :func:`interleaved_to_split_half`."""
    head_dim = rows.shape[0] // n_heads
    per_head = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(rows.shape)


# ---- config.json ---------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, *, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = 11) -> dict:
    """transformers' ``config.json`` for ``cfg``, with both RoPE thetas spelled out: the HF encoder
    config otherwise defaults to theta 10000, while Voxtral uses 1e6."""
    e, d, a = cfg.encoder, cfg.decoder, cfg.audio
    if d.ada_norm_dim != 32:
        raise VoxcError(f"transformers hard-codes the ada-norm width 32; this config has {d.ada_norm_dim}")
    return {
        "architectures": ["VoxtralRealtimeForConditionalGeneration"],
        "model_type": "voxtral_realtime",
        "audio_config": {
            "model_type": "voxtral_realtime_encoder",
            "hidden_size": e.dim, "intermediate_size": e.hidden_dim, "num_hidden_layers": e.n_layers,
            "num_attention_heads": e.n_heads, "num_key_value_heads": e.n_heads, "head_dim": e.head_dim,
            "num_mel_bins": e.num_mel_bins, "sliding_window": e.sliding_window, "rms_norm_eps": e.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta},
            "vocab_size": d.vocab_size,
        },
        "text_config": {
            "model_type": "voxtral_realtime_text",
            "vocab_size": d.vocab_size, "hidden_size": d.dim, "intermediate_size": d.hidden_dim,
            "num_hidden_layers": d.n_layers, "num_attention_heads": d.n_heads, "num_key_value_heads": d.n_kv_heads,
            "head_dim": d.head_dim, "sliding_window": d.sliding_window, "rms_norm_eps": d.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
            "max_position_embeddings": 131072, "tie_word_embeddings": True,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        },
        "audio_length_per_tok": a.mel_frames_per_token,
        "downsample_factor": a.downsample_factor,
        "default_num_delay_tokens": 6,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": True,
    }


# Config field names, per layout, for the error messages of a checkpoint whose shapes disagree.
HF_FIELD_NAMES = {
    "dec.dim": "text_config.hidden_size", "dec.q": "text_config.num_attention_heads*head_dim",
    "dec.kv": "text_config.num_key_value_heads*head_dim", "dec.hidden": "text_config.intermediate_size",
    "dec.ada": "the ada-norm width (32)", "vocab": "text_config.vocab_size",
    "dec.n_layers": "text_config.num_hidden_layers", "enc.n_layers": "audio_config.num_hidden_layers",
    "enc.dim": "audio_config.hidden_size", "enc.q": "audio_config.num_attention_heads*head_dim",
    "enc.hidden": "audio_config.intermediate_size", "mel": "audio_config.num_mel_bins",
    "enc.dim*downsample": "audio_config.hidden_size*downsample_factor", "kernel": "the conv kernel size (3)",
}
