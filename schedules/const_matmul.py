"""A plain matmul against a small constant matrix (the mel front end's DFT basis), one invocation per
output: SwiftShader (the headless test browser's WebGPU) never finishes compiling dlight's tiled
WGSL for it, and it is small (402 x 400 per frame)."""
from __future__ import annotations

from tvm.script import tirx as T

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called


def const_matmul_func(k_dim: int, n_dim: int, dtype: str, threads: int = 256):
    """``out[b, f, j] = sum_k x[b, f, k] * w[k, j]``, one invocation per output, k in order."""
    @T.prim_func(private=True, s_tir=True)
    def const_matmul(var_x: T.handle, var_w: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, f = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, f, k_dim), dtype)
        w = T.match_buffer(var_w, (k_dim, n_dim), dtype)
        out = T.match_buffer(var_out, (b, f, n_dim), dtype)
        for bx in T.thread_binding((b * f * n_dim + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("const_matmul"):
                    acc = T.sblock_alloc_buffer((1,), dtype, scope="local")
                    flat: T.let[T.int64] = bx * threads + T.Cast("int64", tx)
                    if flat < b * f * n_dim:
                        row: T.let[T.int64] = flat // n_dim
                        col: T.let[T.int64] = flat % n_dim
                        acc[0] = T.Cast(dtype, 0)
                        for k in T.serial(k_dim):
                            acc[0] = acc[0] + x[row // f, row % f, k] * w[k, col]
                        out[row // f, row % f, col] = acc[0]

    return const_matmul
