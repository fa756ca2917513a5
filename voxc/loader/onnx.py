"""The transformers.js ONNX export of Voxtral Realtime as a weight source
(``onnx-community/Voxtral-Mini-4B-Realtime-2602-ONNX`` on the Hugging Face Hub).

Only the weights are read; voxc compiles its own graph (the export's graphs use ONNX Runtime's
contrib ops and a KV cache that grows by concatenation, see ../shared/research/onnx_export.md).

An export directory, as transformers.js downloads it::

    config.json  tekken.json  ...             transformers' config, Mistral's tokenizer
    onnx/audio_encoder<sfx>.onnx              conv stem, encoder layers, final norm, adapter
    onnx/embed_tokens<sfx>.onnx               the token table
    onnx/decoder_model_merged<sfx>.onnx       decoder layers, final norm, LM head
    onnx/<graph><sfx>.onnx_data[_1 ...]       external data of each graph

``<sfx>`` names the variant: ``''`` fp32, ``_fp16``, ``_q4`` (4-bit, f32 scales), ``_q4f16``
(4-bit, f16 scales).  The variant is the one whose files are there; a directory with several
is built from the variant of a ``.onnx`` file given instead of the directory.

**Reading.**  ``onnx.load(..., load_external_data=False)`` parses only each graph's protobuf (a
few hundred KB); every initializer's ``external_data`` entry (location, offset, length) is then
memory-mapped with numpy, so no weight is read before the build asks for it and at most one
converted tensor is in memory at a time.

**Mapping.**  Weights are found by walking the nodes that consume them (MatMulNBits, MatMul, Gemm,
Gather, GatherBlockQuantized, DequantizeLinear, Conv, the RMSNorm ops or a decomposed norm's Mul),
not by trusting initializer names: the role comes from the module path in the node name
(``/model/layers.3/attn/q_proj/MatMul_Q4``, ``/audio_tower/layers.0/self_attn/q_proj/MatMul``,
...) or, for anonymous nodes, from the initializer's name; biases are the constant vector of an
Add fed by a weight node (or MatMulNBits' and Gemm's bias inputs).  Each graph's roles are the
transformers module names (``voxc.loader.hf``), mapped onto voxc's.  q/k rows (and the encoder q
bias) are in transformers' split-half RoPE order and are permuted back by rows, as
``hf.split_half_to_interleaved`` does, unless the graph's rotary op says ``interleaved``.
Anything missing, doubled or of the wrong shape is an error naming the graph, the node and the
voxc tensor.

**4-bit weights** (MatMulNBits; the table through GatherBlockQuantized or a Gather of a blocked
DequantizeLinear: asymmetric, ``w = s * (q - z)``, q and z in 0..15, blocks along the input
features) are kept without a second quantization: ``q - z`` is an int8 in -15..15 and a Q8_0
block is exactly 32 int8 values and one f16 scale, so with f16 scales (q4f16) the Q8_0 blocks hold
the export's weights exactly.  With f32 scales (q4) rounding each scale to f16 is the only change,
measured and printed.  Rows that are not whole 32-blocks are dequantized to float32 (exact).

**The delay.**  The export folds the 480 ms delay conditioning into constants: each decoder
layer's ``1 + ada_rms_norm(t_cond)`` is a constant vector multiplied after
``post_attention_layernorm``.  voxc folds that vector into the layer's ``ffn_norm`` weight and
zeroes the ada-norm linears, so the artifact computes the export's model exactly, for that delay
only; the artifact records it (``voxc.artifact.FIXED_DELAY_FIELD``) and the runtime refuses any
other.  An export that still carries the ada-norm linears keeps every delay.

The LM head is tied to the token table in voxc's graph; a separately stored ``lm_head`` is
compared with the table and the difference reported.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from voxc.artifact import check_config, delay_tokens
from voxc.config import ModelConfig
from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import QUANTIZED_WEIGHT, expected_shapes, rope_rows
from voxc.quant.formats import QType, QuantTensor

ONNX_DIR = "onnx"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tekken.json"
GRAPHS = ("audio_encoder", "embed_tokens", "decoder_model_merged")
# transformers.js file suffix -> dtype name (packages/transformers/src/utils/dtypes.js)
VARIANTS = {"": "fp32", "_fp16": "fp16", "_q4": "q4", "_q4f16": "q4f16"}
OTHER_VARIANTS = {"_quantized": "q8", "_int8": "int8", "_uint8": "uint8", "_bnb4": "bnb4"}
DEFAULT_DELAY_TOKENS = 6      # transformers' default_num_delay_tokens (480 ms)
_ROW_CHUNK = 4096             # rows converted at a time (bounds the temporaries of the 131072-row tables)
_F16_MAX = 65504.0


# ---- finding the export ------------------------------------------------------------------------
def is_onnx_export(path: str | Path) -> bool:
    """``path`` is a transformers.js export directory, its ``onnx/`` folder or one of its .onnx files."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".onnx"
    if not path.is_dir() or any(path.glob("*.safetensors")):   # a checkpoint beside an export wins
        return False
    return any((path / ONNX_DIR).glob("*.onnx")) or any(path.glob("*.onnx"))


def _variant_of(stem: str) -> tuple[str, str] | None:
    """(graph, variant) of a file stem such as ``decoder_model_merged_q4f16``."""
    for graph in GRAPHS:
        if stem.startswith(graph):
            suffix = stem[len(graph):]
            return graph, VARIANTS.get(suffix) or OTHER_VARIANTS.get(suffix) or suffix.lstrip("_")
    return None


def locate_export(path: str | Path) -> tuple[Path, dict[str, Path]]:
    """The export's root directory (config.json, tekken.json) and the file of each graph."""
    path = Path(path)
    requested = None
    if path.is_file():
        found = _variant_of(path.stem)
        if found is None:
            raise VoxcError(f"{path.name} is not one of the export's graphs ({', '.join(GRAPHS)})")
        requested = found[1]
        onnx_dir = path.parent
    else:
        onnx_dir = path / ONNX_DIR if (path / ONNX_DIR).is_dir() else path
    if (onnx_dir / CONFIG_FILE).is_file():
        root = onnx_dir
    elif (onnx_dir.parent / CONFIG_FILE).is_file() or onnx_dir.name == ONNX_DIR:
        root = onnx_dir.parent
    else:
        root = onnx_dir

    files: dict[str, dict[str, Path]] = {g: {} for g in GRAPHS}
    for f in sorted(onnx_dir.glob("*.onnx")):
        found = _variant_of(f.stem)
        if found:
            files[found[0]][found[1]] = f
    supported = set(VARIANTS.values())
    if requested is not None:
        if requested not in supported:
            raise VoxcError(f"voxc reads the {', '.join(VARIANTS.values())} variants of the export, not {requested}")
        missing = [g for g in GRAPHS if requested not in files[g]]
        if missing:
            raise VoxcError(f"{onnx_dir} has no {requested} file for {', '.join(missing)} (expected "
                            f"{', '.join(_file_name(g, requested) for g in missing)})")
        return root, {g: files[g][requested] for g in GRAPHS}

    missing = [g for g in GRAPHS if not files[g]]
    if missing:
        raise VoxcError(f"{onnx_dir} is not a complete transformers.js export: no graph file for "
                        f"{', '.join(missing)} (expected {', '.join(g + '<variant>.onnx' for g in missing)}; "
                        f"the export has {', '.join(GRAPHS)})")
    usable = {g: {v: p for v, p in files[g].items() if v in supported} for g in GRAPHS}
    unusable = [g for g in GRAPHS if not usable[g]]
    if unusable:
        g = unusable[0]
        raise VoxcError(f"{onnx_dir}: {g} exists only as {', '.join(sorted(files[g]))}; voxc reads the "
                        f"{', '.join(VARIANTS.values())} variants (download one of those)")
    if all(len(v) == 1 for v in usable.values()):
        return root, {g: next(iter(usable[g].values())) for g in GRAPHS}
    common = set.intersection(*(set(v) for v in usable.values()))
    if len(common) == 1:
        variant = common.pop()
        return root, {g: usable[g][variant] for g in GRAPHS}
    found_variants = sorted(set().union(*(set(v) for v in usable.values())))
    example = onnx_dir / _file_name("decoder_model_merged", sorted(common)[0] if common else found_variants[0])
    raise VoxcError(f"{onnx_dir} holds several variants ({', '.join(found_variants)}): choose one by building "
                    f"from one of its files, e.g. `voxc build {example}`")


def _file_name(graph: str, variant: str) -> str:
    suffix = {v: s for s, v in VARIANTS.items()}.get(variant, "_" + variant)
    return f"{graph}{suffix}.onnx"


# ---- tensors: initializers (external data memory-mapped) and constants ------------------------------
class _DataFiles:
    """The external data files next to the graphs, each memory-mapped once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._maps: dict[str, np.ndarray] = {}
        self._sizes: dict[str, int] = {}

    def check(self, location: str, offset: int, length: int, what: str) -> None:
        """The bytes exist (checked when the graph is opened, so a damaged download fails before the compile)."""
        if not location or Path(location).is_absolute() or any(p in ("..", "") for p in Path(location).parts) \
                or "\\" in location:
            raise VoxcError(f"{what}: external data location {location!r} is not a file next to the graph")
        path = self.directory / location
        if location not in self._sizes:
            if not path.is_file():
                raise VoxcError(f"{what}: its external data file {path} is missing (the download is incomplete)")
            self._sizes[location] = path.stat().st_size
        if offset < 0 or offset + length > self._sizes[location]:
            raise VoxcError(f"{what}: needs bytes {offset}..{offset + length} of {path}, which has "
                            f"{self._sizes[location]} (truncated download?)")

    def bytes(self, location: str, offset: int, length: int, what: str) -> np.ndarray:
        self.check(location, offset, length, what)
        if location not in self._maps:
            path = self.directory / location
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r") if self._sizes[location] \
                else np.zeros(0, np.uint8)
        data = self._maps[location]
        if data.shape[0] < offset + length:
            raise VoxcError(f"{what}: {self.directory / location} shrank to {data.shape[0]} bytes while being read")
        return data[offset:offset + length]


_FOUR_BIT = (21, 22)        # TensorProto.UINT4, TensorProto.INT4


@dataclasses.dataclass
class _Tensor:
    """An initializer or Constant value: its shape and type, read on demand."""
    name: str
    shape: tuple[int, ...]
    data_type: int
    where: str                       # "<graph file>: <name>" for messages
    _load: Callable[[], np.ndarray]  # typed array (4-bit types: the packed bytes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.data_type in (1, 10, 16)   # FLOAT, FLOAT16, BFLOAT16

    def array(self) -> np.ndarray:
        return self._load()

    def floats(self) -> np.ndarray:
        """The values as float32 (read-only memory-mapped where the stored type is float32)."""
        a = self._load()
        return a if a.dtype == np.float32 else a.astype(np.float32)


def _np_dtype(data_type: int, where: str) -> np.dtype:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:   # noqa: BLE001 - unknown enum values raise KeyError/ValueError by onnx version
        raise VoxcError(f"{where}: unsupported ONNX tensor type {data_type}") from None


def _tensor_from_proto(t, files: _DataFiles, graph_file: str) -> _Tensor:
    from onnx import TensorProto, numpy_helper

    where = f"{graph_file}: initializer {t.name}"
    shape = tuple(int(d) for d in t.dims)
    numel = math.prod(shape)
    four_bit = t.data_type in _FOUR_BIT
    if four_bit:
        nbytes, dtype = (numel + 1) // 2, np.dtype(np.uint8)
    else:
        dtype = _np_dtype(t.data_type, where)
        nbytes = numel * dtype.itemsize
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else nbytes
        except ValueError:
            raise VoxcError(f"{where}: unreadable external data entry {info}") from None
        if length != nbytes:
            raise VoxcError(f"{where}: {length} bytes of external data for shape {list(shape)}, expected {nbytes}")
        location = info.get("location", "")
        files.check(location, offset, length, where)

        def load():
            raw = files.bytes(location, offset, length, where)
            return raw if four_bit else raw.view(dtype).reshape(shape)
    elif t.HasField("raw_data") or four_bit:
        # inline 4-bit values may also be packed bytes in int32_data (onnx.helper.make_tensor does that)
        raw_bytes = t.raw_data or (np.asarray(t.int32_data, np.uint8).tobytes() if four_bit else b"")

        def load():
            raw = np.frombuffer(raw_bytes, np.uint8)
            if raw.size != nbytes:
                raise VoxcError(f"{where}: {raw.size} bytes of data for shape {list(shape)}, expected {nbytes}")
            return raw if four_bit else raw.view(dtype).reshape(shape)
    else:
        def load():
            return numpy_helper.to_array(t).astype(dtype, copy=False).reshape(shape)
    return _Tensor(t.name, shape, int(t.data_type), where, load)


def _constant_value(node, graph_file: str) -> _Tensor | None:
    """The value of a Constant node (inline, small), or None for forms that are not plain tensors."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            t = attr.t
            if t.data_location == 1 or t.data_type in _FOUR_BIT:
                return None
            from onnx import numpy_helper
            value = numpy_helper.to_array(t)
            return _Tensor(node.output[0], tuple(value.shape), int(t.data_type), f"{graph_file}: Constant {node.name}",
                           lambda v=value: v)
        if attr.name in ("value_float", "value_floats"):
            value = np.asarray(helper.get_attribute_value(attr), np.float32)
            return _Tensor(node.output[0], tuple(value.shape), 1, f"{graph_file}: Constant {node.name}",
                           lambda v=value: v)
    return None


class _Graph:
    """One graph file: its nodes (with those of subgraphs), initializers, constants and edges."""

    def __init__(self, kind: str, path: Path, files: _DataFiles):
        try:
            import onnx
        except ImportError:
            raise VoxcError("reading an ONNX export needs the onnx package: pip install onnx") from None

        self.kind, self.path, self.file = kind, path, path.name
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:   # noqa: BLE001 - protobuf DecodeError, OSError ...
            raise VoxcError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
        self.nodes = []
        self.tensors: dict[str, _Tensor] = {}
        self._collect(model.graph, files)
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers = collections.defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)

    def _collect(self, graph, files: _DataFiles) -> None:
        for t in graph.initializer:
            self.tensors[t.name] = _tensor_from_proto(t, files, self.file)
        for node in graph.node:
            self.nodes.append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node, self.file)
                if value is not None:
                    self.tensors[node.output[0]] = value
            for attr in node.attribute:   # If / Loop / Scan bodies (an optimum-style merged decoder)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    self._collect(sub, files)

    def const(self, name: str) -> _Tensor | None:
        """The constant feeding edge ``name``: an initializer or Constant, through Cast/Identity."""
        seen = 0
        while name not in self.tensors and seen < 4:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Cast", "Identity") or not node.input:
                return None
            name, seen = node.input[0], seen + 1
        return self.tensors.get(name)

    def attrs(self, node) -> dict:
        from onnx import helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def rotary_interleaved(self) -> bool:
        """Whether the graph's RoPE op pairs adjacent rows (Mistral's order) instead of halves."""
        for node in self.nodes:
            a = self.attrs(node)
            if node.op_type == "GroupQueryAttention" and a.get("do_rotary") and a.get("rotary_interleaved"):
                return True
            if node.op_type == "RotaryEmbedding" and a.get("interleaved"):
                return True
        return False


# ---- roles: module paths in node and initializer names ---------------------------------------------
_PROJ = {"q_proj": "attention.wq", "wq": "attention.wq", "k_proj": "attention.wk", "wk": "attention.wk",
         "v_proj": "attention.wv", "wv": "attention.wv", "o_proj": "attention.wo", "out_proj": "attention.wo",
         "wo": "attention.wo", "gate_proj": "feed_forward.w1", "w1": "feed_forward.w1",
         "up_proj": "feed_forward.w3", "w3": "feed_forward.w3", "down_proj": "feed_forward.w2",
         "w2": "feed_forward.w2"}
_LAYER_NORMS = {"input_layernorm": "attention_norm", "self_attn_layer_norm": "attention_norm",
                "attention_norm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                "final_layer_norm": "ffn_norm", "ffn_norm": "ffn_norm"}
_FINAL_NORMS = ("final_norm_layernorm", "final_norm", "final_layernorm")


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[/.:]", name) if t]


def role(name: str, kind: str, n_layers: int) -> str | None:
    """voxc prefix (``enc.layers.3.attention.wq``, ``adapter.w_in``, ``lm_head``, ...) of the module a
    node or initializer name belongs to in graph ``kind``, or None."""
    tokens = _tokens(name)
    layer, rest = None, tokens
    for i, tok in enumerate(tokens[:-1]):
        if tok == "layers" and tokens[i + 1].isdigit():
            layer, rest = int(tokens[i + 1]), tokens[i + 2:]
            break
    tower = "enc" if kind == "audio_encoder" else "dec"
    if kind == "embed_tokens":
        return "tok_embeddings"
    if any(t in _FINAL_NORMS for t in rest) or (layer in (None, n_layers) and "norm" in rest):
        return f"{tower}.norm"
    if layer is not None and layer < n_layers:
        prefix = f"{tower}.layers.{layer}."
        for i, tok in enumerate(rest):
            if tok.startswith("ada_rms_norm") or tok == "ada_norm":
                nxt = rest[i + 1] if i + 1 < len(rest) else ""
                if nxt in ("linear1", "0", "w_in"):
                    return prefix + "ada_norm.w_in"
                if nxt in ("linear2", "2", "w_out"):
                    return prefix + "ada_norm.w_out"
                return None
        for tok in rest:
            if tok in _PROJ:
                return prefix + _PROJ[tok]
            if tok in _LAYER_NORMS:
                return prefix + _LAYER_NORMS[tok]
        return None
    if kind == "audio_encoder":
        for i, tok in enumerate(rest):
            if tok in ("conv1", "conv2"):
                return f"enc.conv{int(tok[-1]) - 1}"
            if tok == "conv_layers" and i + 1 < len(rest) and rest[i + 1] in ("0", "1"):
                return f"enc.conv{rest[i + 1]}"
            if tok in ("linear_1", "linear_2"):
                return f"adapter.w_{'in' if tok == 'linear_1' else 'out'}"
    if "lm_head" in rest:
        return "lm_head"
    if "embed_tokens" in rest or "tok_embeddings" in rest:
        return "tok_embeddings"
    return None


# ---- 4-bit blocks ----------------------------------------------------------------------------------
def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes [..., n] -> uint8 values [..., count]: element 2i in the low nibble of byte i."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


@dataclasses.dataclass
class _Blocks:
    """A 4-bit weight ``[rows, cols]`` stored as codes, per-block scales and zero points along the
    rows (MatMulNBits' B / GatherBlockQuantized's data): ``w = scale * (code - zero)``."""
    rows: int
    cols: int
    block: int
    codes: Callable[[int, int], np.ndarray]   # rows r0:r1 -> int16 [r, k_blocks * block]
    zeros: Callable[[int, int], np.ndarray]   # rows r0:r1 -> int16 [r, k_blocks]
    scales: np.ndarray                        # [rows, k_blocks], float16 or float32
    where: str

    @property
    def k_blocks(self) -> int:
        return -(-self.cols // self.block)

    @property
    def f16_scales(self) -> bool:
        return self.scales.dtype == np.float16

    def fits_q8_0(self) -> bool:
        """Whether Q8_0 blocks can hold this weight: 32-blocks within one scale block, f16 scales in range."""
        return (self.block % 32 == 0 and self.cols % 32 == 0
                and (self.f16_scales or bool(np.all(np.abs(self.scales.astype(np.float32)) <= _F16_MAX))))

    def scale_error(self) -> float:
        """Largest relative change of a weight when its scale is rounded to f16 (0 for f16 scales)."""
        if self.f16_scales:
            return 0.0
        worst = 0.0
        for r0 in range(0, self.rows, 8 * _ROW_CHUNK):
            s = np.asarray(self.scales[r0:r0 + 8 * _ROW_CHUNK], np.float64)
            rounded = s.astype(np.float16).astype(np.float64)
            nz = s != 0
            if nz.any():
                worst = max(worst, float(np.max(np.abs(rounded[nz] - s[nz]) / np.abs(s[nz]))))
        return worst

    def to_q8_0(self) -> QuantTensor:
        per = self.block // 32                            # Q8_0 blocks per scale block
        n = self.cols // 32
        data = np.empty((self.rows, n * 34), np.uint8)
        for r0 in range(0, self.rows, _ROW_CHUNK):
            r1 = min(self.rows, r0 + _ROW_CHUNK)
            values = (self.codes(r0, r1)[:, :self.cols] - np.repeat(self.zeros(r0, r1), self.block, axis=1)
                      [:, :self.cols]).astype(np.int8)
            d = np.repeat(np.asarray(self.scales[r0:r1]).astype(np.float16), per, axis=1)[:, :n]
            out = data[r0:r1].reshape(r1 - r0, n, 34)
            out[:, :, :2] = d.view(np.uint8).reshape(r1 - r0, n, 2)
            out[:, :, 2:] = values.view(np.uint8).reshape(r1 - r0, n, 32)
        return QuantTensor(QType.Q8_0, (self.rows, self.cols), data)

    def dequantize(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        r1 = self.rows if r1 is None else r1
        out = np.empty((r1 - r0, self.cols), np.float32)
        for a in range(r0, r1, _ROW_CHUNK):
            b = min(r1, a + _ROW_CHUNK)
            scale = np.repeat(np.asarray(self.scales[a:b], np.float32), self.block, axis=1)[:, :self.cols]
            q = (self.codes(a, b) - np.repeat(self.zeros(a, b), self.block, axis=1))[:, :self.cols]
            out[a - r0:b - r0] = q.astype(np.float32) * scale
        return out


def _scales_2d(t: _Tensor, rows: int, k_blocks: int, where: str) -> np.ndarray:
    if t.numel != rows * k_blocks or t.data_type not in (1, 10):
        raise VoxcError(f"{where}: scales {t.name} have shape {list(t.shape)} (type {t.data_type}), expected "
                        f"{rows * k_blocks} float32/float16 values ([{rows}, {k_blocks}])")
    return t.array().reshape(rows, k_blocks)


def _packed_rows(t: _Tensor, rows: int, row_bytes: int, where: str, what: str) -> np.ndarray:
    """uint8 [rows, row_bytes] view of a uint8 tensor packed per row (MatMulNBits' convention)."""
    if t.data_type != 2 or t.numel != rows * row_bytes:
        raise VoxcError(f"{where}: {what} {t.name} has shape {list(t.shape)} (type {t.data_type}), expected "
                        f"{rows * row_bytes} uint8 values ([{rows}, {row_bytes}])")
    return t.array().reshape(rows, row_bytes)


def _four_bit_rows(t: _Tensor, rows: int, cols: int, where: str, what: str) -> Callable[[int, int], np.ndarray]:
    """Rows of an ONNX UINT4/INT4 tensor [rows, cols] (packed over the flattened tensor, low nibble first)."""
    if t.data_type not in _FOUR_BIT or t.numel != rows * cols:
        raise VoxcError(f"{where}: {what} {t.name} has shape {list(t.shape)}, expected [{rows}, {cols}] 4-bit values")
    signed = t.data_type == 22

    def values(r0: int, r1: int) -> np.ndarray:
        raw = t.array()
        if cols % 2 == 0:
            v = _unpack_nibbles(raw[r0 * cols // 2:r1 * cols // 2].reshape(r1 - r0, cols // 2), cols)
        else:
            v = _unpack_nibbles(raw.reshape(1, -1), rows * cols).reshape(rows, cols)[r0:r1]
        v = v.astype(np.int16)
        return np.where(v >= 8, v - 16, v) if signed else v
    return values


def _matmul_nbits(g: _Graph, node) -> tuple[_Blocks, str]:
    """The weight of a com.microsoft MatMulNBits node: B uint8 [N, k_blocks, block/2], scales
    [N, k_blocks] (or flat), zero points uint8 [N, ceil(k_blocks/2)] packed two per byte (or absent: 8)."""
    where = f"{g.file}: MatMulNBits {node.name}"
    a = g.attrs(node)
    try:
        k, n, bits, block = int(a["K"]), int(a["N"]), int(a.get("bits", 4)), int(a["block_size"])
    except KeyError as exc:
        raise VoxcError(f"{where} lacks the attribute {exc}") from None
    if bits != 4:
        raise VoxcError(f"{where} stores {bits}-bit weights; voxc reads the 4-bit ones of the q4 / q4f16 exports")
    if block < 16 or block & (block - 1):
        raise VoxcError(f"{where}: block_size {block} is not a power of two >= 16")
    inputs = list(node.input) + [""] * 6
    b, s = g.const(inputs[1]), g.const(inputs[2])
    if b is None or s is None:
        raise VoxcError(f"{where}: its weight or scales are not initializers")
    if inputs[4]:
        raise VoxcError(f"{where} uses g_idx (act-order), which voxc does not read")
    kb = -(-k // block)
    blob = block // 2
    scales = _scales_2d(s, n, kb, where)
    braw = _packed_rows(b, n, kb * blob, where, "B")
    codes = lambda r0, r1: _unpack_nibbles(np.asarray(braw[r0:r1]), kb * block).astype(np.int16)  # noqa: E731
    zp = g.const(inputs[3]) if inputs[3] else None
    if inputs[3] and zp is None:
        raise VoxcError(f"{where}: its zero points are not an initializer")
    if zp is None:
        zeros = lambda r0, r1: np.full((r1 - r0, kb), 8, np.int16)  # noqa: E731
    elif zp.data_type == 2:
        zraw = _packed_rows(zp, n, (kb + 1) // 2, where, "zero_points")
        zeros = lambda r0, r1: _unpack_nibbles(np.asarray(zraw[r0:r1]), kb).astype(np.int16)  # noqa: E731
    else:
        raise VoxcError(f"{where}: float zero points ({zp.name}) are not supported; voxc reads uint8 ones")
    return _Blocks(n, k, block, codes, zeros, scales, where), (inputs[5] or "")


def _gather_block_quantized(g: _Graph, node) -> _Blocks:
    """The table of a com.microsoft GatherBlockQuantized node quantized along its rows: data uint8
    [V, D/2] (two values a byte, MatMulNBits' zero point default 8) or UINT4/INT4 [V, D]."""
    where = f"{g.file}: GatherBlockQuantized {node.name}"
    a = g.attrs(node)
    gather_axis, quantize_axis = int(a.get("gather_axis", 0)), int(a.get("quantize_axis", 1))
    block, bits = int(a.get("block_size", 128)), int(a.get("bits", 4))
    data, s = g.const(node.input[0]), g.const(node.input[2]) if len(node.input) > 2 else None
    if data is None or s is None:
        raise VoxcError(f"{where}: its data or scales are not initializers")
    if len(data.shape) != 2 or gather_axis != 0 or quantize_axis not in (1, -1) or bits != 4:
        raise VoxcError(f"{where}: voxc reads a 2-D 4-bit table gathered on axis 0 and quantized along axis 1, "
                        f"not shape {list(data.shape)}, gather_axis {gather_axis}, quantize_axis {quantize_axis}, "
                        f"bits {bits}")
    rows = data.shape[0]
    if data.data_type in _FOUR_BIT:
        cols = data.shape[1]
        codes_of = _four_bit_rows(data, rows, cols, where, "data")
        default_zero = 0
    elif data.data_type == 2:
        cols = data.shape[1] * 2
        raw = data.array().reshape(rows, data.shape[1])
        codes_of = lambda r0, r1: _unpack_nibbles(np.asarray(raw[r0:r1]), cols).astype(np.int16)  # noqa: E731
        default_zero = 8
    else:
        raise VoxcError(f"{where}: table type {data.data_type} is not 4-bit")
    kb = -(-cols // block)
    scales = _scales_2d(s, rows, kb, where)
    zp = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if zp is None:
        zeros = lambda r0, r1: np.full((r1 - r0, kb), default_zero, np.int16)  # noqa: E731
    elif zp.data_type in _FOUR_BIT:
        zeros = _four_bit_rows(zp, rows, kb, where, "zero_points")
    elif zp.data_type == 2:
        zraw = _packed_rows(zp, rows, (kb + 1) // 2, where, "zero_points")
        zeros = lambda r0, r1: _unpack_nibbles(np.asarray(zraw[r0:r1]), kb).astype(np.int16)  # noqa: E731
    else:
        raise VoxcError(f"{where}: zero points of type {zp.data_type} are not supported")
    return _Blocks(rows, cols, block, _padded(codes_of, kb * block), zeros, scales, where)


def _padded(codes_of: Callable[[int, int], np.ndarray], width: int) -> Callable[[int, int], np.ndarray]:
    """Rows of codes padded with zeros to whole blocks."""
    def codes(r0, r1):
        v = codes_of(r0, r1)
        return np.pad(v, ((0, 0), (0, width - v.shape[1]))) if v.shape[1] < width else v
    return codes


def _dequantize_linear(g: _Graph, node) -> _Blocks:
    """A table stored for ONNX's blocked DequantizeLinear (opset 21): x UINT4/INT4 [V, D], scale
    [V, ceil(D/block)], optional zero point of x's type, blocks along axis 1."""
    where = f"{g.file}: DequantizeLinear {node.name}"
    a = g.attrs(node)
    axis, block = int(a.get("axis", 1)), int(a.get("block_size", 0))
    x = g.const(node.input[0])
    s = g.const(node.input[1]) if len(node.input) > 1 else None
    if x is None or s is None or len(x.shape) != 2 or x.data_type not in _FOUR_BIT or axis not in (1, -1) \
            or block <= 0:
        raise VoxcError(f"{where}: voxc reads a 2-D 4-bit table with blocks along axis 1, not "
                        f"{'a computed input' if x is None else f'shape {list(x.shape)} of type {x.data_type}'}, "
                        f"axis {axis}, block_size {block}")
    rows, cols = x.shape
    kb = -(-cols // block)
    scales = _scales_2d(s, rows, kb, where)
    zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and zp is None:
        raise VoxcError(f"{where}: its zero point is not an initializer")
    zeros = _four_bit_rows(zp, rows, kb, where, "zero point") if zp is not None else \
        (lambda r0, r1: np.zeros((r1 - r0, kb), np.int16))
    return _Blocks(rows, cols, block, _padded(_four_bit_rows(x, rows, cols, where, "x"), kb * block), zeros,
                   scales, where)


# ---- one weight found in a graph ---------------------------------------------------------------------
@dataclasses.dataclass
class _Found:
    """A tensor of the export mapped to a voxc name, read on demand in torch layout ([out, in])."""
    name: str                 # voxc tensor name
    graph: _Graph
    node: str                 # node name, for messages
    shape: tuple[int, ...]
    stored: str               # how the file stores it: "F32", "F16", "4-bit"
    dense: _Tensor | None = None
    transpose: bool = False   # MatMul weights are [in, out]
    blocks: _Blocks | None = None
    source: str = ""          # initializer name (to tell a shared initializer from a duplicate)

    def float_array(self) -> np.ndarray:
        if self.blocks is not None:
            return self.blocks.dequantize()
        a = self.dense.array()
        if a.dtype not in (np.float32, np.float16):
            a = a.astype(np.float32)
        return np.ascontiguousarray(a.T) if self.transpose else a.reshape(self.shape)


def _dtype_label(t: _Tensor) -> str:
    return {1: "F32", 10: "F16", 16: "BF16"}.get(t.data_type, f"type {t.data_type}")


_NORM_OPS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2, "RMSNormalization": 1,
             "LayerNormalization": 1, "SkipLayerNormalization": 2}


class _Collector:
    """Walks one graph and maps every weight-consuming node onto voxc names."""

    def __init__(self, g: _Graph, cfg: ModelConfig):
        self.g, self.cfg = g, cfg
        self.tower = cfg.encoder if g.kind == "audio_encoder" else cfg.decoder
        self.found: dict[str, _Found] = {}
        self.unplaced: list[str] = []
        self.linear_out: dict[str, _Found] = {}     # output edge of a linear -> its weight (biases follow)
        self.norm_nodes: dict[str, object] = {}     # voxc norm name -> the node applying its weight
        self.mul_norms: dict[str, tuple] = {}       # the same for decomposed norms (Mul nodes)
        self.ada_scales: dict[int, _Tensor] = {}

    def role(self, node, weight_name: str = "") -> str | None:
        n_layers = self.tower.n_layers
        return role(node.name, self.g.kind, n_layers) or (role(weight_name, self.g.kind, n_layers)
                                                           if weight_name else None)

    def add(self, found: _Found) -> None:
        old = self.found.get(found.name)
        if old is not None and not (old.source and old.source == found.source):
            raise VoxcError(f"{self.g.file}: nodes {old.node} and {found.node} both map to voxc's {found.name}")
        self.found[found.name] = found

    def run(self) -> None:
        g = self.g
        for node in g.nodes:
            op = node.op_type
            if op == "MatMulNBits":
                blocks, bias = _matmul_nbits(g, node)
                self._linear(node, node.input[1], (blocks.rows, blocks.cols), "4-bit", blocks=blocks, bias=bias)
            elif op in ("MatMul", "Gemm") and len(node.input) >= 2:
                w = g.const(node.input[1])
                if w is None or len(w.shape) != 2 or not w.is_float:
                    continue
                transpose = not (op == "Gemm" and g.attrs(node).get("transB", 0))
                shape = (w.shape[1], w.shape[0]) if transpose else w.shape
                bias = node.input[2] if op == "Gemm" and len(node.input) > 2 else ""
                self._linear(node, w.name, shape, _dtype_label(w), dense=w, transpose=transpose, bias=bias)
            elif op == "Gather":
                w = g.const(node.input[0])
                dq = g.producer.get(node.input[0])
                if w is not None and len(w.shape) == 2 and w.is_float:
                    self._table(node, w.name, w.shape, _dtype_label(w), dense=w)
                elif w is None and dq is not None and dq.op_type == "DequantizeLinear":
                    blocks = _dequantize_linear(g, dq)
                    self._table(node, dq.input[0], (blocks.rows, blocks.cols), "4-bit", blocks=blocks)
            elif op == "GatherBlockQuantized":
                blocks = _gather_block_quantized(g, node)
                self._table(node, node.input[0], (blocks.rows, blocks.cols), "4-bit", blocks=blocks)
            elif op == "Conv":
                self._conv(node)
            elif op in _NORM_OPS or op == "Mul":
                self._norm(node)
        for name, (found, node) in self.mul_norms.items():   # norm ops' weights first, then decomposed ones
            if name not in self.found:
                self.add(found)
                self.norm_nodes[name] = node
        for node in g.nodes:        # biases: Add(linear output, constant vector)
            if node.op_type == "Add" and len(node.input) == 2:
                for i in (0, 1):
                    lin = self.linear_out.get(node.input[i])
                    vec = g.const(node.input[1 - i])
                    if lin is not None and vec is not None and vec.numel == lin.shape[0] and vec.is_float:
                        self._bias(lin, vec, node.name)
        if g.kind == "decoder_model_merged":
            self._ada_scales()

    def _linear(self, node, weight_name, shape, stored, *, dense=None, transpose=False, blocks=None, bias=""):
        name = self.role(node, weight_name)
        if name is None:
            self.unplaced.append(f"{node.op_type} {node.name or '(unnamed)'} ({weight_name}, {list(shape)})")
            return
        if name.endswith("norm") or ".conv" in name:
            self.unplaced.append(f"{node.op_type} {node.name} ({weight_name}, {list(shape)})")
            return
        name += ".weight"
        found = _Found(name, self.g, node.name, tuple(shape), stored, dense=dense, transpose=transpose,
                       blocks=blocks, source=weight_name)
        self.add(found)
        self.linear_out[node.output[0]] = found
        if bias:
            vec = self.g.const(bias)
            if vec is None:
                raise VoxcError(f"{self.g.file}: the bias of {node.name} is not an initializer")
            self._bias(found, vec, node.name)

    def _bias(self, lin: _Found, vec: _Tensor, node_name: str) -> None:
        name = lin.name[:-len("weight")] + "bias"
        self.add(_Found(name, self.g, node_name, (vec.numel,), _dtype_label(vec), dense=vec, source=vec.name))

    def _table(self, node, weight_name, shape, stored, *, dense=None, blocks=None):
        name = "tok_embeddings" if self.g.kind == "embed_tokens" else self.role(node, weight_name)
        if name != "tok_embeddings":
            self.unplaced.append(f"{node.op_type} {node.name} ({weight_name}, {list(shape)})")
            return
        self.add(_Found("tok_embeddings.weight", self.g, node.name, tuple(shape), stored, dense=dense, blocks=blocks,
                        source=weight_name))

    def _conv(self, node):
        if self.g.kind != "audio_encoder":
            return
        w = self.g.const(node.input[1])
        if w is None or len(w.shape) != 3:
            return
        name = self.role(node, w.name)
        if name not in ("enc.conv0", "enc.conv1"):   # by shape: the first conv reads the mel bins
            name = "enc.conv0" if w.shape[1] == self.cfg.encoder.num_mel_bins else "enc.conv1"
        self.add(_Found(name + ".weight", self.g, node.name, w.shape, _dtype_label(w), dense=w, source=w.name))
        if len(node.input) > 2 and node.input[2]:
            b = self.g.const(node.input[2])
            if b is not None:
                self.add(_Found(name + ".bias", self.g, node.name, (b.numel,), _dtype_label(b), dense=b, source=b.name))

    def _norm(self, node):
        dim = self.tower.dim
        if node.op_type in _NORM_OPS:
            index = _NORM_OPS[node.op_type]
            candidates = [node.input[index]] if len(node.input) > index else []
        else:     # a decomposed RMSNorm: Mul(weight, normalized) inside the norm's module
            candidates = list(node.input)
        for edge in candidates:
            w = self.g.const(edge)
            if w is None or w.numel != dim or not w.is_float:
                continue
            name = self.role(node, w.name)
            if name is None or not name.endswith("norm"):
                continue
            found = _Found(name + ".weight", self.g, node.name, (dim,), _dtype_label(w), dense=w, source=w.name)
            if node.op_type in _NORM_OPS:
                self.add(found)
                self.norm_nodes[name] = node
            elif name not in self.mul_norms:   # the first Mul of a norm's scope applies its weight
                self.mul_norms[name] = (found, node)
            return

    def _ada_scales(self):
        """The constant ``1 + ada_rms_norm(t_cond)`` multiplied after each layer's post-attention norm."""
        for i in range(self.cfg.decoder.n_layers):
            node = self.norm_nodes.get(f"dec.layers.{i}.ffn_norm")
            value = self._scale_after(node.output[0]) if node is not None else None
            if value is not None:
                self.ada_scales[i] = value

    def _scale_after(self, edge: str, hops: int = 3) -> _Tensor | None:
        """The constant vector a Mul applies to ``edge`` (through Cast / Identity)."""
        for user in self.g.consumers.get(edge, []):
            if user.op_type == "Mul":
                other = [e for e in user.input if e != edge]
                value = self._constant_vector(other[0]) if other else None
            elif user.op_type in ("Cast", "Identity") and hops > 0:
                value = self._scale_after(user.output[0], hops - 1)
            else:
                value = None
            if value is not None:
                return value
        return None

    def _constant_vector(self, edge: str) -> _Tensor | None:
        """A constant of ``dim`` values feeding ``edge``: a tensor, or ``Add(constant, constant)``."""
        dim = self.cfg.decoder.dim
        t = self.g.const(edge)
        if t is not None:
            return t if t.numel == dim and t.is_float else None
        node = self.g.producer.get(edge)
        if node is not None and node.op_type == "Add" and len(node.input) == 2:
            a, b = self.g.const(node.input[0]), self.g.const(node.input[1])
            if a is not None and b is not None and a.is_float and b.is_float and max(a.numel, b.numel) == dim:
                value = (a.floats() + b.floats()).reshape(-1)
                if value.size == dim:
                    return _Tensor(edge, (dim,), 1, f"{self.g.file}: {node.name}", lambda v=value: v)
        return None


# ---- the export --------------------------------------------------------------------------------------
class OnnxExport:
    """The weights of a transformers.js export in voxc names, read and converted on demand.

    ``config``, ``tokenizer_path``; ``quantization`` ("q8_0" where 4-bit weights are kept as Q8_0
    blocks, else None) and ``overrides`` / ``tensor_types`` (per weight: stored as the file has it,
    see voxc.loader.source); ``fixed_delay_ms`` (None when the export keeps the delay MLP);
    ``summary``: one line on what was converted and its error; ``variants``: graph -> variant.
    """

    def __init__(self, path: str | Path, *, measure: bool = True):
        self.root, files = locate_export(path)
        self.variants = {g: _variant_of(p.stem)[1] for g, p in files.items()}
        config_path = self.root / CONFIG_FILE
        if not config_path.is_file():
            raise VoxcError(f"{config_path} not found: the export's config.json (transformers' model config) "
                            f"is needed next to its onnx/ folder")
        try:
            raw_config = json.loads(config_path.read_text())
            cfg = ModelConfig.from_hf_config(raw_config)
        except VoxcError as exc:
            raise VoxcError(f"{config_path}: {exc}") from None
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise VoxcError(f"{config_path} is not a valid model config ({type(exc).__name__}: {exc})") from None
        self.config = check_config(cfg, config_path)
        self.tokenizer_path = self.root / TOKENIZER_FILE
        self.scale_error: float | None = None          # measured when the 4-bit scales are f32
        self.lm_head_difference: float | None = None   # measured when the export stores an lm_head
        data = _DataFiles(next(iter(files.values())).parent)
        self.graphs = {kind: _Graph(kind, p, data) for kind, p in files.items()}
        self._map(raw_config)
        self._plan()
        self.summary = self._summarize(measure)

    # -- mapping --
    def _map(self, raw_config: dict) -> None:
        cfg = self.config
        want = expected_shapes(cfg)
        self.found: dict[str, _Found] = {}
        unplaced: list[str] = []
        ada: dict[int, _Tensor] = {}
        self.permute: dict[str, bool] = {}
        for kind, g in self.graphs.items():
            c = _Collector(g, cfg)
            c.run()
            self.permute[kind] = not g.rotary_interleaved()
            unplaced += [f"{g.file}: {u}" for u in c.unplaced]
            ada.update(c.ada_scales)
            for name, f in c.found.items():
                if name in self.found:
                    old = self.found[name]
                    raise VoxcError(f"voxc's {name} is in both {old.graph.file} ({old.node}) and {g.file} ({f.node})")
                self.found[name] = f
        self.lm_head = self.found.pop("lm_head.weight", None)

        # the delay: ada-norm linears, or the constant scale folded after each post-attention norm
        layers = range(cfg.decoder.n_layers)
        has_linears = [i for i in layers if f"dec.layers.{i}.ada_norm.w_in.weight" in self.found]
        self.ada_scales = ada
        if has_linears and (len(has_linears) < cfg.decoder.n_layers or ada):
            raise VoxcError(f"{self.graphs['decoder_model_merged'].file}: the delay conditioning is mixed: "
                            f"ada_rms_norm linears in layers {has_linears}, constant scales in layers {sorted(ada)}")
        if has_linears:
            self.fixed_delay_ms = None
        else:
            no_scale = [i for i in layers if i not in ada]
            if no_scale:
                dec = self.graphs["decoder_model_merged"].file
                raise VoxcError(f"{dec}: no delay conditioning for decoder layer(s) {no_scale}: neither ada_rms_norm "
                                f"linears nor a constant vector of {cfg.decoder.dim} values multiplied after "
                                f"post_attention_layernorm")
            n = raw_config.get("default_num_delay_tokens", DEFAULT_DELAY_TOKENS)
            ms = n * 1000.0 / cfg.audio.frame_rate if isinstance(n, (int, float)) and not isinstance(n, bool) else n
            try:
                delay_tokens(ms, cfg.audio)
            except VoxcError as exc:
                raise VoxcError(f"{self.root / CONFIG_FILE}: default_num_delay_tokens {n!r}: {exc}") from None
            self.fixed_delay_ms = int(round(ms))

        folded = {f"dec.layers.{i}.ada_norm.{w}.weight" for i in ada for w in ("w_in", "w_out")}
        missing = [n for n in want if n not in self.found and n not in folded]
        if missing:
            hints = [f"{n} ({_where_expected(n)})" for n in missing[:8]]
            more = f" ... and {len(missing) - 8} more" if len(missing) > 8 else ""
            extra = (f"; weight nodes voxc could not place: {'; '.join(unplaced[:6])}"
                     f"{' ...' if len(unplaced) > 6 else ''}") if unplaced else ""
            raise VoxcError(f"the ONNX export {self.root} lacks {len(missing)} weight(s) voxc needs: "
                            f"{', '.join(hints)}{more}{extra}")
        self.unplaced = unplaced
        for name, f in self.found.items():
            if name not in want:
                if name.endswith(".bias") and f.dense is not None and not np.any(f.dense.floats()):
                    continue      # a zero bias where the model has none
                raise VoxcError(f"{f.graph.file}: {f.node} maps to {name}, which the model does not have")
            if tuple(f.shape) != tuple(want[name]):
                raise VoxcError(f"{f.graph.file}: {f.node} ({name}) has shape {list(f.shape)}, but config.json "
                                f"needs {list(want[name])}")
        for i, t in ada.items():
            if t.numel != cfg.decoder.dim:
                raise VoxcError(f"{t.where}: the delay scale of layer {i} has {t.numel} values, not {cfg.decoder.dim}")
        self.want = want

    def _plan(self) -> None:
        """How each weight is handed to the build: Q8_0 blocks, float, or as stored."""
        self.kind: dict[str, str] = {}          # voxc name -> "q8_0" | "dequantized" | "float"
        self.overrides: dict[str, QType | None] = {}
        self.tensor_types: dict[str, str] = {}
        for name in self.want:
            f = self.found.get(name)
            if f is None:
                continue
            if f.blocks is not None:
                self.kind[name] = "q8_0" if f.blocks.fits_q8_0() else "dequantized"
            else:
                self.kind[name] = "float"
        any_q8 = any(k == "q8_0" for k in self.kind.values())
        self.quantization = QType.Q8_0.value if any_q8 else None
        if any_q8:
            for name, kind in self.kind.items():
                if QUANTIZED_WEIGHT.match(name) and len(self.want[name]) == 2:
                    self.overrides[name] = QType.Q8_0 if kind == "q8_0" else None
                    f = self.found[name]
                    self.tensor_types[name] = ("4-bit with rows not a multiple of 32, dequantized exactly"
                                               if kind == "dequantized" else f.stored)

    # -- reading --
    def get(self, name: str) -> np.ndarray | QuantTensor | None:
        """voxc tensor ``name`` as the build reads it (official RoPE row order)."""
        cfg = self.config
        m = re.match(r"^dec\.layers\.(\d+)\.(ada_norm\.w_(?:in|out)|ffn_norm)\.weight$", name)
        if m and int(m.group(1)) in self.ada_scales:
            i = int(m.group(1))
            if m.group(2) != "ffn_norm":      # folded into ffn_norm: the MLP must add nothing
                return np.zeros(self.want[name], np.float32)
            weight = self.found[name].float_array().astype(np.float32)
            return weight * self.ada_scales[i].floats().reshape(-1)
        f = self.found.get(name)
        if f is None:
            return None
        value = f.blocks.to_q8_0() if self.kind.get(name) == "q8_0" else f.float_array()
        heads = rope_rows(name, cfg)
        if heads is not None and self.permute[f.graph.kind]:
            if isinstance(value, QuantTensor):
                value = QuantTensor(value.qtype, value.shape, hf.split_half_to_interleaved(value.data, heads))
            else:
                value = hf.split_half_to_interleaved(value, heads)
        return value

    # -- the summary line --
    def _summarize(self, measure: bool) -> str:
        variants = sorted(set(self.variants.values()))
        head = (f"ONNX export ({variants[0]})" if len(variants) == 1 else
                "ONNX export (" + ", ".join(f"{g} {v}" for g, v in self.variants.items()) + ")")
        counts = collections.Counter(self.kind.values())
        parts = []
        if counts["q8_0"]:
            q8 = [self.found[n].blocks for n, k in self.kind.items() if k == "q8_0"]
            if all(b.f16_scales for b in q8):
                err = "exact: f16 scales"
            elif measure:
                self.scale_error = max(b.scale_error() for b in q8)
                err = f"f32 scales rounded to f16, max relative weight error {self.scale_error:.2e}"
            else:
                err = "f32 scales rounded to f16"
            blocks = sorted({b.block for b in q8})
            parts.append(f"{counts['q8_0']} 4-bit weights (block {'/'.join(map(str, blocks))}, zero points) "
                         f"kept as Q8_0 ({err})")
        if counts["dequantized"]:
            parts.append(f"{counts['dequantized']} 4-bit weights dequantized to float32 (exact; rows not whole "
                         f"32-blocks)")
        if counts["float"]:
            stored = collections.Counter(self.found[n].stored for n, k in self.kind.items() if k == "float")
            kinds = ", ".join(f"{c} {t}" for t, c in sorted(stored.items()))
            parts.append(f"{counts['float']} float tensors ({kinds})")
        if self.fixed_delay_ms is not None:
            parts.append(f"delay fixed at {self.fixed_delay_ms} ms (the export folds its conditioning into constants, "
                         f"voxc into the ffn norms)")
        else:
            parts.append("ada-norm delay MLP present: every delay works")
        if self.lm_head is not None and measure:
            parts.append(self._compare_lm_head())
        return head + ": " + "; ".join(parts)

    def _compare_lm_head(self) -> str:
        """voxc's LM head is the token table; how far the export's own lm_head is from it."""
        head, table = self.lm_head, self.found["tok_embeddings.weight"]
        want = self.want["tok_embeddings.weight"]
        if tuple(head.shape) != tuple(want):
            raise VoxcError(f"{head.graph.file}: lm_head {head.node} has shape {list(head.shape)}, the token table "
                            f"{list(want)}")
        worst, scale = 0.0, 0.0
        for r0 in range(0, want[0], _ROW_CHUNK):
            r1 = min(want[0], r0 + _ROW_CHUNK)
            a, b = _rows_float(head, r0, r1), _rows_float(table, r0, r1)
            worst = max(worst, float(np.max(np.abs(a - b))))
            scale = max(scale, float(np.max(np.abs(b))))
        self.lm_head_difference = worst
        if worst == 0:
            return "lm_head identical to the token table (tied)"
        return (f"the export's lm_head differs from the token table by up to {worst:.3g} "
                f"({worst / max(scale, 1e-30):.2e} of its largest weight); voxc ties the head to the table")


def _rows_float(f: _Found, r0: int, r1: int) -> np.ndarray:
    if f.blocks is not None:
        return f.blocks.dequantize(r0, r1)
    a = f.dense.array()
    return np.asarray(a[:, r0:r1].T if f.transpose else a[r0:r1], np.float32)


def _where_expected(name: str) -> str:
    """Where a voxc tensor is expected in the export, in its graph's module names."""
    if name.startswith(("enc.", "adapter.")):
        graph = "audio_encoder"
    elif name.startswith("tok_embeddings"):
        graph = "embed_tokens"
    else:
        graph = "decoder_model_merged"
    try:
        module = hf.voxc_to_hf(name)
    except KeyError:
        module = name
    module = re.sub(r"^(language_model\.model\.|audio_tower\.)", "", module)
    return f"{graph}: {module}"


def read_onnx_export(path: str | Path, *, measure: bool = True) -> OnnxExport:
    """Open a transformers.js export (directory, its onnx/ folder or one of its .onnx files).
    ``measure``: compute the summary's error figures (reads every scale and both token tables)."""
    return OnnxExport(path, measure=measure)
