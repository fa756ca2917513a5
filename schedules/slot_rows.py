"""Per-stream state kept on the device in slot-indexed ring tensors ``[n_slots, rows, width]``.

Every stream owns one slot.  Its conv-stem context (the last frames each causal conv needs) and
its audio embeddings waiting for the decoder live in such rings, so a batch of streams at
different positions reads and updates its state inside one compiled call, with no host copies.
Row ``p`` of a stream lives at ring row ``p mod rows``.
"""
from __future__ import annotations

from tvm import te, tirx

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called


def slot_rows_write_func(width: int, dtype: str):
    """In place: ``ring[slots[b], (offsets[b] + i) mod rows, :] = src[b, n - m + i, :]`` for i < m = min(n, rows)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def slot_rows_write(var_ring: T.handle, var_src: T.handle, var_slots: T.handle, var_offsets: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_slots, rows, b, n = T.int64(), T.int64(), T.int64(), T.int64()
        ring = T.match_buffer(var_ring, (n_slots, rows, width), dtype)
        src = T.match_buffer(var_src, (b, n, width), dtype)
        slots = T.match_buffer(var_slots, (b,), "int32")
        offsets = T.match_buffer(var_offsets, (b,), "int32")
        for bi, i, c in T.grid(b, T.min(n, rows), width):
            with T.sblock("write"):
                vb, vi, vc = T.axis.remap("SSS", [bi, i, c])
                ring[T.Cast("int64", slots[vb]),
                     T.floormod(T.Cast("int64", offsets[vb]) + n - T.min(n, rows) + vi, rows), vc] = \
                    src[vb, n - T.min(n, rows) + vi, vc]

    return slot_rows_write


def slot_rows_read(ring: te.Tensor, slots: te.Tensor, offsets: te.Tensor, count) -> te.Tensor:
    """``[b, count, width]``: rows ``offsets[b] .. + count`` (mod rows) of each stream's slot."""
    rows = ring.shape[1]
    return te.compute(
        (slots.shape[0], count, ring.shape[2]),
        lambda bi, i, c: ring[slots[bi].astype("int64"),
                              tirx.floormod(offsets[bi].astype("int64") + i, rows), c],
        name="slot_rows_read")
