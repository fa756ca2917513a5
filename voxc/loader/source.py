"""Where a build's weights come from: a checkpoint directory (official Mistral or transformers
layout), a GGUF file or a transformers.js ONNX export, read one tensor at a time and converted to
the graph's parameters."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from voxc.config import ModelConfig
from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import expected_shapes, graph_weight_storage, stacked_parts
from voxc.loader.safetensors_loader import PARAMS_FILE, TOKENIZER_FILE, load_checkpoint
from voxc.quant.packing import pack_linear_weight

QUANT_FIELDS = ("qweight", "scales")


class WeightSource:
    """The config, tokenizer and tensors of a checkpoint.

    ``quantization`` / ``overrides``: what the file itself stores (a GGUF's main type, and per
    layer the types voxc runs as they are; None and {} for float checkpoints); ``left_pad_tokens``:
    what the file records, if anything; ``fixed_delay_ms``: the only delay the weights work with
    (an ONNX export folds the delay conditioning into constants), else None.  ``read_weights=False``
    reads only the config and the tokenizer (a directory then needs params.json or config.json, and
    tekken.json).
    """

    def __init__(self, path: str | Path, progress: bool, tokenizer: str | Path | None = None,
                 read_weights: bool = True):
        path = Path(path)
        if not path.exists():
            raise VoxcError(f"{path} does not exist")
        self.path = path
        self.quantization: str | None = None
        self.left_pad_tokens: int | None = None
        self.overrides: dict = {}
        self.fixed_delay_ms: int | None = None
        self.tensors = {}
        self._packed: dict[str, dict] = {}
        if tokenizer is not None and not Path(tokenizer).is_file():
            raise VoxcError(f"tokenizer file {tokenizer} not found")
        from voxc.loader.onnx import is_onnx_export

        if path.suffix == ".gguf":
            self._open_gguf(path, tokenizer)
        elif is_onnx_export(path):
            self._open_onnx(path, tokenizer, progress, read_weights)
        elif path.is_file():
            raise VoxcError(f"{path} is neither a checkpoint directory, a .gguf file nor an ONNX export")
        elif read_weights:
            ckpt = load_checkpoint(path, progress=progress, require_tokenizer=tokenizer is None)
            self.config = ckpt.config
            self.tensors = ckpt
            self.tokenizer_bytes = Path(tokenizer or ckpt.tokenizer_path).read_bytes()
        else:
            if (path / PARAMS_FILE).is_file():
                self.config = ModelConfig.from_params_json(path / PARAMS_FILE)
            elif (path / hf.HF_CONFIG_FILE).is_file():
                self.config = ModelConfig.from_hf_config(path / hf.HF_CONFIG_FILE)
            else:
                raise VoxcError(f"{path} has neither {PARAMS_FILE} nor {hf.HF_CONFIG_FILE}: not a Voxtral checkpoint")
            tok = Path(tokenizer) if tokenizer else path / TOKENIZER_FILE
            if not tok.is_file():
                raise VoxcError(f"{tok} not found: voxc needs the tokenizer (tekken.json)")
            self.tokenizer_bytes = tok.read_bytes()

    def _open_gguf(self, path: Path, tokenizer):
        from voxc.loader.gguf import read_gguf

        self.config, tensors, meta = read_gguf(path)
        self.tensors = dict(tensors)      # GGUF data is memory-mapped: this holds views, not copies
        # Each layer keeps the type the file gives it where voxc has kernels for it; floats stay
        # dense; other quantized types (Q6_K, Q5_K ...) are re-quantized to the file's main type.
        for name, value in self.tensors.items():
            if getattr(value, "ndim", len(value.shape)) == 2 and name in meta["tensor_types"]:
                if hasattr(value, "dequantize"):
                    self.overrides[name] = value.qtype
                elif name not in meta["transcoded"] and meta["tensor_types"][name] in ("F32", "F16", "BF16"):
                    self.overrides[name] = None
        self.transcoded = dict.fromkeys(meta["transcoded"])
        self.tensor_types = meta["tensor_types"]
        if tokenizer is not None:
            self.tokenizer_bytes = Path(tokenizer).read_bytes()
        elif meta.get("tokenizer_json"):
            self.tokenizer_bytes = meta["tokenizer_json"]
        else:
            raise VoxcError(f"{path.name} carries no tokenizer (the Rust port's files do not): pass the "
                            "model's tekken.json with --tokenizer")
        self.quantization = meta.get("qtype")
        self.left_pad_tokens = meta.get("left_pad_tokens")

    def _open_onnx(self, path: Path, tokenizer, progress: bool, read_weights: bool):
        from voxc.loader.onnx import read_onnx_export

        export = read_onnx_export(path, measure=read_weights)
        self.config = export.config
        self.tensors = export            # converts each tensor when the build asks for it
        self.quantization = export.quantization
        self.overrides = export.overrides
        self.tensor_types = export.tensor_types
        self.transcoded = {}
        self.fixed_delay_ms = export.fixed_delay_ms
        tok = Path(tokenizer) if tokenizer is not None else export.tokenizer_path
        if not tok.is_file():
            raise VoxcError(f"{tok} not found: voxc needs the tokenizer (tekken.json, at the root of the export "
                            f"as the Hub repository has it), or pass one with --tokenizer")
        self.tokenizer_bytes = tok.read_bytes()
        self.onnx_summary = export.summary
        if progress:
            print(export.summary, file=sys.stderr, flush=True)

    def get(self, name: str):
        return self.tensors.get(name)

    def graph_param(self, name: str, quantization: str | None, overrides: dict):
        """The value of graph parameter ``name`` for a build storing weights as ``quantization``
        with ``overrides`` (voxc.loader.names.graph_weight_storage): a checkpoint tensor, or packed from one; a
        stacked projection's (voxc.loader.names.stacked_parts) is its parts' rows, concatenated."""
        prefix, _, field = name.rpartition(".")
        if field in QUANT_FIELDS:
            if prefix not in self._packed:
                self._packed.clear()   # the two fields of one layer are consecutive: keep one layer packed
                self._packed[prefix] = self._packed_weight(prefix + ".weight", quantization, overrides)
            return self._packed[prefix][field]
        parts = stacked_parts(name)
        if parts is None:
            return self._float_tensor(name)
        return np.concatenate([self._float_part(part) for part in parts])

    def _float_tensor(self, name: str):
        value = self.get(name)
        if value is None:
            raise VoxcError(f"the checkpoint has no tensor for graph parameter {name}")
        return value.dequantize() if hasattr(value, "dequantize") else value

    def _float_part(self, name: str) -> np.ndarray:
        """One part of a stacked float tensor, as float32 (its parts may come in different dtypes);
        a projection the model has no bias for (the encoder's wk) adds zeros to a stacked bias."""
        shapes = expected_shapes(self.config)
        if name not in shapes:
            return np.zeros(shapes[name.removesuffix(".bias") + ".weight"][0], np.float32)
        return np.asarray(self._float_tensor(name), np.float32)

    def _packed_weight(self, name: str, quantization: str | None, overrides: dict) -> dict[str, np.ndarray]:
        """``{"qweight", "scales"}`` of weight ``name`` in the storage the build gives it; a stacked
        weight's parts are packed in that one storage and their rows concatenated (the blocks of
        every type run along a row, so row blocks stack exactly)."""
        parts = stacked_parts(name) or (name,)
        sources = []
        for part in parts:
            source = self.get(part)
            if source is None:
                raise VoxcError(f"the checkpoint has no tensor {part}")
            sources.append(source)
        storage = graph_weight_storage(name, int(sources[0].shape[1]), quantization, overrides)
        packed = [pack_linear_weight(source, storage) for source in sources]
        return {field: np.concatenate([p[field] for p in packed]) if len(packed) > 1 else packed[0][field]
                for field in QUANT_FIELDS}
