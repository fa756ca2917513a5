"""Kernels of a token table stored as row blocks (voxc.model.embedding.SplitEmbedding): a lookup
gathers the rows of each block in place (a quantized block's rows are selected in place), the LM head writes each block's logits into its columns."""
from __future__ import annotations

from tvm.script import tirx as T

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called


def gather_rows_func(start: int, rows: int, dim: int, dtype: str, threads: int = 256):
    """In place: ``acc[i, :] = part[ids[i] - start, :]`` for the ids inside ``[start, start + rows)``."""
    @T.prim_func(private=True, s_tir=True)
    def embedding_part_gather(var_acc: T.handle, var_part: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        acc = T.match_buffer(var_acc, (m, dim), dtype)
        part = T.match_buffer(var_part, (rows, dim), dtype)
        ids = T.match_buffer(var_ids, (m,), "int32")
        for bx in T.thread_binding((m * dim + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("gather"):
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < m * dim:
                        row: T.let[T.int64] = T.Cast("int64", ids[flat // dim]) - start
                        if row >= 0 and row < rows:
                            acc[flat // dim, flat % dim] = part[row, flat % dim]

    return embedding_part_gather


def select_rows_func(start: int, rows: int, dim: int, dtype: str, threads: int = 256):
    """In place: ``acc[i, :] = src[i, :]`` for the ids inside ``[start, start + rows)`` (a quantized
    block's gathered rows, voxc.model.embedding.SplitQuantEmbedding).  Three bindings whatever the
    number of blocks: a where-chain over all blocks fuses into one kernel that binds every block's
    rows and ids (9 storage buffers for the 4B model's Q8_0 table, above WebGPU's default 8)."""
    @T.prim_func(private=True, s_tir=True)
    def embedding_part_select(var_acc: T.handle, var_src: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        acc = T.match_buffer(var_acc, (m, dim), dtype)
        src = T.match_buffer(var_src, (m, dim), dtype)
        ids = T.match_buffer(var_ids, (m,), "int32")
        for bx in T.thread_binding((m * dim + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("select"):
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < m * dim:
                        row: T.let[T.int64] = T.Cast("int64", ids[flat // dim]) - start
                        if row >= 0 and row < rows:
                            acc[flat // dim, flat % dim] = src[flat // dim, flat % dim]

    return embedding_part_select


def write_columns_func(start: int, cols: int, total: int, dtype: str, threads: int = 256):
    """In place: ``out[:, start:start + cols] = src``."""
    @T.prim_func(private=True, s_tir=True)
    def write_columns(var_out: T.handle, var_src: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b = T.int64()
        out = T.match_buffer(var_out, (b, total), dtype)
        src = T.match_buffer(var_src, (b, cols), dtype)
        for bx in T.thread_binding((b * cols + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("copy"):
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < b * cols:
                        out[flat // cols, start + flat % cols] = src[flat // cols, flat % cols]

    return write_columns
