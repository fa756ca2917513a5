"""Reading GGUF files: voxc's own (``voxc quantize``, voxc.quant.gguf_writer) and the community
Voxtral Realtime layouts.

``read_gguf`` returns ``(ModelConfig, iterator of (voxc_name, QuantTensor | ndarray), metadata)``
for voxc's layout and for the layouts in ``research/gguf_layouts.md``:

=============== ======================================== ==================== ==============
layout          recognised by                            tensor names         Q/K row order
=============== ======================================== ==================== ==============
voxc            arch ``voxc``                            voxc                 interleaved
trevors         Mistral names (Rust/Burn port, Q4_0)     Mistral verbatim     interleaved
crispasr        arch ``voxtral4b``                       ``audio.blk.N...``   split-half
transcribe_cpp  ``stt.voxtral_realtime.*`` keys          ``enc.blocks.N...``  split-half
audio_cpp       arch ``audiocpp``                        HF on-disk           split-half
voxtral_cpp     ``voxtral.*`` keys (andrijdavid)         ``enc.blk.N...``     interleaved
=============== ======================================== ==================== ==============

Split-half (transformers) q/k rows are permuted back to Mistral's interleaved order, the encoder
q bias too; for quantized tensors this permutes whole rows of blocks, which is lossless.
Q4_0 / Q8_0 / Q4_K tensors come back as :class:`QuantTensor`; every other type (F16, F32, BF16,
Q6_K, Q5_K, ...) as a numpy array (F16 stays f16, everything else becomes f32); the names of
tensors that were quantized in a type voxc's kernels do not run are in ``metadata["transcoded"]``
so the caller can re-quantize them (``pack_linear_weight(array, qtype)``).

``metadata`` keys: ``layout``, ``architecture``, ``qtype`` (the most common quantized type among
the linear weights, or None), ``left_pad_tokens``, ``tensor_types`` {voxc name: GGML type name},
``transcoded``, ``ignored_tensors`` (tensors that are not model weights, e.g. mel filters),
``tokenizer_json`` (bytes of a ``tekken.json``, embedded or rebuilt from the file's tokenizer
metadata; None if the file has none, as the Rust port's), ``kv`` (the file's scalar/string
metadata).
"""
from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GT

from voxc.artifact import check_config, check_left_pad_tokens, config_from_dict, default_left_pad_tokens
from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import QUANTIZED_WEIGHT, expected_shapes, official_to_voxc, rope_rows
from voxc.config import AudioConfig, DecoderConfig, EncoderConfig, ModelConfig
from voxc.quant.formats import QType, QuantTensor

VOXC_ARCH = "voxc"
FORMAT_VERSION = 1

_NATIVE = {GT.Q4_0: QType.Q4_0, GT.Q8_0: QType.Q8_0, GT.Q4_K: QType.Q4_K}


# ---- a GGUF reader that indexes tensors without trusting them ---------------------------------

class _Index(gguf.GGUFReader):
    """gguf's reader, but the tensor table is only recorded (name, type id, dims, offset) so that
    an unknown type, a bad row length or a truncated file is reported for the tensor at fault."""

    def _build_tensors(self, start_offs: int, fields) -> None:   # noqa: D401 - gguf hook
        self.index = []
        seen = set()
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            if name in seen:
                raise VoxcError(f"GGUF has the tensor {name} twice")
            seen.add(name)
            self.index.append((name, int(raw_type[0]), tuple(int(d) for d in dims), int(start_offs + offset[0])))
        self.tensors = []

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        # gguf walks numeric arrays one element at a time (minutes for audio.cpp's 15 MB embedded
        # tekken.json); read them as one slice instead.  contents() flattens either form.
        if raw_type == gguf.GGUFValueType.ARRAY:
            item = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            np_type = self.gguf_scalar_to_np.get(gguf.GGUFValueType(int(item[0])))
            if np_type is not None and int(count[0]) > 0:
                bulk = self._get(orig_offs + 12, np_type, int(count[0]))
                return (12 + int(bulk.nbytes), [item, count, bulk], [2],
                        [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(item[0]))])
        return super()._get_field_parts(orig_offs, raw_type)


def _open(path: Path) -> _Index:
    try:
        return _Index(path)
    except VoxcError:
        raise
    except FileNotFoundError:
        raise VoxcError(f"{path} not found") from None
    except Exception as exc:   # noqa: BLE001 - gguf raises ValueError/struct errors for bad headers
        raise VoxcError(f"{path} is not a readable GGUF file: {exc}") from None


class _RawTensor:
    def __init__(self, reader: _Index, name: str, type_id: int, dims: tuple[int, ...], offset: int):
        self.name, self.dims, self.offset = name, dims, offset
        try:
            self.gtype = GT(type_id)
        except ValueError:
            raise VoxcError(f"tensor {name}: unknown GGML type id {type_id}") from None
        if self.gtype not in gguf.GGML_QUANT_SIZES:
            raise VoxcError(f"tensor {name}: GGML type {self.gtype.name} has no known block size")
        block, size = gguf.GGML_QUANT_SIZES[self.gtype]
        self.shape = tuple(reversed(dims))             # PyTorch order
        if block > 1 and not self.shape:
            raise VoxcError(f"tensor {name}: a {self.gtype.name} tensor needs at least one dimension")
        if self.shape and self.shape[-1] % block:
            raise VoxcError(f"tensor {name}: row length {self.shape[-1]} is not a multiple of the "
                            f"{self.gtype.name} block size {block}")
        self.nbytes = math.prod(dims) // block * size   # Python ints: no overflow for absurd dims
        end = offset + self.nbytes
        if end > len(reader.data):
            raise VoxcError(f"tensor {name} is truncated: it needs bytes {offset}..{end} but the file "
                            f"has {len(reader.data)}")
        self.reader = reader

    def raw(self) -> np.ndarray:
        return self.reader.data[self.offset:self.offset + self.nbytes]

    def load(self) -> QuantTensor | np.ndarray:
        raw = self.raw()
        if self.nbytes == 0:
            return np.zeros(self.shape, np.float16 if self.gtype is GT.F16 else np.float32)
        if self.gtype in _NATIVE and len(self.shape) == 2:
            return QuantTensor(_NATIVE[self.gtype], self.shape, np.array(raw).reshape(self.shape[0], -1))
        if self.gtype is GT.F16:
            return np.array(raw.view(np.float16)).reshape(self.shape)
        if self.gtype is GT.F32:
            return np.array(raw.view(np.float32)).reshape(self.shape)
        try:
            rows = raw.reshape(-1, self.nbytes // max(1, int(np.prod(self.shape[:-1], dtype=np.int64))))
            return gguf.quants.dequantize(rows, self.gtype).reshape(self.shape).astype(np.float32)
        except NotImplementedError:
            raise VoxcError(f"tensor {self.name}: GGML type {self.gtype.name} cannot be decoded "
                            f"(the gguf package has no dequantizer for it)") from None


def _kv(reader: _Index) -> dict[str, Any]:
    """Scalar, string and short-array metadata as Python values (long arrays are left out)."""
    out = {}
    reader.unreadable_keys = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and int(field.parts[1][0]) > 4096:
                continue
            out[key] = field.contents()
        except Exception:   # noqa: BLE001 - an odd field must not stop the load (unless the layout needs it)
            reader.unreadable_keys.append(key)
    return out


def _array_field(reader: _Index, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception as exc:   # noqa: BLE001 - gguf decodes the field's parts as they are
        raise VoxcError(f"GGUF metadata {key} is unreadable ({exc})") from None


# ---- name tables ------------------------------------------------------------------------------

def _table(pairs):
    return [(re.compile("^" + p + "$"), r) for p, r in pairs]


_W = r"(weight|bias)"
_CRISPASR = _table([
    (r"audio\.conv\.1\." + _W, r"enc.conv0.\1"), (r"audio\.conv\.2\." + _W, r"enc.conv1.\1"),
    (r"audio\.ln_post\.weight", "enc.norm.weight"),
    (r"audio\.blk\.(\d+)\.attn_norm\.weight", r"enc.layers.\1.attention_norm.weight"),
    (r"audio\.blk\.(\d+)\.ffn_norm\.weight", r"enc.layers.\1.ffn_norm.weight"),
    (r"audio\.blk\.(\d+)\.attn_([qkv])\." + _W, r"enc.layers.\1.attention.w\2.\3"),
    (r"audio\.blk\.(\d+)\.attn_out\." + _W, r"enc.layers.\1.attention.wo.\2"),
    (r"audio\.blk\.(\d+)\.ffn_gate\." + _W, r"enc.layers.\1.feed_forward.w1.\2"),
    (r"audio\.blk\.(\d+)\.ffn_down\." + _W, r"enc.layers.\1.feed_forward.w2.\2"),
    (r"audio\.blk\.(\d+)\.ffn_up\." + _W, r"enc.layers.\1.feed_forward.w3.\2"),
    (r"proj1\.weight", "adapter.w_in.weight"), (r"proj2\.weight", "adapter.w_out.weight"),
    (r"token_embd\.weight", "tok_embeddings.weight"), (r"output_norm\.weight", "dec.norm.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"dec.layers.\1.attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"dec.layers.\1.ffn_norm.weight"),
    (r"blk\.(\d+)\.attn_([qkv])\.weight", r"dec.layers.\1.attention.w\2.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"dec.layers.\1.attention.wo.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"dec.layers.\1.feed_forward.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"dec.layers.\1.feed_forward.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"dec.layers.\1.feed_forward.w3.weight"),
    (r"blk\.(\d+)\.ada_norm_down\.weight", r"dec.layers.\1.ada_norm.w_in.weight"),
    (r"blk\.(\d+)\.ada_norm_up\.weight", r"dec.layers.\1.ada_norm.w_out.weight"),
])
_TRANSCRIBE_CPP = _table([
    (r"enc\.conv\.([01])\." + _W, r"enc.conv\1.\2"), (r"enc\.final_norm\.weight", "enc.norm.weight"),
    (r"enc\.blocks\.(\d+)\.norm_attn\.weight", r"enc.layers.\1.attention_norm.weight"),
    (r"enc\.blocks\.(\d+)\.norm_ffn\.weight", r"enc.layers.\1.ffn_norm.weight"),
    (r"enc\.blocks\.(\d+)\.attn\.([qkv])\." + _W, r"enc.layers.\1.attention.w\2.\3"),
    (r"enc\.blocks\.(\d+)\.attn\.out\." + _W, r"enc.layers.\1.attention.wo.\2"),
    (r"enc\.blocks\.(\d+)\.ffn\.gate\." + _W, r"enc.layers.\1.feed_forward.w1.\2"),
    (r"enc\.blocks\.(\d+)\.ffn\.down\." + _W, r"enc.layers.\1.feed_forward.w2.\2"),
    (r"enc\.blocks\.(\d+)\.ffn\.up\." + _W, r"enc.layers.\1.feed_forward.w3.\2"),
    (r"proj\.linear_1\.weight", "adapter.w_in.weight"), (r"proj\.linear_2\.weight", "adapter.w_out.weight"),
    (r"dec\.token_embd\.weight", "tok_embeddings.weight"), (r"dec\.output_norm\.weight", "dec.norm.weight"),
    (r"dec\.blocks\.(\d+)\.norm_attn\.weight", r"dec.layers.\1.attention_norm.weight"),
    (r"dec\.blocks\.(\d+)\.norm_ffn\.weight", r"dec.layers.\1.ffn_norm.weight"),
    (r"dec\.blocks\.(\d+)\.attn\.([qkvo])\.weight", r"dec.layers.\1.attention.w\2.weight"),
    (r"dec\.blocks\.(\d+)\.ffn\.gate\.weight", r"dec.layers.\1.feed_forward.w1.weight"),
    (r"dec\.blocks\.(\d+)\.ffn\.down\.weight", r"dec.layers.\1.feed_forward.w2.weight"),
    (r"dec\.blocks\.(\d+)\.ffn\.up\.weight", r"dec.layers.\1.feed_forward.w3.weight"),
    (r"dec\.blocks\.(\d+)\.ada\.linear_1\.weight", r"dec.layers.\1.ada_norm.w_in.weight"),
    (r"dec\.blocks\.(\d+)\.ada\.linear_2\.weight", r"dec.layers.\1.ada_norm.w_out.weight"),
])
_VOXTRAL_CPP = _table([
    (r"enc\.conv([01])\." + _W, r"enc.conv\1.\2"), (r"enc\.norm\.weight", "enc.norm.weight"),
    (r"enc\.blk\.(\d+)\.attn_norm\.weight", r"enc.layers.\1.attention_norm.weight"),
    (r"enc\.blk\.(\d+)\.ffn_norm\.weight", r"enc.layers.\1.ffn_norm.weight"),
    (r"enc\.blk\.(\d+)\.attn_([qkvo])\." + _W, r"enc.layers.\1.attention.w\2.\3"),
    (r"enc\.blk\.(\d+)\.ffn_w([123])\." + _W, r"enc.layers.\1.feed_forward.w\2.\3"),
    (r"adapter\.0\.weight", "adapter.w_in.weight"), (r"adapter\.2\.weight", "adapter.w_out.weight"),
    (r"tok_embeddings\.weight", "tok_embeddings.weight"), (r"norm\.weight", "dec.norm.weight"),
    (r"dec\.blk\.(\d+)\.attn_norm\.weight", r"dec.layers.\1.attention_norm.weight"),
    (r"dec\.blk\.(\d+)\.ffn_norm\.weight", r"dec.layers.\1.ffn_norm.weight"),
    (r"dec\.blk\.(\d+)\.attn_([qkvo])\.weight", r"dec.layers.\1.attention.w\2.weight"),
    (r"dec\.blk\.(\d+)\.ffn_w([123])\.weight", r"dec.layers.\1.feed_forward.w\2.weight"),
    (r"dec\.blk\.(\d+)\.ada0\.weight", r"dec.layers.\1.ada_norm.w_in.weight"),
    (r"dec\.blk\.(\d+)\.ada2\.weight", r"dec.layers.\1.ada_norm.w_out.weight"),
])


def _map_with(table):
    def mapper(name: str) -> str | None:
        for pat, rep in table:
            if pat.match(name):
                return pat.sub(rep, name)
        return None
    return mapper


_LAYOUT_NAMES = {
    "voxc": lambda n: n,
    "trevors": official_to_voxc,
    "crispasr": _map_with(_CRISPASR),
    "transcribe_cpp": _map_with(_TRANSCRIBE_CPP),
    "audio_cpp": hf.hf_to_voxc,
    "voxtral_cpp": _map_with(_VOXTRAL_CPP),
}
_SPLIT_HALF_LAYOUTS = {"crispasr", "transcribe_cpp", "audio_cpp"}


def _detect_layout(arch: str | None, kv: Mapping[str, Any], names: list[str]) -> str:
    if arch == VOXC_ARCH:
        return "voxc"
    if arch == "voxtral4b":
        return "crispasr"
    if arch == "audiocpp":
        family = kv.get("audiocpp.model_spec.family")
        if family not in (None, "voxtral_realtime"):
            raise VoxcError(f"this audio.cpp GGUF holds a {family!r} model, not Voxtral Realtime")
        return "audio_cpp"
    if any(k.startswith("stt.voxtral_realtime.") for k in kv):
        return "transcribe_cpp"
    if any(k.startswith("voxtral.") for k in kv):
        if arch == "voxtral":
            raise VoxcError("this voxtral.cpp GGUF is the offline Voxtral (3B) model, not Voxtral Realtime")
        return "voxtral_cpp"
    if any(official_to_voxc(n) for n in names):
        return "trevors"
    if arch in ("llama", "mistral", "mistral3", "clip"):
        raise VoxcError(f"GGUF architecture {arch!r} is a llama.cpp text model (or an mmproj file) without the "
                        "audio encoder; voxc needs the whole Voxtral Realtime model in one file")
    raise VoxcError(f"unrecognised GGUF (architecture {arch!r}): not voxc's layout nor any known "
                    "Voxtral Realtime community layout (Rust/Burn, CrispASR, transcribe.cpp, audio.cpp, voxtral.cpp)")


# ---- configs ----------------------------------------------------------------------------------

def _pick(kv, key, default, cast=int):
    value = kv.get(key)
    if value is None:
        return default
    try:
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        raise VoxcError(f"GGUF metadata {key} is {str(value)[:60]!r}, not a number") from None


def _config_from_kv(layout: str, kv: Mapping[str, Any], reader: _Index) -> ModelConfig | None:
    e, d, a = EncoderConfig(), DecoderConfig(), AudioConfig()
    if layout == "voxc":
        text = kv.get("voxc.config")
        if text is None:
            raise VoxcError("voxc GGUF has no voxc.config metadata")
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise VoxcError(f"GGUF metadata voxc.config is not a JSON model config ({exc})") from None
        return config_from_dict(data, "GGUF metadata voxc.config")
    if layout == "audio_cpp":
        files = _embedded_files(reader)
        if "config.json" not in files:
            raise VoxcError("audio.cpp GGUF has no embedded config.json")
        try:
            cfg = ModelConfig.from_hf_config(json.loads(files["config.json"]))
        except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError, RecursionError) as exc:
            raise VoxcError(f"the embedded config.json is not a valid transformers config ({exc})") from None
        return check_config(cfg, "the embedded config.json")
    if layout == "crispasr":
        p = "voxtral4b."
        enc = EncoderConfig(dim=_pick(kv, p + "audio.d_model", e.dim), n_layers=_pick(kv, p + "audio.n_layers", e.n_layers),
                            n_heads=_pick(kv, p + "audio.n_heads", e.n_heads), head_dim=_pick(kv, p + "audio.head_dim", e.head_dim),
                            hidden_dim=_pick(kv, p + "audio.ff_dim", e.hidden_dim),
                            rope_theta=_pick(kv, p + "audio.rope_theta", e.rope_theta, float),
                            sliding_window=_pick(kv, p + "audio.sliding_window", e.sliding_window),
                            num_mel_bins=_pick(kv, p + "n_mels", e.num_mel_bins))
        dec = DecoderConfig(dim=_pick(kv, p + "llm.d_model", d.dim), n_layers=_pick(kv, p + "llm.n_layers", d.n_layers),
                            n_heads=_pick(kv, p + "llm.n_heads", d.n_heads), n_kv_heads=_pick(kv, p + "llm.n_kv_heads", d.n_kv_heads),
                            head_dim=_pick(kv, p + "llm.head_dim", d.head_dim), hidden_dim=_pick(kv, p + "llm.ff_dim", d.hidden_dim),
                            rope_theta=_pick(kv, p + "llm.rope_theta", d.rope_theta, float),
                            norm_eps=_pick(kv, p + "llm.rms_norm_eps", d.norm_eps, float),
                            sliding_window=_pick(kv, p + "llm.sliding_window", d.sliding_window),
                            vocab_size=_pick(kv, p + "llm.vocab_size", d.vocab_size),
                            ada_norm_dim=_pick(kv, p + "llm.ada_norm_dim", d.ada_norm_dim))
        audio = AudioConfig(downsample_factor=_pick(kv, p + "proj.frame_stack", a.downsample_factor))
        return check_config(ModelConfig(enc, dec, audio), "GGUF metadata")
    if layout == "transcribe_cpp":
        p = "stt.voxtral_realtime."
        enc = EncoderConfig(dim=_pick(kv, p + "encoder.d_model", e.dim), n_layers=_pick(kv, p + "encoder.n_layers", e.n_layers),
                            n_heads=_pick(kv, p + "encoder.n_heads", e.n_heads), head_dim=_pick(kv, p + "encoder.head_dim", e.head_dim),
                            hidden_dim=_pick(kv, p + "encoder.ffn_dim", e.hidden_dim),
                            rope_theta=_pick(kv, p + "encoder.rope_theta", e.rope_theta, float),
                            norm_eps=_pick(kv, p + "encoder.rms_norm_eps", e.norm_eps, float),
                            sliding_window=_pick(kv, p + "encoder.sliding_window", e.sliding_window),
                            num_mel_bins=_pick(kv, p + "encoder.num_mel_bins", e.num_mel_bins))
        dec = DecoderConfig(dim=_pick(kv, p + "decoder.hidden_size", d.dim), n_layers=_pick(kv, p + "decoder.n_layers", d.n_layers),
                            n_heads=_pick(kv, p + "decoder.n_heads", d.n_heads), n_kv_heads=_pick(kv, p + "decoder.n_kv_heads", d.n_kv_heads),
                            head_dim=_pick(kv, p + "decoder.head_dim", d.head_dim),
                            hidden_dim=_pick(kv, p + "decoder.intermediate_size", d.hidden_dim),
                            rope_theta=_pick(kv, p + "decoder.rope_theta", d.rope_theta, float),
                            norm_eps=_pick(kv, p + "decoder.rms_norm_eps", d.norm_eps, float),
                            sliding_window=_pick(kv, p + "decoder.sliding_window", d.sliding_window),
                            vocab_size=_pick(kv, p + "decoder.vocab_size", d.vocab_size),
                            ada_norm_dim=_pick(kv, p + "time.ada_hidden", d.ada_norm_dim))
        audio = AudioConfig(downsample_factor=_pick(kv, p + "projector.downsample_factor", a.downsample_factor))
        return check_config(ModelConfig(enc, dec, audio), "GGUF metadata")
    if layout == "voxtral_cpp":
        p = "voxtral."
        enc = EncoderConfig(dim=_pick(kv, p + "encoder.dim", e.dim), n_layers=_pick(kv, p + "encoder.n_layers", e.n_layers),
                            n_heads=_pick(kv, p + "encoder.n_heads", e.n_heads), head_dim=_pick(kv, p + "encoder.head_dim", e.head_dim),
                            hidden_dim=_pick(kv, p + "encoder.hidden_dim", e.hidden_dim),
                            rope_theta=_pick(kv, p + "encoder.rope_theta", e.rope_theta, float),
                            norm_eps=_pick(kv, p + "encoder.norm_eps", e.norm_eps, float),
                            sliding_window=_pick(kv, p + "encoder.sliding_window", e.sliding_window),
                            num_mel_bins=_pick(kv, p + "audio.num_mel_bins", e.num_mel_bins))
        dec = DecoderConfig(dim=_pick(kv, p + "decoder.dim", d.dim), n_layers=_pick(kv, p + "decoder.n_layers", d.n_layers),
                            n_heads=_pick(kv, p + "decoder.n_heads", d.n_heads), n_kv_heads=_pick(kv, p + "decoder.n_kv_heads", d.n_kv_heads),
                            head_dim=_pick(kv, p + "decoder.head_dim", d.head_dim), hidden_dim=_pick(kv, p + "decoder.hidden_dim", d.hidden_dim),
                            rope_theta=_pick(kv, p + "decoder.rope_theta", d.rope_theta, float),
                            norm_eps=_pick(kv, p + "decoder.norm_eps", d.norm_eps, float),
                            sliding_window=_pick(kv, p + "decoder.sliding_window", d.sliding_window),
                            vocab_size=_pick(kv, p + "vocab_size", d.vocab_size),
                            ada_norm_dim=_pick(kv, p + "ada_rms_norm_t_cond_dim", d.ada_norm_dim))
        audio = AudioConfig(sampling_rate=_pick(kv, p + "audio.sample_rate", a.sampling_rate),
                            hop_length=_pick(kv, p + "audio.hop_length", a.hop_length),
                            window_size=_pick(kv, p + "audio.window_size", a.window_size),
                            global_log_mel_max=_pick(kv, p + "audio.global_log_mel_max", a.global_log_mel_max, float),
                            frame_rate=_pick(kv, p + "audio.frame_rate", a.frame_rate, float),
                            downsample_factor=_pick(kv, p + "audio.downsample_factor", a.downsample_factor))
        return check_config(ModelConfig(enc, dec, audio), "GGUF metadata")
    return None          # trevors: no metadata at all


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """The Rust port writes no hyperparameters (its loader hard-codes the 4B ones): take every
    size from the tensors, and only the head sizes (not visible in the shapes) from the defaults."""
    e0, d0 = EncoderConfig(), DecoderConfig()

    def need(name, ndim):
        if name not in shapes:
            raise VoxcError(f"GGUF has no hyperparameters and no {name} to infer them from")
        if len(shapes[name]) != ndim:
            raise VoxcError(f"GGUF has no hyperparameters, and {name} has shape {shapes[name]}, not {ndim}-D")
        return shapes[name]

    def layers(tower):
        found = [int(m.group(1)) for n in shapes if (m := re.match(rf"{tower}\.layers\.(\d+)\.", n))]
        if not found:
            raise VoxcError(f"GGUF has no hyperparameters and no {tower}.layers tensors to infer them from")
        return 1 + max(found)

    vocab, dim = need("tok_embeddings.weight", 2)
    n_dec, n_enc = layers("dec"), layers("enc")
    enc_dim, mels, _ = need("enc.conv0.weight", 3)
    q_enc = need("enc.layers.0.attention.wq.weight", 2)[0]
    q_dec = need("dec.layers.0.attention.wq.weight", 2)[0]
    kv_dec = need("dec.layers.0.attention.wk.weight", 2)[0]
    enc = EncoderConfig(dim=enc_dim, n_layers=n_enc, n_heads=q_enc // e0.head_dim, head_dim=e0.head_dim,
                        hidden_dim=need("enc.layers.0.feed_forward.w1.weight", 2)[0], num_mel_bins=mels)
    dec = DecoderConfig(dim=dim, n_layers=n_dec, n_heads=q_dec // d0.head_dim, n_kv_heads=kv_dec // d0.head_dim,
                        head_dim=d0.head_dim, hidden_dim=need("dec.layers.0.feed_forward.w1.weight", 2)[0],
                        vocab_size=vocab, ada_norm_dim=need("dec.layers.0.ada_norm.w_in.weight", 2)[0])
    audio = AudioConfig(downsample_factor=need("adapter.w_in.weight", 2)[1] // enc_dim)
    try:
        return check_config(ModelConfig(enc, dec, audio), "GGUF tensor shapes")
    except VoxcError as exc:
        raise VoxcError(f"cannot infer a model config from the tensor shapes ({exc}); pass config=") from None


# ---- tokenizers -------------------------------------------------------------------------------

def _embedded_files(reader: _Index) -> dict[str, bytes]:
    names = _array_field(reader, "audiocpp.embedded_files.names")
    if not names:
        return {}
    try:
        offsets = [int(x) for x in _array_field(reader, "audiocpp.embedded_files.offsets") or []]
        field = reader.fields["audiocpp.embedded_files.data"]
        blob = b"".join(np.asarray(field.parts[i]).astype(np.uint8).tobytes() for i in field.data)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise VoxcError(f"audio.cpp GGUF: the embedded files are damaged ({exc})") from None
    if len(offsets) != len(names) + 1:
        raise VoxcError("audio.cpp GGUF: embedded file offsets do not match the names")
    return {name: blob[offsets[i]:offsets[i + 1]] for i, name in enumerate(names)}


def _tekken_json(pattern: str, pieces: list[bytes], specials: list[str], vocab_size: int, left_pad: int) -> bytes:
    """A ``tekken.json`` rebuilt from a file's tokenizer metadata (ranks, bytes, special strings)."""
    vocab = [{"rank": r, "token_bytes": base64.b64encode(p).decode("ascii"),
              "token_str": p.decode("utf-8", errors="ignore")} for r, p in enumerate(pieces)]
    special = [{"rank": r, "token_str": s, "is_control": True} for r, s in enumerate(specials)]
    return json.dumps({
        "config": {"pattern": pattern, "num_vocab_tokens": len(vocab), "default_vocab_size": vocab_size,
                   "default_num_special_tokens": len(specials), "version": "v7"},
        "vocab": vocab, "special_tokens": special,
        "audio": {"sampling_rate": 16000, "frame_rate": 12.5,
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
                  "transcription_delay_ms": 480.0, "transcription_format": "streaming",
                  "streaming_look_ahead_ms": 2.5, "streaming_look_back_ms": 52.5,
                  "streaming_n_left_pad_tokens": left_pad},
    }).encode("utf-8")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode map (how llama.cpp-style vocabularies spell bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _checked_tokenizer_json(layout: str, kv, reader: _Index, cfg: ModelConfig, left_pad: int) -> bytes | None:
    try:
        return _tokenizer_json(layout, kv, reader, cfg, left_pad)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, binascii.Error) as exc:
        raise VoxcError(f"the tokenizer in the GGUF metadata is damaged ({type(exc).__name__}: {exc})") from None


def _tokenizer_json(layout: str, kv, reader: _Index, cfg: ModelConfig, left_pad: int) -> bytes | None:
    if layout == "voxc":
        text = kv.get("voxc.tokenizer.tekken_json")
        if text is not None and not isinstance(text, str):
            raise VoxcError("GGUF metadata voxc.tokenizer.tekken_json is not a string")
        return None if text is None else text.encode("utf-8")
    if layout == "audio_cpp":
        return _embedded_files(reader).get("tekken.json")
    if layout == "voxtral_cpp":
        tokens = _array_field(reader, "voxtral.tokenizer.vocab_token_bytes_b64")
        specials = _array_field(reader, "voxtral.tokenizer.special_token_strings")
        if tokens is None or specials is None:
            return None
        return _tekken_json(kv.get("voxtral.tokenizer.pattern", ""), [base64.b64decode(t) for t in tokens],
                            list(specials), cfg.decoder.vocab_size, left_pad)
    if layout == "crispasr":
        specials = _array_field(reader, "tokenizer.tekken.specials")
        blob_t = next((t for t in reader.index if t[0] == "tokenizer.tekken.vocab_tensor"), None)
        if specials is None or blob_t is None:
            return None
        raw = _RawTensor(reader, *blob_t).load()
        blob = np.asarray(raw, dtype=np.float32).astype(np.uint8).tobytes()
        pieces, i = [], 0
        while i + 2 <= len(blob):           # (u16 little-endian length, bytes) per rank
            n = blob[i] | (blob[i + 1] << 8)
            pieces.append(blob[i + 2:i + 2 + n])
            i += 2 + n
        return _tekken_json(kv.get("tokenizer.tekken.pattern", ""), pieces, list(specials), cfg.decoder.vocab_size, left_pad)
    if layout == "transcribe_cpp":
        tokens = _array_field(reader, "tokenizer.ggml.tokens")
        types = _array_field(reader, "tokenizer.ggml.token_type")
        if tokens is None:
            return None
        n_special = sum(1 for t in (types or []) if int(t) == 3) or 1000
        decode = _gpt2_byte_decoder()
        pieces = [bytes(decode[c] for c in tok) for tok in tokens[n_special:]]
        from voxc.tokenizer import _TEKKEN_PATTERN   # the file names the pre-tokenizer ("tekken") only
        return _tekken_json(_TEKKEN_PATTERN, pieces, list(tokens[:n_special]),
                            cfg.decoder.vocab_size, left_pad)
    return None


# ---- reading ----------------------------------------------------------------------------------

def _concatenate_shards(paths: list[Path]) -> Path:
    """The Rust port's browser shards are ``split -b`` byte chunks: join them (next to the first)."""
    first = paths[0]
    fd, tmp = tempfile.mkstemp(prefix=first.name + ".", suffix=".joined.gguf", dir=first.parent)
    with os.fdopen(fd, "wb") as out:
        for p in paths:
            if not p.is_file():
                raise VoxcError(f"GGUF shard {p} not found")
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return Path(tmp)


def read_gguf(path: str | os.PathLike | Iterable[str | os.PathLike], *, config: ModelConfig | None = None
              ) -> tuple[ModelConfig, Iterator[tuple[str, QuantTensor | np.ndarray]], dict[str, Any]]:
    """Open a GGUF (or the list of byte shards of one) and map it onto voxc.

    ``config`` overrides the file's hyperparameters (needed only for a Rust-port file of a model
    whose head sizes differ from the 4B one).  Every tensor's presence, type, size and shape is
    checked before this returns; the iterator then reads tensors one at a time from the mapping.
    """
    if isinstance(path, (str, os.PathLike)):
        file = Path(path)
    else:
        shards = [Path(p) for p in path]
        if not shards:
            raise VoxcError("read_gguf: empty list of shards")
        file = shards[0] if len(shards) == 1 else _concatenate_shards(shards)
    try:
        cfg, tensors, metadata = _read(file, config)
    except VoxcError as exc:
        raise _naming(exc, file) from None
    return cfg, _named(tensors, file), metadata


def _naming(exc: VoxcError, file: Path) -> VoxcError:
    """Every message names the file (most checks know only the tensor or the key at fault)."""
    message = str(exc)
    return exc if str(file) in message or file.name in message else VoxcError(f"{file}: {message}")


def _named(tensors: Iterator, file: Path) -> Iterator:
    try:
        yield from tensors
    except VoxcError as exc:
        raise _naming(exc, file) from None


def _read(file: Path, config: ModelConfig | None):
    reader = _open(file)
    kv = _kv(reader)
    arch = kv.get("general.architecture")
    raw = [_RawTensor(reader, *entry) for entry in reader.index]
    layout = _detect_layout(arch, kv, [t.name for t in raw])
    to_voxc = _LAYOUT_NAMES[layout]
    unreadable = [k for k in reader.unreadable_keys if k.startswith("voxc.")]
    if layout == "voxc" and unreadable:
        raise VoxcError(f"GGUF metadata {unreadable[0]} is unreadable (damaged bytes?)")

    mapped: dict[str, _RawTensor] = {}
    ignored = []
    for t in raw:
        name = to_voxc(t.name)
        if name is None:
            ignored.append(t.name)
            continue
        if name in mapped:
            raise VoxcError(f"tensors {mapped[name].name} and {t.name} both map to {name}")
        mapped[name] = t
    shapes = {name: t.shape for name, t in mapped.items()}

    cfg = config or _config_from_kv(layout, kv, reader) or _config_from_shapes(shapes)
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in mapped]
    if missing:
        raise VoxcError(f"{file.name} ({layout} layout) lacks {len(missing)} tensor(s): "
                        f"{', '.join(mapped_name_hint(layout, n) for n in missing[:6])}{' ...' if len(missing) > 6 else ''}")
    for name, t in mapped.items():
        if name in want and tuple(t.shape) != tuple(want[name]):
            raise VoxcError(f"tensor {t.name} (voxc {name}) has shape {t.shape}, the model config needs {want[name]}")
    extra = [t.name for n, t in mapped.items() if n not in want]
    ignored += extra

    types = {name: t.gtype.name for name, t in mapped.items() if name in want}
    linear_types = collections.Counter(types[n] for n in types if QUANTIZED_WEIGHT.match(n))
    quant_counts = {k: v for k, v in linear_types.items() if k not in ("F32", "F16", "BF16")}
    main_qtype = max(quant_counts, key=quant_counts.get) if quant_counts else None
    if layout == "voxc" and "voxc.qtype" in kv:   # the requested type, whatever small layers fell back to
        if kv["voxc.qtype"] not in [q.value for q in QType]:
            raise VoxcError(f"GGUF metadata voxc.qtype is {str(kv['voxc.qtype'])[:40]!r}, not a quantization voxc knows")
        main_qtype = kv["voxc.qtype"].upper()
    pad_key = {"voxc": "voxc.left_pad_tokens", "voxtral_cpp": "voxtral.audio.n_left_pad_tokens"}.get(layout)
    if pad_key in kv:
        try:
            left_pad = check_left_pad_tokens(kv[pad_key])
        except VoxcError as exc:
            raise VoxcError(f"GGUF metadata {pad_key}: {exc}") from None
    else:
        left_pad = default_left_pad_tokens(main_qtype and main_qtype.lower())
    transcoded = [n for n, t in mapped.items() if n in want and t.gtype not in _NATIVE
                  and t.gtype not in (GT.F32, GT.F16) and len(t.shape) == 2 and t.gtype is not GT.BF16]
    metadata = {
        "layout": layout, "architecture": arch, "qtype": main_qtype and main_qtype.lower(),
        "left_pad_tokens": left_pad, "tensor_types": types, "transcoded": transcoded,
        "ignored_tensors": ignored, "kv": kv, "path": str(file),
        "tokenizer_json": _checked_tokenizer_json(layout, kv, reader, cfg, left_pad),
    }
    split_half = layout in _SPLIT_HALF_LAYOUTS

    def tensors() -> Iterator[tuple[str, QuantTensor | np.ndarray]]:
        for name in want:
            t = mapped[name]
            value = t.load()
            heads = rope_rows(name, cfg) if split_half else None
            if heads is not None:
                value = _rows_to_interleaved(value, heads)
            yield name, value

    return cfg, tensors(), metadata


def mapped_name_hint(layout: str, voxc_name: str) -> str:
    return voxc_name if layout == "voxc" else f"{voxc_name} (voxc name)"


def _rows_to_interleaved(value: QuantTensor | np.ndarray, n_heads: int):
    """HF split-half q/k rows (and encoder q bias) -> Mistral interleaved order.  Quantization
    blocks never span rows, so a quantized tensor is permuted as rows of raw block bytes."""
    if isinstance(value, QuantTensor):
        return QuantTensor(value.qtype, value.shape, hf.split_half_to_interleaved(value.data, n_heads))
    return hf.split_half_to_interleaved(value, n_heads)
