"""Float or GGUF-block weights -> the kernel layout of voxc.model.quant_linear's parameters (numpy only)."""
from __future__ import annotations

import math

import numpy as np

from voxc.errors import VoxcError
from voxc.quant.formats import QType, QuantTensor, kernel_layout_shapes, quantize_tensor, to_kernel_layout


def pack_linear_weight(weight: np.ndarray | QuantTensor, qtype: QType | str | None = None) -> dict[str, np.ndarray]:
    """Parameters of :class:`~voxc.model.quant_linear.QuantLinear` / ``QuantEmbedding`` for a ``[out, in]`` weight.

    ``weight`` is a float array (quantized here, ggml's reference algorithms) or a GGUF
    :class:`QuantTensor` (repacked losslessly when its type is ``qtype`` or ``qtype`` is None;
    otherwise dequantized and quantized again, which adds the error of both).
    Returns ``{"qweight": uint32 array, "scales": uint32 array}``.
    """
    if isinstance(weight, QuantTensor):
        target = weight.qtype if qtype is None else QType.parse(qtype)
        if target is not weight.qtype:
            weight = quantize_tensor(weight.dequantize(), target)
        return to_kernel_layout(weight)
    if qtype is None:
        raise VoxcError("pack_linear_weight: a float weight needs a qtype")
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise VoxcError(f"pack_linear_weight: expected a 2-D [out, in] weight, got shape {weight.shape}")
    return to_kernel_layout(quantize_tensor(weight.astype(np.float32), qtype))


def quantized_param_bytes(out_features: int, in_features: int, qtype: QType | str) -> int:
    """Bytes of ``qweight`` + ``scales`` (for memory planning and WebGPU binding limits)."""
    shapes = kernel_layout_shapes(qtype, out_features, in_features)
    return 4 * sum(math.prod(s) for s in shapes.values())
