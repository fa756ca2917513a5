"""Load a Voxtral checkpoint directory into voxc tensor names, one tensor at a time.

Two layouts are recognised:

* ``"mistral"``: the official release: ``params.json``, ``consolidated.safetensors`` (or several
  ``*.safetensors`` shards) and ``tekken.json``.  voxc's graph uses this layout's conventions, so
  its tensors only need renaming.
* ``"hf"``: a transformers ``save_pretrained`` directory: ``config.json``, ``model.safetensors``
  (or shards listed in ``model.safetensors.index.json``), plus ``tekken.json``.  Names are mapped
  and q/k rows un-permuted back to the official RoPE order (see :mod:`voxc.loader.hf`).

:func:`load_checkpoint` reads only the safetensors headers and checks every tensor against the
config before any weight is touched, so a bad download or a mismatched ``params.json`` fails in
well under a second with a message that names the file and tensor.  :meth:`Checkpoint.tensors`
then streams memory-mapped tensors, so at most one tensor is copied into memory at a time.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from voxc.artifact import check_config
from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import expected_shapes, official_to_voxc, rope_rows
from voxc.config import ModelConfig

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tekken.json"
CONSOLIDATED_FILE = "consolidated.safetensors"
LAYOUTS = ("mistral", "hf")

# Stored dtypes voxc accepts, and the numpy dtypes they load as.
_STORED_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_REQUESTABLE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                       "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_MAX_LISTED = 8  # problems of one kind listed in an error message before "... and N more"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a voxc tensor is stored and how it has to be transformed on load."""
    file: Path
    stored_name: str
    shape: tuple[int, ...]
    stored_dtype: np.dtype
    rope_heads: int | None = None  # HF layout only: un-permute this many heads' rows to interleaved order


class Checkpoint:
    """A validated checkpoint: config, tokenizer path, and lazily loaded tensors in voxc names."""

    def __init__(self, path: Path, config: ModelConfig, layout: str, tokenizer_path: Path | None,
                 index: dict[str, TensorInfo], *, progress: bool = True):
        self.path = path
        self.config = config
        self.layout = layout
        self.tokenizer_path = tokenizer_path
        self.progress = progress
        self._index = index

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, layout={self.layout!r}, tensors={len(self._index)})"

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._index[name]
        except KeyError:
            raise VoxcError(f"checkpoint {self.path} has no tensor {name!r}") from None

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self._index.values()})

    @property
    def stored_dtypes(self) -> set[np.dtype]:
        return {t.stored_dtype for t in self._index.values()}

    def get(self, name: str, dtype=None) -> np.ndarray:
        """One tensor, in voxc layout; ``dtype`` None keeps the stored dtype (see :meth:`tensors`)."""
        info = self.info(name)
        target = _requested_dtype(dtype)
        with _open_safetensors(info.file) as f:
            return _load_one(f, info, target)

    def tensors(self, dtype=None, *, progress: bool | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(voxc_name, array)`` for every tensor, reading one tensor at a time.

        ``dtype``: None keeps each tensor as stored (bf16 as ``ml_dtypes.bfloat16``); ``"float32"``
        upcasts exactly; ``"bfloat16"`` / ``"float16"`` round to nearest.
        """
        target = _requested_dtype(dtype)
        show = self.progress if progress is None else progress
        from tqdm import tqdm

        with tqdm(total=len(self._index), desc="loading weights", unit="tensor",
                  file=sys.stderr, disable=not show) as bar:
            for file in self.files:  # each file opened (memory-mapped) once
                with _open_safetensors(file) as f:
                    for name, info in self._index.items():
                        if info.file == file:
                            yield name, _load_one(f, info, target)
                            bar.update()


def load_checkpoint(path: str | Path, *, progress: bool = True, layout: str | None = None,
                    require_tokenizer: bool = True) -> Checkpoint:
    """Open and validate a checkpoint directory (official Mistral or transformers layout).

    ``layout`` forces ``"mistral"`` or ``"hf"`` when a directory holds both.  Raises
    :class:`VoxcError` for a missing/corrupt file or tensors that disagree with the config.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".safetensors":
        root = root.parent
    if not root.is_dir():
        raise VoxcError(f"checkpoint directory {root} not found")
    layout = layout or _detect_layout(root)
    if layout not in LAYOUTS:
        raise VoxcError(f"unknown checkpoint layout {layout!r}; use one of {', '.join(LAYOUTS)}")

    if layout == "mistral":
        config = _read_config(ModelConfig.from_params_json,
                              _require_file(root, PARAMS_FILE, "the model config of the official layout"))
        files = _official_weight_files(root)
    else:
        config = _read_config(ModelConfig.from_hf_config,
                              _require_file(root, hf.HF_CONFIG_FILE, "the transformers model config"))
        files = _hf_weight_files(root)

    tokenizer_path = root / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        if require_tokenizer:
            raise VoxcError(f"{tokenizer_path} not found: the tokenizer file is needed to turn tokens into text; "
                            "copy tekken.json from the model repository into the checkpoint directory")
        tokenizer_path = None

    index = _index_tensors(root, files, config, layout)
    return Checkpoint(root, config, layout, tokenizer_path, index, progress=progress)


# ---- layout and files ----------------------------------------------------------------------------
def _detect_layout(root: Path) -> str:
    has_params = (root / PARAMS_FILE).is_file()
    has_hf_config = (root / hf.HF_CONFIG_FILE).is_file()
    official_weights = [p for p in root.glob("*.safetensors") if not p.name.startswith("model")]
    if has_params and official_weights:
        return "mistral"
    if has_hf_config:
        return "hf"
    if official_weights:
        raise VoxcError(f"{root / PARAMS_FILE} not found: the official layout needs params.json next to "
                        f"{official_weights[0].name}")
    if has_params:
        raise VoxcError(f"{root} has params.json but no *.safetensors weights "
                        f"(expected {CONSOLIDATED_FILE})")
    raise VoxcError(f"{root} is not a Voxtral checkpoint: it has neither {PARAMS_FILE} + {CONSOLIDATED_FILE} "
                    f"(official Mistral layout) nor {hf.HF_CONFIG_FILE} + {hf.HF_SINGLE_FILE} (transformers layout)")


def _read_config(parse, path: Path) -> ModelConfig:
    """A config file parsed and type-checked: every problem is a VoxcError naming the file."""
    try:
        config = parse(path)
    except VoxcError as exc:
        message = str(exc)
        if str(path) not in message:   # "params.json is missing ..." -> the full path, else a prefix
            message = message.replace(path.name, str(path), 1) if path.name in message else f"{path}: {message}"
        raise VoxcError(message) from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError, RecursionError) as exc:
        # ValueError includes JSON syntax errors and bytes that are not UTF-8
        raise VoxcError(f"{path} is not a valid model config ({type(exc).__name__}: {exc})") from None
    return check_config(config, path)


def _require_file(root: Path, name: str, what: str) -> Path:
    path = root / name
    if not path.is_file():
        raise VoxcError(f"{path} not found ({what})")
    return path


def _official_weight_files(root: Path) -> list[Path]:
    if (root / CONSOLIDATED_FILE).is_file():
        return [root / CONSOLIDATED_FILE]
    shards = sorted(p for p in root.glob("*.safetensors") if not p.name.startswith("model"))
    if not shards:
        raise VoxcError(f"no weights in {root}: expected {CONSOLIDATED_FILE} or *.safetensors shards")
    return shards


def _hf_weight_files(root: Path) -> list[Path]:
    index_path = root / hf.HF_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shard_names = set(weight_map.values())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise VoxcError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        bad = [f for f in shard_names if not isinstance(f, str) or not f or "/" in f or "\\" in f or f in (".", "..")]
        if bad:
            raise VoxcError(f"{index_path} is not a valid safetensors index: shard name {bad[0]!r}")
        files = sorted({root / f for f in shard_names})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise VoxcError(f"{index_path} lists shards that are not in {root}: {', '.join(missing)}")
        return files
    if (root / hf.HF_SINGLE_FILE).is_file():
        return [root / hf.HF_SINGLE_FILE]
    raise VoxcError(f"no weights in {root}: expected {hf.HF_SINGLE_FILE} or {hf.HF_INDEX_FILE} with its shards")


def _open_safetensors(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as exc:
        raise VoxcError(f"cannot read {file}: {exc}. The file is truncated or corrupt (an interrupted "
                        "download?); download it again") from exc


# ---- header validation ---------------------------------------------------------------------------
def _index_tensors(root: Path, files: list[Path], cfg: ModelConfig, layout: str) -> dict[str, TensorInfo]:
    expected = expected_shapes(cfg)
    to_voxc = official_to_voxc if layout == "mistral" else hf.hf_to_voxc
    found: dict[str, TensorInfo] = {}
    problems = _Problems(root, layout)
    for file in files:
        with _open_safetensors(file) as f:
            for stored_name in f.keys():
                if layout == "hf" and hf.hf_on_disk_name(stored_name) in hf.HF_TIED_NAMES:
                    continue
                voxc_name = to_voxc(stored_name)
                if voxc_name is None:
                    problems.unknown.append(f"{stored_name!r} in {file.name}")
                    continue
                if voxc_name in found:
                    problems.duplicate.append(f"{stored_name!r} in {found[voxc_name].file.name} and {file.name}")
                    continue
                tensor = f.get_slice(stored_name)
                stored_dtype = _STORED_DTYPES.get(tensor.get_dtype())
                if stored_dtype is None:
                    problems.bad_dtype.append(f"{stored_name!r} is {tensor.get_dtype()}")
                    continue
                found[voxc_name] = TensorInfo(
                    file, stored_name, tuple(tensor.get_shape()), stored_dtype,
                    rope_rows(voxc_name, cfg) if layout == "hf" else None)

    wrong_fields: Counter[str] = Counter()
    for name, info in found.items():
        if name not in expected:
            problems.beyond_config.append(name)
        elif info.shape != expected[name]:
            description, fields = _shape_problem(name, info, expected[name], cfg, layout)
            problems.misshapen.append(description)
            wrong_fields.update(fields)
    problems.hints += [field for field, _ in wrong_fields.most_common(3)]
    problems.missing = [n for n in expected if n not in found]
    problems.add_layer_count_hints(found, cfg)
    problems.raise_if_any()
    return {name: found[name] for name in expected}  # canonical order


@dataclasses.dataclass
class _Problems:
    root: Path
    layout: str
    unknown: list[str] = dataclasses.field(default_factory=list)
    duplicate: list[str] = dataclasses.field(default_factory=list)
    bad_dtype: list[str] = dataclasses.field(default_factory=list)
    beyond_config: list[str] = dataclasses.field(default_factory=list)
    misshapen: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)

    def add_layer_count_hints(self, found: dict[str, TensorInfo], cfg: ModelConfig) -> None:
        """Missing or surplus whole layers mean the config's layer count is wrong, not the weights."""
        for tower, configured in (("enc", cfg.encoder.n_layers), ("dec", cfg.decoder.n_layers)):
            indices = {int(m.group(1)) for n in found if (m := re.match(rf"^{tower}\.layers\.(\d+)\.", n))}
            if indices and max(indices) + 1 != configured:
                field = _field_name(f"{tower}.n_layers", self.layout)
                self.hints.append(f"the weights have {max(indices) + 1} {_TOWER_NAMES[tower]} layers but "
                                  f"{_config_file(self.layout)} says {field} = {configured}")

    def raise_if_any(self) -> None:
        sections = [
            ("tensors whose shape disagrees with " + _config_file(self.layout), self.misshapen),
            ("tensors missing from the checkpoint", self.missing),
            ("tensors beyond what " + _config_file(self.layout) + " describes", self.beyond_config),
            ("unexpected tensors (not part of Voxtral Realtime)", self.unknown),
            ("tensors stored twice", self.duplicate),
            ("tensors of an unsupported dtype (voxc reads F32, F16, BF16)", self.bad_dtype),
        ]
        lines = []
        for title, items in sections:
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:_MAX_LISTED]]
                if len(items) > _MAX_LISTED:
                    lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
        if lines:
            hints = [f"likely cause: {h}" for h in self.hints]
            raise VoxcError(f"checkpoint {self.root} ({self.layout} layout) does not match its config:\n"
                            + "\n".join(hints + lines))


_TOWER_NAMES = {"enc": "encoder", "dec": "decoder"}

# Which config quantity sizes each axis of each tensor (for shape-mismatch messages).
_AXIS_ROLES = [(re.compile("^" + p + "$"), roles) for p, roles in [
    (r"tok_embeddings\.weight", ("vocab", "dec.dim")),
    (r"dec\.(layers\.\d+\.)?(attention_norm|ffn_norm|norm)\.weight", ("dec.dim",)),
    (r"dec\.layers\.\d+\.attention\.wq\.weight", ("dec.q", "dec.dim")),
    (r"dec\.layers\.\d+\.attention\.w[kv]\.weight", ("dec.kv", "dec.dim")),
    (r"dec\.layers\.\d+\.attention\.wo\.weight", ("dec.dim", "dec.q")),
    (r"dec\.layers\.\d+\.feed_forward\.w[13]\.weight", ("dec.hidden", "dec.dim")),
    (r"dec\.layers\.\d+\.feed_forward\.w2\.weight", ("dec.dim", "dec.hidden")),
    (r"dec\.layers\.\d+\.ada_norm\.w_in\.weight", ("dec.ada", "dec.dim")),
    (r"dec\.layers\.\d+\.ada_norm\.w_out\.weight", ("dec.dim", "dec.ada")),
    (r"enc\.conv0\.weight", ("enc.dim", "mel", "kernel")),
    (r"enc\.conv1\.weight", ("enc.dim", "enc.dim", "kernel")),
    (r"enc\.(conv[01]\.bias|(layers\.\d+\.)?(attention_norm|ffn_norm|norm)\.weight)", ("enc.dim",)),
    (r"enc\.layers\.\d+\.(attention\.wo|feed_forward\.w2)\.bias", ("enc.dim",)),
    (r"enc\.layers\.\d+\.attention\.w[qkv]\.(weight|bias)", ("enc.q", "enc.dim")),
    (r"enc\.layers\.\d+\.attention\.wo\.weight", ("enc.dim", "enc.q")),
    (r"enc\.layers\.\d+\.feed_forward\.w[13]\.weight", ("enc.hidden", "enc.dim")),
    (r"enc\.layers\.\d+\.feed_forward\.w2\.weight", ("enc.dim", "enc.hidden")),
    (r"adapter\.w_in\.weight", ("dec.dim", "enc.dim*downsample")),
    (r"adapter\.w_out\.weight", ("dec.dim", "dec.dim")),
]]

_PARAMS_FIELD_NAMES = {
    "dec.dim": "dim", "dec.q": "n_heads*head_dim", "dec.kv": "n_kv_heads*head_dim", "dec.hidden": "hidden_dim",
    "dec.ada": "ada_rms_norm_t_cond_dim", "vocab": "vocab_size",
    "dec.n_layers": "n_layers", "enc.n_layers": "encoder_args.n_layers",
    "enc.dim": "encoder_args.dim", "enc.q": "encoder_args.n_heads*head_dim", "enc.hidden": "encoder_args.hidden_dim",
    "mel": "audio_encoding_args.num_mel_bins", "enc.dim*downsample": "encoder_args.dim*downsample_factor",
    "kernel": "the conv kernel size (3)",
}


def _field_name(role: str, layout: str) -> str:
    return (_PARAMS_FIELD_NAMES if layout == "mistral" else hf.HF_FIELD_NAMES)[role]


def _config_file(layout: str) -> str:
    return PARAMS_FILE if layout == "mistral" else hf.HF_CONFIG_FILE


def _shape_problem(name: str, info: TensorInfo, expected: tuple[int, ...], cfg: ModelConfig,
                   layout: str) -> tuple[str, list[str]]:
    """A line describing the mismatch, and the config fields that probably cause it."""
    text = f"{info.stored_name!r} (voxc {name}) in {info.file.name} has shape {info.shape}, expected {expected}"
    roles = next((r for pat, r in _AXIS_ROLES if pat.match(name)), None)
    if roles is None or len(info.shape) != len(expected):
        return text, []
    wrong = [f"{_config_file(layout)} says {_field_name(role, layout)} = {want} but the weights have {got}"
             for role, want, got in zip(roles, expected, info.shape) if want != got]
    return text, wrong


# ---- loading -------------------------------------------------------------------------------------
def _requested_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if key not in _REQUESTABLE_DTYPES:
        raise VoxcError(f"unsupported weight dtype {dtype!r}; use one of {', '.join(_REQUESTABLE_DTYPES)}")
    return _REQUESTABLE_DTYPES[key]


def _load_one(f, info: TensorInfo, target: np.dtype | None) -> np.ndarray:
    array = f.get_tensor(info.stored_name)
    if info.rope_heads is not None:
        array = hf.split_half_to_interleaved(array, info.rope_heads)
    if target is not None and array.dtype != target:
        array = array.astype(target)
    return array
