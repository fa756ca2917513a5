"""Writing voxc's GGUF (``voxc quantize``): a checkpoint (voxc names, Mistral row order) with the
big linear weights and the token embedding quantized, norms and biases f32, conv kernels f16, and
as metadata the full :class:`ModelConfig` (JSON), the left padding in tokens, and the tokenizer's
``tekken.json``.  voxc.loader.gguf reads it back.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GT

from voxc.artifact import default_left_pad_tokens
from voxc.config import ModelConfig
from voxc.errors import VoxcError
from voxc.loader.gguf import FORMAT_VERSION, VOXC_ARCH
from voxc.loader.names import QUANTIZED_WEIGHT, expected_shapes
from voxc.quant import StorageChoice
from voxc.quant.formats import QType, quantize

_CONV = re.compile(r"^enc\.conv[01]\.weight$")


def voxc_storage_type(name: str, shape: tuple[int, ...], qtype: QType) -> str:
    """GGML type name voxc stores a tensor as: the requested ``qtype`` for the big 2-D weights
    whose row length fits its blocks, else Q8_0 if the row fits 32-blocks (the 32-wide ada-norm
    up-projection with a K-quant), else F16; conv kernels F16; norms and biases F32."""
    if QUANTIZED_WEIGHT.match(name) and len(shape) == 2:
        if shape[1] % qtype.block_size == 0:
            return qtype.name
        return "Q8_0" if shape[1] % 32 == 0 else "F16"
    if _CONV.match(name):
        return "F16"
    return "F32"


def storage_plan(config: ModelConfig, qtype: QType | str) -> list[StorageChoice]:
    """How ``write_voxc_gguf`` stores each projection weight of ``config`` for ``qtype``, and why a
    weight gets another type."""
    qtype = QType.parse(qtype)
    out = []
    for name, shape in expected_shapes(config).items():
        if not QUANTIZED_WEIGHT.match(name) or len(shape) != 2:
            continue
        kind = voxc_storage_type(name, tuple(shape), qtype)
        reason = "" if kind == qtype.name else (f"its rows of {shape[1]} are not a multiple of {qtype.name}'s "
                                                f"{qtype.block_size}-value blocks")
        out.append(StorageChoice(name, qtype.name, kind, reason))
    return out


def write_voxc_gguf(checkpoint_tensors: Mapping[str, np.ndarray], config: ModelConfig,
                    tokenizer_json_bytes: bytes | None, out_path: str | os.PathLike, qtype: QType | str,
                    *, left_pad_tokens: int | None = None) -> dict[str, str]:
    """Write voxc's GGUF.  ``checkpoint_tensors`` maps voxc names (Mistral row order) to float
    arrays (any float dtype, bf16 included) and must hold exactly the tensors of ``config``; it is
    read twice (sizes first, then data) so a lazy mapping keeps memory to one tensor at a time.
    ``left_pad_tokens`` defaults to 76 for Q4_0 and 32 otherwise.  Returns {name: stored type}.
    """
    qtype = QType.parse(qtype)
    config.validate()
    want = expected_shapes(config)
    names = list(checkpoint_tensors.keys())
    missing = sorted(set(want) - set(names))
    extra = sorted(set(names) - set(want))
    if missing or extra:
        raise VoxcError(f"checkpoint does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                        f", unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    pad = left_pad_tokens if left_pad_tokens is not None else default_left_pad_tokens(qtype.value)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, VOXC_ARCH)
    writer.add_uint32("voxc.format_version", FORMAT_VERSION)
    writer.add_string("voxc.config", json.dumps(config.to_dict()))
    writer.add_string("voxc.qtype", qtype.value)
    writer.add_uint32("voxc.left_pad_tokens", int(pad))
    writer.add_file_type({QType.Q4_0: 2, QType.Q8_0: 7, QType.Q4_K: 15}[qtype])   # llama_ftype numbering
    if tokenizer_json_bytes is not None:
        writer.add_string("voxc.tokenizer.tekken_json", bytes(tokenizer_json_bytes).decode("utf-8"))

    plan: dict[str, str] = {}
    for name in names:
        shape = tuple(int(s) for s in want[name])
        got = tuple(checkpoint_tensors[name].shape)
        if got != shape:
            raise VoxcError(f"tensor {name} has shape {got}, the config needs {shape}")
        kind = voxc_storage_type(name, shape, qtype)
        plan[name] = kind
        gtype = GT[kind]
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        nbytes = int(np.prod(shape)) // block * size
        if kind in ("F32", "F16"):
            writer.add_tensor_info(name, shape, np.dtype(np.float32 if kind == "F32" else np.float16), nbytes)
        else:   # quantized: gguf wants the byte shape of the blocks
            writer.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes,
                                   raw_dtype=gtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in names:
            data = np.asarray(checkpoint_tensors[name]).astype(np.float32)
            kind = plan[name]
            if kind == "F32":
                blob = np.ascontiguousarray(data)
            elif kind == "F16":
                blob = data.astype(np.float16)
            else:
                blob = quantize(data, kind.lower())
            writer.write_tensor_data(blob)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    return plan


