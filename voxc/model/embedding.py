"""The tied token table, and its split form for devices that cannot bind it as one buffer.

:class:`DenseEmbedding` is the table every target starts with (voxc.model.quantization may swap it
for voxc.model.quant_linear.QuantEmbedding).  :func:`split_token_table` replaces a table larger
than a device's largest storage binding by row blocks, one GPU buffer each: the 4B model's f32
table is 131072 x 3072 x 4 B = 1.5 GB, above every browser's maxStorageBufferBindingSize default
(128 MiB), while the table's other use, the tied LM head, must read all of it on the GPU every
step (so a CPU-side row lookup would not remove it from the GPU).  Every kernel binds at most one
block, so no kernel needs more than a handful of storage bindings (WebGPU's default is 8).
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.core import wrap_nested

from schedules.embedding_parts import gather_rows_func, select_rows_func, write_columns_func
from voxc.model.quant_linear import QuantEmbedding
from voxc.quant.formats import kernel_layout_shapes


class DenseEmbedding(nn.Module):
    """The tied token table: ``lookup(ids)`` and ``project(hidden)`` (the LM head)."""

    def __init__(self, vocab_size: int, dim: int, dtype: str):
        self.weight = nn.Parameter((vocab_size, dim), dtype)

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        # mode "clip": an id outside the table reads its last row instead of memory past it (TVM's
        # default "fast" mode does no bounds check, and warns at every build)
        flat_ids = op.reshape(ids, (_numel(ids.shape),))
        flat = wrap_nested(relax.op.take(self.weight._expr, flat_ids._expr, axis=0, mode="clip"), name="take")
        return op.reshape(flat, list(ids.shape) + [self.weight.shape[1]])

    def project(self, hidden: nn.Tensor) -> nn.Tensor:
        return op.matmul(hidden, op.permute_dims(self.weight))


def _numel(shape):
    total = 1
    for dim in shape:
        total = total * dim
    return total


class _Rows(nn.Module):
    def __init__(self, rows: int, dim: int, dtype: str):
        self.weight = nn.Parameter((rows, dim), dtype)


class SplitEmbedding(nn.Module):
    """The tied token table as row blocks ``parts.<k>.weight`` (``embedding_part_rows`` below),
    with DenseEmbedding's interface.  Every kernel binds at most one block, so no buffer exceeds
    the block size and no kernel needs more than a handful of storage bindings (WebGPU's default
    is 8 per shader stage)."""

    def __init__(self, vocab_size: int, dim: int, dtype: str, rows_per_part: int):
        self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype
        self.bounds = embedding_part_bounds(vocab_size, rows_per_part)
        self.parts = nn.ModuleList([_Rows(end - start, dim, dtype) for start, end in self.bounds])

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        b, n = ids.shape
        flat_ids = op.reshape(ids, (b * n,))
        acc = op.zeros((b * n, self.dim), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            acc = op.tensor_ir_inplace_op(
                gather_rows_func(start, end - start, self.dim, self.dtype), "embedding_part_gather",
                args=[acc, part.weight, flat_ids], inplace_indices=[0],
                out=nn.Tensor.placeholder((b * n, self.dim), self.dtype))
        return op.reshape(acc, (b, n, self.dim))

    def project(self, hidden: nn.Tensor) -> nn.Tensor:
        b = hidden.shape[0]
        logits = op.zeros((b, self.vocab_size), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            piece = op.matmul(hidden, op.permute_dims(part.weight))
            logits = op.tensor_ir_inplace_op(
                write_columns_func(start, end - start, self.vocab_size, self.dtype), "write_columns",
                args=[logits, piece], inplace_indices=[0],
                out=nn.Tensor.placeholder((b, self.vocab_size), self.dtype))
        return logits


class SplitQuantEmbedding(nn.Module):
    """A quantized tied token table (voxc.model.quant_linear.QuantEmbedding) as row blocks
    ``parts.<k>.qweight`` / ``parts.<k>.scales``: the 4B model's Q4_K table (201 MB of packed levels)
    is above WebGPU's 128 MiB binding limit too.  A lookup gathers from every block (ids outside a
    block read its row 0) and selects each block's rows in place (one kernel, three bindings, per
    block); the LM head runs the Q4 kernels per block into its columns."""

    def __init__(self, vocab_size: int, dim: int, qtype, dtype: str, rows_per_part: int,
                 kernel_target: str | None = None):
        self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype
        self.bounds = embedding_part_bounds(vocab_size, rows_per_part)
        self.parts = nn.ModuleList([QuantEmbedding(end - start, dim, qtype, dtype=dtype, kernel_target=kernel_target) for start, end in self.bounds])

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        b, n = ids.shape
        flat = op.reshape(ids, (b * n,))
        acc = op.zeros((b * n, self.dim), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            local = op.subtract(flat, nn.Tensor.from_const(np.array(start, "int32")))
            rows = part.lookup(local)   # ids outside the block read its row 0: not selected below
            acc = op.tensor_ir_inplace_op(
                select_rows_func(start, end - start, self.dim, self.dtype), "embedding_part_select",
                args=[acc, rows, flat], inplace_indices=[0],
                out=nn.Tensor.placeholder((b * n, self.dim), self.dtype))
        return op.reshape(acc, (b, n, self.dim))

    def project(self, hidden: nn.Tensor) -> nn.Tensor:
        b = hidden.shape[0]
        logits = op.zeros((b, self.vocab_size), self.dtype)
        for (start, end), part in zip(self.bounds, self.parts):
            piece = part.project(hidden)
            logits = op.tensor_ir_inplace_op(
                write_columns_func(start, end - start, self.vocab_size, self.dtype), "write_columns",
                args=[logits, piece], inplace_indices=[0],
                out=nn.Tensor.placeholder((b, self.vocab_size), self.dtype))
        return logits


def embedding_part_bounds(vocab_size: int, rows_per_part: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_part, vocab_size)) for s in range(0, vocab_size, rows_per_part)]


def embedding_part_rows(vocab_size: int, dim: int, dtype: str, part_bytes: int, row_bytes: int | None = None
                        ) -> int | None:
    """Rows per block of the token table, or None when the whole table fits in ``part_bytes``.
    ``row_bytes`` (default: ``dim`` elements of ``dtype``) is the size of a row's largest buffer."""
    row_bytes = row_bytes or dim * np.dtype(dtype).itemsize
    if vocab_size * row_bytes <= part_bytes:
        return None
    n_parts = -(-vocab_size * row_bytes // part_bytes)
    rows = -(-vocab_size // n_parts)
    while rows * row_bytes > part_bytes:
        n_parts += 1
        rows = -(-vocab_size // n_parts)
    return rows


SPLIT_EMBEDDING_PREFIX = "tok_embeddings.parts."


def split_token_table(graph: nn.Module, part_bytes: int) -> None:
    """Replace ``graph.tok_embeddings`` (dense or quantized) by row blocks of at most ``part_bytes``
    per buffer, if the whole table is larger."""
    table = graph.tok_embeddings
    if isinstance(table, DenseEmbedding):
        vocab, dim = (int(s) for s in table.weight.shape)
        rows = embedding_part_rows(vocab, dim, table.weight.dtype, part_bytes)
        if rows is not None:
            graph.tok_embeddings = SplitEmbedding(vocab, dim, table.weight.dtype, rows)
    elif isinstance(table, QuantEmbedding):
        vocab, dim = table.vocab_size, table.dim
        row_bytes = 4 * max(s[1] for s in kernel_layout_shapes(table.qtype, vocab, dim).values())
        rows = embedding_part_rows(vocab, dim, table.dtype, part_bytes, row_bytes=row_bytes)
        if rows is not None:
            graph.tok_embeddings = SplitQuantEmbedding(vocab, dim, table.qtype, table.dtype, rows,
                                                       kernel_target=table.kernel_target)


def split_param_sources(specs) -> dict[str, tuple[str, slice]]:
    """Graph parameter -> ``(checkpoint name, row slice)`` for the blocks of a split token table
    (``tok_embeddings.parts.<k>.<field>`` are rows of ``tok_embeddings.<field>``, the blocks in
    order); ``specs`` is the graph's ``[(name, shape, dtype)]``.  Other parameters are not listed."""
    out, starts = {}, {}
    for name, shape, _ in specs:
        if not name.startswith(SPLIT_EMBEDDING_PREFIX):
            continue
        field = name.rsplit(".", 1)[1]
        start = starts.get(field, 0)
        out[name] = ("tok_embeddings." + field, slice(start, start + int(shape[0])))
        starts[field] = start + int(shape[0])
    return out


def split_embedding_parts(specs) -> int:
    """Number of token table blocks among the graph's parameters (0: not split)."""
    return len({name[len(SPLIT_EMBEDDING_PREFIX):].split(".")[0] for name, _, _ in specs
                if name.startswith(SPLIT_EMBEDDING_PREFIX)})
