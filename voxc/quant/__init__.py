"""Quantized weights: GGUF block formats (``formats``), packing into the kernels' layout
(``packing``), voxc's GGUF writer (``gguf_writer``).  The quantized layers of the graph are
voxc.model.quant_linear; GGUF files are read by voxc.loader.gguf."""
from __future__ import annotations

import collections
import dataclasses
import sys

from voxc.quant.formats import QType


def linear_storage(in_features: int, qtype: QType | str | None) -> QType | None:
    """How a quantizable ``[out, in]`` weight is stored for a model quantized to ``qtype``.

    The requested type where the row length is a whole number of its blocks; otherwise Q8_0 where
    rows fit 32-blocks (e.g. the 32-wide ada-norm bottleneck with a K-quant); otherwise None
    (kept as a float matrix).  The one rule shared by the GGUF writer and the model graph.
    """
    if qtype is None:
        return None
    qtype = QType.parse(qtype)
    if in_features % qtype.block_size == 0:
        return qtype
    if in_features % QType.Q8_0.block_size == 0:
        return QType.Q8_0
    return None


def weight_storage(name: str, in_features: int, qtype: QType | str | None, overrides=None) -> QType | None:
    """How a build stores projection weight ``name``: as a source file has it where ``overrides``
    (weight name -> QType or None) says, else :func:`linear_storage`.  The rule the graph
    (voxc.model.quantization) and the weight writer (voxc.loader.source) share, through
    voxc.loader.names.graph_weight_storage, which adds the stacked projections."""
    if overrides and name in overrides:
        return overrides[name]
    return linear_storage(in_features, qtype)


def stacked_storage(part_storages) -> QType | None:
    """The one storage of projections stacked into one matmul: the parts' own where they agree.
    Where a source file gives them different types, the most precise of them, so that no part is
    rounded to a coarser type: float if one part is float, else Q8_0 (which also takes a
    Q4_0 + Q4_K mix: both fit its 32-value blocks)."""
    storages = set(part_storages)
    if len(storages) == 1:
        return storages.pop()
    return None if None in storages else QType.Q8_0


@dataclasses.dataclass(frozen=True)
class StorageChoice:
    """How one projection weight is stored, and why when that is not what was asked for."""
    name: str
    requested: str
    stored: str
    reason: str = ""


def print_storage_table(choices: list[StorageChoice], requested: str | None, file=None) -> None:
    """Count of weights per stored type, and every weight stored otherwise than asked, with why."""
    if not choices:
        return
    file = file or sys.stderr
    counts = collections.Counter(c.stored for c in choices)
    print(f"weights ({requested} requested): " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())), file=file)
    for c in choices:
        if c.reason:
            print(f"  {c.name}: {c.stored} ({c.reason})", file=file)
