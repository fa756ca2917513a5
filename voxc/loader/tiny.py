"""Small random Voxtral Realtime checkpoints, for tests and ``voxc make-tiny``.

A tiny model has exactly the structure of the 4B one (``ModelConfig.tiny``), so it runs
through the same compiler and runtime.  With plain random weights (0.1·N(0,1)) the decoder
ignores the audio and repeats one token; :data:`VARIED` rescales a few tensors so that the
audio drives the output and greedy decoding produces a varied stream of ordinary tokens:

* projector ×10: the audio embeddings dominate the token embeddings they are added to;
* decoder layers ×0.1: the residual stream, and so the logits, follow the input embeddings;
* token embedding rows N(0,1) for text tokens but ×0.01 for the 1000 special tokens, so the
  tied LM head prefers byte/BPE tokens to control tokens.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import expected_shapes, rope_rows, voxc_to_official
from voxc.config import ModelConfig
from voxc.tokenizer import NUM_SPECIAL_TOKENS, TINY_VOCAB_SIZE, write_tiny_tekken

BASE_STD = 0.1  # every weight starts as BASE_STD * N(0, 1); norm weights as 1 + BASE_STD * N(0, 1)
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class TinyScales:
    """Multipliers applied to the random weights (1.0 everywhere = the plain random model)."""
    projector: float = 1.0       # adapter.w_in / w_out
    decoder: float = 1.0         # decoder layer matrices (not norms, not ada-norm)
    special_rows: float = 1.0    # token-embedding rows of special tokens
    embedding_std: float = BASE_STD  # std of the token-embedding rows of ordinary tokens


PLAIN = TinyScales()
VARIED = TinyScales(projector=10.0, decoder=0.1, special_rows=0.01, embedding_std=1.0)


def tiny_weights(cfg: ModelConfig, *, seed: int = 0, scales: TinyScales = VARIED) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor of ``cfg``, in voxc names and official RoPE order."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        noise = BASE_STD * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = (1.0 + noise) if _is_norm_weight(name) else noise * _scale_of(name, scales)

    embedding = weights["tok_embeddings.weight"]
    n_special = min(NUM_SPECIAL_TOKENS, embedding.shape[0])
    embedding[:n_special] *= scales.special_rows
    embedding[n_special:] *= scales.embedding_std / BASE_STD
    return weights


def _is_norm_weight(name: str) -> bool:
    # RMSNorm gains (attention_norm, ffn_norm, norm); ada_norm's linears are ordinary matrices.
    return name.endswith("norm.weight")


def _scale_of(name: str, scales: TinyScales) -> float:
    if name.startswith("adapter."):
        return scales.projector
    if name.startswith("dec.layers.") and ".ada_norm." not in name:
        return scales.decoder
    return 1.0


def make_tiny(out_dir: str | Path, *, seed: int = 0, encoder_window: int = 750, decoder_window: int = 8192,
              layout: str = "mistral", scales: TinyScales = VARIED, dtype: str = "float32",
              config: ModelConfig | None = None, force: bool = False) -> Path:
    """Write a tiny random checkpoint (weights, config, ``tekken.json``) into ``out_dir``, which must
    not exist or be empty unless ``force``.

    ``layout="mistral"``: ``consolidated.safetensors`` + ``params.json`` as Mistral ships them;
    ``layout="hf"``: ``model.safetensors`` + ``config.json`` as transformers saves them (q/k rows
    in split-half order).  ``config`` replaces ``ModelConfig.tiny(...)`` (the windows are then ignored).
    """
    cfg = config or ModelConfig.tiny(encoder_window=encoder_window, decoder_window=decoder_window)
    check_new_directory(out_dir, force)
    return write_checkpoint(out_dir, tiny_weights(cfg, seed=seed, scales=scales), cfg, layout=layout, dtype=dtype,
                            force=force)


def check_new_directory(out_dir: str | Path, force: bool) -> None:
    """A directory voxc may write a checkpoint into: absent or empty, or anything with ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VoxcError(f"{out} is a file; give a directory to write the checkpoint into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise VoxcError(f"{out} exists and is not empty; pass --force to write the tiny checkpoint's files into it "
                        f"(consolidated.safetensors, params.json and tekken.json there would be replaced)")


def write_checkpoint(out_dir: str | Path, weights: dict[str, np.ndarray], cfg: ModelConfig, *,
                     layout: str = "mistral", dtype: str = "float32", force: bool = False) -> Path:
    """Write voxc-named float ``weights`` (official RoPE order) as a checkpoint with the tiny tokenizer
    into ``out_dir`` (absent or empty unless ``force``)."""
    from safetensors.numpy import save_file

    if dtype not in _DTYPES:
        raise VoxcError(f"unsupported dtype {dtype!r} for a tiny checkpoint; use one of {', '.join(_DTYPES)}")
    if layout not in ("mistral", "hf"):
        raise VoxcError(f"unknown checkpoint layout {layout!r}; use 'mistral' or 'hf'")
    if cfg.decoder.vocab_size != TINY_VOCAB_SIZE:
        raise VoxcError(f"the tiny tokenizer has {TINY_VOCAB_SIZE} tokens but the config's vocab_size is "
                        f"{cfg.decoder.vocab_size}")
    check_new_directory(out_dir, force)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "mistral":
        stored = {voxc_to_official(n): w for n, w in weights.items()}
        weights_file, config_file, config_json = "consolidated.safetensors", "params.json", cfg.to_params_json()
    else:
        stored = {hf.voxc_to_hf(n): _to_split_half(n, w, cfg) for n, w in weights.items()}
        weights_file, config_file, config_json = hf.HF_SINGLE_FILE, hf.HF_CONFIG_FILE, hf.hf_config_dict(cfg)
    stored = {n: np.ascontiguousarray(w.astype(_DTYPES[dtype])) for n, w in stored.items()}
    save_file(stored, str(out / weights_file), metadata={"format": "pt"})
    (out / config_file).write_text(json.dumps(config_json, indent=2))
    write_tiny_tekken(out / "tekken.json")
    return out


def _to_split_half(name: str, weight: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    heads = rope_rows(name, cfg)
    return weight if heads is None else hf.interleaved_to_split_half(weight, heads)
