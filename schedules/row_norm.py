"""A residual add and the RMSNorm that reads its result, as one kernel.

Every transformer layer adds the attention output to the residual stream and normalizes the sum for
the feed-forward, then adds the feed-forward output and normalizes that for the next layer. TVM's
fusion keeps the add and the norm apart (the sum has a second reader, the next residual add), and a
norm followed by the decoder's per-stream delay scale was a third kernel: three launches where one
suffices. At one decode step of the full model those small kernels cost about as much as reading
the weights of a narrow matrix (1-2 us each on an H100, 78 of them a step).

:func:`residual_rms_norm_te` is the portable form the model graph uses (the CPU lowers it as it
is); :func:`residual_rms_norm_gpu_func` is its GPU kernel (CUDA and WGSL), which the GPU targets
swap in by name (targets/passes.py:swap_row_norms): one workgroup per row, each thread keeping its
share of the row in registers between the sum of squares and the scaled write.
"""
from __future__ import annotations

from tvm import te, tirx

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called

NAME = "residual_rms_norm"
MAX_THREADS = 256      # WebGPU's default limit of invocations per workgroup


def residual_rms_norm_te(x: te.Tensor, residual: te.Tensor, weight: te.Tensor, eps: float,
                         delay: tuple[te.Tensor, te.Tensor, int] | None = None) -> list[te.Tensor]:
    """``[x + residual, rms_norm(x + residual) * weight (* delay scale)]`` for ``x [b, n, dim]``.

    The sum is rounded to x's dtype first (the residual stream is stored in it); the norm is computed
    in float32 from that rounded sum, as TVM's rms_norm computes it, and rounded once at the end.
    ``delay = (ring [n_slots, rows, dim], slots [b] int32, row)``: also multiply by row ``row`` of
    each stream's slot of ``ring`` (the decoder's ada-norm scales), in float32 before the rounding.
    """
    dim = int(x.shape[-1])
    f32 = "float32"
    summed = te.compute(x.shape, lambda *i: x[i] + residual[i], name="residual_sum")
    k = te.reduce_axis((0, dim), name="k")
    squares = te.compute(x.shape[:-1], lambda *lead: te.sum(
        summed[(*lead, k)].astype(f32) * summed[(*lead, k)].astype(f32), axis=k), name="sum_squares")

    def normed(*i):
        value = (summed[i].astype(f32)
                 * tirx.rsqrt(squares[i[:-1]] / tirx.const(float(dim), f32) + tirx.const(eps, f32))
                 * weight[i[-1]].astype(f32))
        if delay is not None:
            ring, slots, row = delay
            value = value * ring[slots[i[0]].astype("int64"), row, i[-1]].astype(f32)
        return value.astype(x.dtype)

    return [summed, te.compute(x.shape, normed, name="residual_norm")]


def norm_threads(dim: int, max_threads: int = MAX_THREADS) -> int:
    """Threads per row: a power of two (the reduction tree) of at most ``max_threads``, with at least
    four elements per thread where the row allows (fewer idle lanes on narrow rows)."""
    threads = 1
    while threads * 2 <= min(max_threads, 1024) and (threads < 32 or threads * 2 * 4 <= dim):
        threads *= 2
    return threads


def residual_rms_norm_gpu_func(dim: int, eps: float, dtype: str, delay_row: int | None = None,
                               threads: int | None = None):
    """The GPU kernel of :func:`residual_rms_norm_te` with the same parameters in the same order
    (``x, residual, weight[, ring, slots], sum, out``): workgroup ``r`` takes row ``r`` of the
    ``b * n`` rows; thread ``t`` holds columns ``t, t + threads, ...`` in registers, adds their
    squares, and the workgroup meets in a shared-memory tree (barriers outside any branch, as WGSL
    requires). ``delay_row``: the row of the delay ring to scale by (None: no delay scale)."""
    from tvm.script import tirx as T

    threads = threads or norm_threads(dim)
    if threads & (threads - 1) or not 1 <= threads <= 1024:
        raise ValueError(f"threads must be a power of two up to 1024, got {threads}")
    per_thread = (dim + threads - 1) // threads
    steps = threads.bit_length() - 1
    scaled = delay_row is not None
    row = delay_row or 0

    @T.macro
    def body(x, residual, weight, ring, slots, summed, out, bx, tx, n):
        vals = T.sblock_alloc_buffer((per_thread,), "float32", scope="local")
        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
        part = T.sblock_alloc_buffer((threads,), "float32", scope="shared")
        bi: T.let[T.int64] = bx // n
        ni: T.let[T.int64] = bx % n
        acc[0] = T.float32(0)
        for j in T.unroll(per_thread):
            c: T.let[T.int64] = T.int64(j * threads) + T.Cast("int64", tx)
            vals[j] = T.float32(0)
            if c < dim:
                summed[bi, ni, c] = x[bi, ni, c] + residual[bi, ni, c]
                vals[j] = T.Cast("float32", x[bi, ni, c] + residual[bi, ni, c])
            acc[0] = acc[0] + vals[j] * vals[j]
        part[tx] = acc[0]
        T.tvm_storage_sync("shared")
        for step in T.unroll(steps):
            offset: T.let[T.int32] = T.shift_right(T.int32(threads // 2), T.Cast("int32", step))
            acc[0] = part[T.min(tx + offset, threads - 1)]
            T.tvm_storage_sync("shared")
            if tx < offset:
                part[tx] = part[tx] + acc[0]
            T.tvm_storage_sync("shared")
        inv_rms: T.let[T.float32] = T.rsqrt(part[0] / T.float32(dim) + T.float32(eps))
        for j2 in T.unroll(per_thread):
            col: T.let[T.int64] = T.int64(j2 * threads) + T.Cast("int64", tx)
            if col < dim:
                if scaled:
                    out[bi, ni, col] = T.Cast(dtype, vals[j2] * inv_rms * T.Cast("float32", weight[col])
                                              * T.Cast("float32", ring[T.Cast("int64", slots[bi]), row, col]))
                else:
                    out[bi, ni, col] = T.Cast(dtype, vals[j2] * inv_rms * T.Cast("float32", weight[col]))

    if scaled:
        @T.prim_func(private=True, s_tir=True)
        def residual_rms_norm_scaled(var_x: T.handle, var_r: T.handle, var_w: T.handle, var_ring: T.handle,
                                     var_slots: T.handle, var_sum: T.handle, var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            b, n, n_slots, rows = T.int64(), T.int64(), T.int64(), T.int64()
            x = T.match_buffer(var_x, (b, n, dim), dtype)
            residual = T.match_buffer(var_r, (b, n, dim), dtype)
            weight = T.match_buffer(var_w, (dim,), dtype)
            ring = T.match_buffer(var_ring, (n_slots, rows, dim), dtype)
            slots = T.match_buffer(var_slots, (b,), "int32")
            summed = T.match_buffer(var_sum, (b, n, dim), dtype)
            out = T.match_buffer(var_out, (b, n, dim), dtype)
            for bx in T.thread_binding(b * n, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("residual_rms_norm"):
                        body(x, residual, weight, ring, slots, summed, out, bx, tx, n)

        return residual_rms_norm_scaled

    @T.prim_func(private=True, s_tir=True)
    def residual_rms_norm(var_x: T.handle, var_r: T.handle, var_w: T.handle, var_sum: T.handle,
                          var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, n = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, n, dim), dtype)
        residual = T.match_buffer(var_r, (b, n, dim), dtype)
        weight = T.match_buffer(var_w, (dim,), dtype)
        summed = T.match_buffer(var_sum, (b, n, dim), dtype)
        out = T.match_buffer(var_out, (b, n, dim), dtype)
        for bx in T.thread_binding(b * n, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("residual_rms_norm"):
                    body(x, residual, weight, None, None, summed, out, bx, tx, n)

    return residual_rms_norm
