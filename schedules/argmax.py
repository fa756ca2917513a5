"""Greedy decoding's argmax over the logits as one kernel: int32 indices and no blockIdx.z, which
TVM's sort/argmax lowering needs and WGSL lacks."""
from __future__ import annotations

from tvm.script import tirx as T

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called


# Loads of one thread's scan issued together before their compares: with one load per compare the
# scan is a chain of memory latencies (an H100 took 49 us for one 131072-logit row with 1024 threads).
SCAN_UNROLL = 8


def argmax_rows_func(threads: int = 256, dtype: str = "float32", unroll: int = SCAN_UNROLL):
    """``out[b, 0] = argmax(x[b, :])`` as int32, the lowest index among equal maxima (topk's k=1),
    one workgroup per row: a strided scan (``unroll`` loads in flight per thread), then a tree in
    workgroup memory.  ``dtype``: the logits' (float32 or float16; compared in float32, which holds
    every float16 exactly)."""
    steps = threads.bit_length() - 1

    @T.prim_func(private=True, s_tir=True)
    def argmax_rows(var_x: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, n = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, n), dtype)
        out = T.match_buffer(var_out, (b, 1), "int32")
        for bx in T.thread_binding(b, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("argmax"):
                    best_v = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    best_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    ov = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    oi = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    mv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    mi = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    sv = T.sblock_alloc_buffer((threads,), "float32", scope="shared")
                    si = T.sblock_alloc_buffer((threads,), "int32", scope="shared")
                    vals = T.sblock_alloc_buffer((unroll,), "float32", scope="local")
                    best_v[0] = T.float32(-3.4028234663852886e38)
                    best_i[0] = T.int32(2147483647)
                    for j in T.serial((n + threads * unroll - 1) // (threads * unroll)):
                        # the thread's indices rise with (j, u): the first of equal maxima stays
                        for u in T.unroll(unroll):
                            if (j * unroll + u) * threads + T.Cast("int64", tx) < n:
                                vals[u] = T.Cast("float32", x[bx, (j * unroll + u) * threads + T.Cast("int64", tx)])
                        for u in T.unroll(unroll):
                            idx: T.let[T.int64] = (j * unroll + u) * threads + T.Cast("int64", tx)
                            if idx < n:
                                if vals[u] > best_v[0] or best_i[0] == T.int32(2147483647):
                                    best_v[0] = vals[u]
                                    best_i[0] = T.Cast("int32", idx)
                    sv[tx] = best_v[0]
                    si[tx] = best_i[0]
                    T.tvm_storage_sync("shared")
                    for s in T.unroll(steps):
                        half: T.let[T.int32] = T.shift_right(T.int32(threads // 2), T.Cast("int32", s))
                        ov[0] = sv[T.min(tx + half, threads - 1)]
                        oi[0] = si[T.min(tx + half, threads - 1)]
                        mv[0] = sv[tx]
                        mi[0] = si[tx]
                        T.tvm_storage_sync("shared")
                        if tx < half and (ov[0] > mv[0] or (ov[0] == mv[0] and oi[0] < mi[0])):
                            sv[tx] = ov[0]
                            si[tx] = oi[0]
                        T.tvm_storage_sync("shared")
                    if tx == 0:
                        out[bx, 0] = si[0]

    return argmax_rows
