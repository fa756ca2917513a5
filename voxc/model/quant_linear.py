"""Quantized linear layer and quantized (tied) embedding for ``tvm.relax.frontend.nn`` models.

Parameters (kernel layout of :mod:`voxc.quant.formats`; ``epw`` = 8 for Q4_0/Q4_K, 4 for Q8_0):

========================  ===============================  ============================================
name                      shape, dtype                     meaning
========================  ===============================  ============================================
``qweight``               ``[out, in / epw]`` uint32       packed levels, element 8w+t (4w+t) in word w
``scales``                ``[out, ceil(in / 64)]`` uint32  Q4_0/Q8_0: f16 block scales, two per word;
                                                           Q4_K: the 16-byte super-block headers
``bias`` (optional)       ``[out]`` ``dtype``              added after the product
========================  ===============================  ============================================

``QuantEmbedding(vocab, dim, qtype)`` has the same ``qweight`` / ``scales`` for its ``[vocab, dim]``
table; ``lookup(ids)`` gathers and dequantizes rows, ``project(h)`` is the tied LM head
(``h @ table.T``) through the same GEMV/GEMM kernels as :class:`QuantLinear`.

**Batch rule.** ``forward`` flattens ``x[..., in]`` to ``[rows, in]``.  If ``rows`` is a static
integer of at most 16 it calls the GEMV kernel specialised to that many rows (decode); otherwise
(a larger static count or a symbolic one, e.g. a prefill or encoder length) the GEMM kernel with a
symbolic row count.  Export a decode step with a static shape to get the GEMV kernel.

**int8 activations.** A ``kernel_target`` of ``llvm/int8-<isa>`` (targets/llvm.py sets it from
the build CPU's features) runs the static-batch GEMVs of schedules/int8_gemv.py: activations
quantized to int8 per 32 elements, integer dot products.

**Target.** The kernels are scheduled per target when the graph is traced: a layer's
``kernel_target`` (set by voxc.model.quantization.quantize_graph), else the enclosing
``tvm.target.Target``, else ``llvm``.  The functions are marked
``tirx.is_scheduled`` (dlight skips them) and opaque (Relax does not fuse into them).

Loading: :func:`voxc.quant.packing.pack_linear_weight` turns a float ``[out, in]`` weight or a GGUF
:class:`~voxc.quant.formats.QuantTensor` into ``{"qweight": ..., "scales": ...}``; store them as
``<prefix>.qweight`` / ``<prefix>.scales`` where the dense model had ``<prefix>.weight``.
"""
from __future__ import annotations

import tvm
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from schedules.dequant_matmul import gemv_or_gemm, make_embedding_kernel, make_kernel, target_kind
from voxc.errors import VoxcError
from voxc.quant.formats import QType, kernel_layout_shapes

INT8_SUFFIX = "/int8-"


def int8_kernel_target(kind: str, isa: str | None) -> str:
    """A ``kernel_target`` whose GEMVs quantize activations to int8 (``llvm/int8-vnni``); plain
    ``kind`` when ``isa`` is None."""
    return f"{kind}{INT8_SUFFIX}{isa}" if isa else kind


def resolve_int8(target) -> str | None:
    """The integer dot product a ``kernel_target`` such as ``llvm/int8-vnni`` asks for (None: float)."""
    if isinstance(target, str) and INT8_SUFFIX in target:
        return target.split(INT8_SUFFIX, 1)[1]
    return None


def resolve_kernel_target(target) -> str:
    """The target kind whose schedules a quantized layer traces with: ``target`` (a kind name or a
    Target) if given, else the enclosing ``tvm.target.Target``, else ``llvm``."""
    if isinstance(target, str) and INT8_SUFFIX in target:
        target = target.split(INT8_SUFFIX, 1)[0]
    if target is not None:
        return target_kind(target)
    current = tvm.target.Target.current(allow_none=True)
    return target_kind(current) if current is not None else "llvm"


def _flat_rows(shape) -> int | tvm.tirx.PrimExpr:
    rows = 1
    for dim in shape:
        rows = rows * dim
    if isinstance(rows, tvm.tirx.IntImm):
        rows = int(rows)
    return rows


def _quant_matmul(x: nn.Tensor, qweight: nn.Tensor, scales: nn.Tensor, qtype: QType,
                  out_features: int, in_features: int, dtype: str, name: str, kernel_target: str | None) -> nn.Tensor:
    if isinstance(x.shape[-1], int) and x.shape[-1] != in_features:
        raise VoxcError(f"{name}: input has {x.shape[-1]} features, the layer takes {in_features}")
    lead = list(x.shape[:-1])
    rows = _flat_rows(lead)
    x2 = op.reshape(x, [rows, in_features])
    if x2.dtype != dtype:
        x2 = x2.astype(dtype)
    batch = rows if gemv_or_gemm(rows) == "gemv" else None
    kernel = make_kernel(qtype, out_features, in_features, batch, dtype, resolve_kernel_target(kernel_target),
                         int8=resolve_int8(kernel_target) if batch is not None else None)
    y = op.tensor_ir_op(kernel, kernel.attrs["global_symbol"], args=[x2, qweight, scales],
                        out=nn.Tensor.placeholder([rows, out_features], dtype))
    return op.reshape(y, lead + [out_features])


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W [out_features, in_features]`` stored quantized."""

    def __init__(self, in_features: int, out_features: int, qtype: QType | str, *, bias: bool = False,
                 dtype: str = "float32", kernel_target: str | None = None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.qtype = QType.parse(qtype)
        self.dtype = dtype
        self.kernel_target = kernel_target
        shapes = kernel_layout_shapes(self.qtype, self.out_features, self.in_features)
        self.qweight = nn.Parameter(shapes["qweight"], "uint32")
        self.scales = nn.Parameter(shapes["scales"], "uint32")
        self.bias = nn.Parameter((self.out_features,), dtype) if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = _quant_matmul(x, self.qweight, self.scales, self.qtype, self.out_features, self.in_features,
                          self.dtype, "QuantLinear", self.kernel_target)
        if self.bias is not None:
            y = y + self.bias
        return y


class QuantEmbedding(nn.Module):
    """A quantized ``[vocab, dim]`` table: row lookup, and the tied output projection."""

    def __init__(self, vocab_size: int, dim: int, qtype: QType | str, *, dtype: str = "float32",
                 kernel_target: str | None = None):
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.qtype = QType.parse(qtype)
        self.dtype = dtype
        self.kernel_target = kernel_target
        shapes = kernel_layout_shapes(self.qtype, self.vocab_size, self.dim)
        self.qweight = nn.Parameter(shapes["qweight"], "uint32")
        self.scales = nn.Parameter(shapes["scales"], "uint32")

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        """``ids [...]`` (int32) -> ``[..., dim]``."""
        lead = list(ids.shape)
        rows = _flat_rows(lead)
        flat = op.reshape(ids, [rows])
        if flat.dtype != "int32":
            flat = flat.astype("int32")
        kernel = make_embedding_kernel(self.qtype, self.vocab_size, self.dim, self.dtype,
                                       resolve_kernel_target(self.kernel_target))
        y = op.tensor_ir_op(kernel, kernel.attrs["global_symbol"], args=[flat, self.qweight, self.scales],
                            out=nn.Tensor.placeholder([rows, self.dim], self.dtype))
        return op.reshape(y, lead + [self.dim])

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return self.lookup(ids)

    def project(self, h: nn.Tensor) -> nn.Tensor:
        """Tied LM head: ``h [..., dim]`` -> logits ``[..., vocab]``."""
        return _quant_matmul(h, self.qweight, self.scales, self.qtype, self.vocab_size, self.dim,
                             self.dtype, "QuantEmbedding.project", self.kernel_target)
