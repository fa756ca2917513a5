"""Sliding-window attention over a ring-buffer KV cache, and the in-place append into that ring.

Why ring buffers and not TVM's PagedKVCache (see ../shared/research/kv_cache.md): the paged
cache's per-sequence window is StreamingLLM-style (exact only for one-token steps with W-1) and
its exact per-layer mode crashes on llvm in TVM 0.27, while Voxtral's encoder is fed in chunks of
many frames and both towers must match the reference's exact ``q - W < k <= q`` mask.  A ring of W
rows per layer and sequence gives an exact window for chunks of any length, bounded memory, and a
batch of sequences at different positions; voxc's own pages (below) make a ring's memory follow the
positions a sequence has reached, without touching the window's arithmetic.

Cache layout, one tensor per layer: a pool of pages ``[n_pages, 2 (k, v), page_rows, n_kv_heads,
head_dim]`` (a kernel binds only its layer's pool: WebGPU and Vulkan limit the size of one buffer
binding), shared by all sequences through a page table.  Position ``p`` of a sequence lives in ring row
``r = p mod window``, and ring row ``r`` in row ``r % page_rows`` of page ``pages[r // page_rows]`` of
the sequence's row of the table (voxc.artifact: KV_PAGE_ROWS, kv_page_rows).  So a sequence holds pages
only for the ring rows it has reached (voxc.runtime.kv_pages hands them out), while the window stays
exact.  The kernels take the table rows of the batch's sequences, ``pages [b, pages_per_ring]`` int32
(the graph gathers them from the per-slot table once per call): with the slots folded into the table a
GPU attention kernel binds 8 storage buffers, WebGPU's default limit.  Queries of a chunk attend to the
ring as it was before the chunk (read first) plus the chunk's own keys; then the chunk's last
``min(n, window)`` keys are written into the ring.  Table entries of rows a sequence has not reached
may point at any page (the runtime uses page 0): no kernel lets such a row weigh in.
"""
from __future__ import annotations

import math

from tvm import te, tirx

from schedules import pin_source

pin_source(__name__)   # the TVMScript kernel builders below parse this file when called

NEG_INF = -3.0e38
INT8_MAX = 127.0   # an 8-bit cache's codes are -127 .. 127 (symmetric: -128 is never stored)
# Threads that quantize one row of an 8-bit cache on a GPU (a warp: the row's max is one warp reduction),
# and rows per block.
INT8_APPEND_LANES = 32
INT8_APPEND_ROWS_PER_BLOCK = 4


def ring_page_rows(window: int, page_rows: int | None) -> int:
    """The page size a kernel uses: ``page_rows`` (a test's), or the artifact's for the window."""
    from voxc.artifact import kv_page_rows
    from voxc.errors import VoxcError

    rows = kv_page_rows(window) if page_rows is None else int(page_rows)
    if not 1 <= rows <= window:
        raise VoxcError(f"ring pages of {rows} rows do not fit a window of {window} rows")
    return rows


def ring_pages(window: int, page_rows: int) -> int:
    """Pages of one sequence's whole ring."""
    return -(-window // page_rows)


def int8_page(kv_dtype: str | None, page_rows: int, n_kv_heads: int, head_dim: int):
    """The byte layout of an 8-bit cache's page (voxc.artifact.Int8KvPage), or None for a float cache."""
    from voxc.artifact import Int8KvPage

    return Int8KvPage(page_rows, n_kv_heads, head_dim) if kv_dtype == "int8" else None


def cache_shape(page, page_rows: int, n_kv_heads: int, head_dim: int, n_pages) -> tuple:
    """A layer's pool: ``[n_pages, 2, P, Hkv, D]`` (float) or ``[n_pages, page_bytes]`` (8-bit ``page``)."""
    if page is None:
        return (n_pages, 2, page_rows, n_kv_heads, head_dim)
    return (n_pages, page.page_bytes)


def int8_scale_from_bytes(cache, page_index, page, kv, row, head):
    """The float32 scale of (k or v, row, head) of an 8-bit page, assembled from its four bytes (a TE
    expression: a TE tensor has one dtype, so the word is built with shifts, then reinterpreted)."""
    first = page.scale_index(kv, row, head) * 4
    word = tirx.const(0, "uint32")
    for byte in range(4):
        part = cache[page_index, first + byte].astype("uint8").astype("uint32")
        word = word | (part << tirx.const(8 * byte, "uint32")) if byte else part
    return tirx.reinterpret("float32", word)


def int8_dequantized(values, scale, dtype: str):
    """An 8-bit cache element as the kernels read it (float32): value x scale, rounded to the activation
    dtype first, so that a ring row and :func:`int8_roundtrip_func`'s chunk row are the same number."""
    return (values.astype("float32") * scale).astype(dtype).astype("float32")


def ring_attrs(func, window: int, page_rows: int):
    """``func`` with the window and page size it was made for (targets swap in their own kernels by them)."""
    return func.with_attr("voxc_ring_window", window).with_attr("voxc_ring_page_rows", page_rows)


def ring_shape(func) -> tuple[int, int]:
    """(window, page_rows) of a ring kernel made by this module."""
    return int(func.attrs["voxc_ring_window"]), int(func.attrs["voxc_ring_page_rows"])


def _ring_position(start, row, window):
    """Absolute position held by ring row ``row`` just before a chunk that starts at ``start`` (may be < 0)."""
    last = start - 1
    return last - tirx.floormod(last - row, window)


def ring_attention_func(n_heads: int, n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32",
                        page_rows: int | None = None, kv_dtype: str | None = None):
    """PrimFunc: out[b, i, h, :] = softmax-weighted sum over visible ring rows and chunk keys.

    Arguments: q [b, n, H, D], k/v [b, n, Hkv, D] (RoPE already applied to q and k),
    cache [n_pages, 2, P, Hkv, D] (the layer's pool; ``kv_dtype`` "int8": [n_pages, page_bytes] of
    voxc.artifact.Int8KvPage), pages [b, ceil(W / P)] int32 (each sequence's page table row), starts
    [b] int32 (position of the chunk's first token). Returns out [b, n, H, D].
    ``page_rows`` P: voxc.artifact.kv_page_rows(window) unless given.  A ring row that is not visible
    is read (this definition scores all W rows) but weighs exactly 0: its score and its value are both
    replaced, so a row of a page never written (whatever its bits) cannot turn the sum into NaN.  An
    8-bit ring row weighs in as :func:`int8_dequantized`; the chunk's own keys as given (the model
    passes them through :func:`int8_roundtrip_func` first).
    """
    P = ring_page_rows(window, page_rows)
    page8 = int8_page(kv_dtype, P, n_kv_heads, head_dim)
    b, n = te.var("b", "int64"), te.var("n", "int64")
    n_pages = te.var("n_pages", "int64")
    group = n_heads // n_kv_heads
    scale = tirx.const(head_dim ** -0.5, "float32")   # scores and softmax in float32 for any storage dtype
    q = te.placeholder((b, n, n_heads, head_dim), dtype, name="q")
    k = te.placeholder((b, n, n_kv_heads, head_dim), dtype, name="k")
    v = te.placeholder((b, n, n_kv_heads, head_dim), dtype, name="v")
    cache = te.placeholder(cache_shape(page8, P, n_kv_heads, head_dim, n_pages), kv_dtype or dtype, name="cache")
    pages = te.placeholder((b, ring_pages(window, P)), "int32", name="pages")
    starts = te.placeholder((b,), "int32", name="starts")
    n_keys = window + n

    def visible(bi, i, j):
        start = starts[bi].astype("int64")
        query_pos = start + i
        ring_pos = _ring_position(start, j, window)
        from_ring = tirx.all(ring_pos >= 0, ring_pos > query_pos - window)
        jj = j - window
        from_chunk = tirx.all(jj <= i, i - jj < window)
        return tirx.if_then_else(j < window, from_ring, from_chunk)

    def key_or_value(kv_index, chunk, bi, j, kh, d):
        """Key or value j (ring row j < W, else chunk row j - W) in float32."""
        row = tirx.min(j, window - 1)
        page = pages[bi, tirx.floordiv(row, P)].astype("int64")
        page_row = tirx.floormod(row, P)
        if page8 is None:
            cached = cache[page, kv_index, page_row, kh, d].astype("float32")
        else:
            cached = int8_dequantized(cache[page, page8.value_offset(kv_index, page_row, kh, d)],
                                      int8_scale_from_bytes(cache, page, page8, kv_index, page_row, kh), dtype)
        return tirx.if_then_else(j < window, cached, chunk[bi, tirx.max(j - window, 0), kh, d].astype("float32"))

    rd = te.reduce_axis((0, head_dim), name="rd")
    dots = te.compute(
        (b, n_heads, n, n_keys),
        lambda bi, h, i, j: te.sum(q[bi, i, h, rd].astype("float32") * key_or_value(0, k, bi, j, h // group, rd),
                                   axis=rd),
        name="dots")
    scores = te.compute(
        (b, n_heads, n, n_keys),
        lambda bi, h, i, j: tirx.if_then_else(visible(bi, i, j), dots[bi, h, i, j] * scale,
                                              tirx.const(NEG_INF, "float32")),
        name="scores")
    rj = te.reduce_axis((0, n_keys), name="rj")
    row_max = te.compute((b, n_heads, n), lambda bi, h, i: te.max(scores[bi, h, i, rj], axis=rj), name="row_max")
    weights = te.compute((b, n_heads, n, n_keys),
                         lambda bi, h, i, j: te.exp(scores[bi, h, i, j] - row_max[bi, h, i]), name="weights")
    rs = te.reduce_axis((0, n_keys), name="rs")
    row_sum = te.compute((b, n_heads, n), lambda bi, h, i: te.sum(weights[bi, h, i, rs], axis=rs), name="row_sum")
    ro = te.reduce_axis((0, n_keys), name="ro")
    weighted = te.compute(
        (b, n, n_heads, head_dim),
        lambda bi, i, h, d: te.sum(weights[bi, h, i, ro] * tirx.if_then_else(
            visible(bi, i, ro), key_or_value(1, v, bi, ro, h // group, d),
            tirx.const(0.0, "float32")), axis=ro),
        name="weighted")
    out = te.compute((b, n, n_heads, head_dim),
                     lambda bi, i, h, d: (weighted[bi, i, h, d] / row_sum[bi, h, i]).astype(dtype), name="attn_out")
    func = te.create_prim_func([q, k, v, cache, pages, starts, out]).without_attr("global_symbol")
    return ring_attrs(func, window, P)


def ring_append_func(n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32",
                     page_rows: int | None = None, kv_dtype: str | None = None):
    """In-place PrimFunc writing a chunk's last ``min(n, window)`` keys and values into the ring, through
    the page table: (cache [n_pages, 2, P, Hkv, D], k, v, pages [b, ceil(W / P)], starts).  An 8-bit
    cache (``kv_dtype`` "int8"): :func:`ring_append_int8_func`."""
    from tvm.script import tirx as T

    if kv_dtype == "int8":
        return ring_append_int8_func(n_kv_heads, head_dim, window, dtype, page_rows)
    P = ring_page_rows(window, page_rows)
    NPT = ring_pages(window, P)

    @T.prim_func(private=True, s_tir=True)
    def ring_append(var_cache: T.handle, var_k: T.handle, var_v: T.handle, var_pages: T.handle,
                    var_starts: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_pages, b, n = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (n_pages, 2, P, n_kv_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (b, n, n_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (b, n, n_kv_heads, head_dim), dtype)
        pages = T.match_buffer(var_pages, (b, NPT), "int32")
        starts = T.match_buffer(var_starts, (b,), "int32")
        # One store per element, keys and values on their own axis: dlight's GPU rules see a plain
        # spatial block (with two stores, one to each half of the cache, its GEMV rule asserts on the
        # block's two-row write region as soon as a unit loop is dropped, e.g. one kv head).
        for bi, i, kv, h, d in T.grid(b, T.min(n, window), 2, n_kv_heads, head_dim):
            with T.sblock("append"):
                vb, vi, vkv, vh, vd = T.axis.remap("SSSSS", [bi, i, kv, h, d])
                # chunk token (n - min(n, W) + vi) goes to ring row (start + that index) mod W
                cache[T.Cast("int64", pages[vb, T.floordiv(T.floormod(
                          T.Cast("int64", starts[vb]) + n - T.min(n, window) + vi, window), P)]), vkv,
                      T.floormod(T.floormod(T.Cast("int64", starts[vb]) + n - T.min(n, window) + vi, window), P),
                      vh, vd] = \
                    T.if_then_else(vkv == 0, k[vb, n - T.min(n, window) + vi, vh, vd],
                                   v[vb, n - T.min(n, window) + vi, vh, vd])

    return ring_attrs(ring_append, window, P)


def _int8_row_loops(gpu: bool):
    """The loops over an 8-bit kernel's rows: blocks of INT8_APPEND_ROWS_PER_BLOCK rows (threadIdx.y)
    with INT8_APPEND_LANES lanes each (a warp, threadIdx.x) on a GPU; parallel rows, one lane, on a CPU.
    Returns (rows, lanes, rows_loop(extent), row_block_loop(), lanes_loop())."""
    from tvm.script import tirx as T

    lanes = INT8_APPEND_LANES if gpu else 1
    rows = INT8_APPEND_ROWS_PER_BLOCK if gpu else 1

    def rows_loop(extent):
        return T.thread_binding(extent, thread="blockIdx.x") if gpu else T.parallel(extent)

    def row_block_loop():
        return T.thread_binding(rows, thread="threadIdx.y") if gpu else T.serial(rows)

    def lanes_loop():
        return T.thread_binding(lanes, thread="threadIdx.x") if gpu else T.serial(lanes)

    return rows, lanes, rows_loop, row_block_loop, lanes_loop


def _int8_code(value, inverse):
    """The 8-bit code of ``value`` (float32) for a row whose 127 / max|x| is ``inverse``."""
    from tvm.script import tirx as T

    return T.Cast("int8", T.max(T.min(T.round(value * inverse), T.float32(INT8_MAX)), T.float32(-INT8_MAX)))


def _int8_row_macro():
    """A TVMScript macro: the max |x| of row (bi, i, h) of ``src0`` (``sel`` 0) or ``src1`` into
    ``amax[0]``, each of ``lanes`` lanes (lane ``tx``) taking every lanes-th element, then a warp
    reduction (``gpu``).  The 8-bit append and the chunk-key rounding share it, so that they round alike."""
    from tvm.script import tirx as T

    @T.macro(hygienic=False)
    def int8_row_max(src0, src1, sel, bi, i, h, part, amax, tx, dim, lanes, gpu):
        part[0] = T.float32(0)
        for j in T.serial((dim + lanes - 1) // lanes):
            if j * lanes + T.Cast("int64", tx) < dim:
                part[0] = T.max(part[0], T.fabs(T.Cast("float32", T.if_then_else(
                    sel == 0, src0[bi, i, h, j * lanes + tx], src1[bi, i, h, j * lanes + tx]))))
        if gpu:
            with T.sblock("row_max"):
                T.reads(part[0])
                T.writes(amax[0])
                T.attr(T.comm_reducer(lambda x0, y0: T.max(x0, y0), [T.float32(0)]), "reduce_scope", T.int32(0))
                T.tvm_thread_allreduce(T.uint32(1), part[0], True, amax[0], tx, dtype="void")
        else:
            amax[0] = part[0]

    return int8_row_max


def ring_append_int8_func(n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32",
                          page_rows: int | None = None, gpu: bool = False):
    """:func:`ring_append_func` into an 8-bit cache (voxc.artifact.Int8KvPage): each (k or v, row,
    kv head) of the chunk's last ``min(n, window)`` tokens is stored as round(x * 127 / max|x|), clamped
    to +-127, with the scale max|x| / 127 (0 for an all-zero row, whose values are then 0).

    The same loop nest on every target (:func:`_int8_row_loops`): ``gpu`` binds the rows to blocks and a
    warp's lanes to a row's elements (the max is a warp reduction); otherwise the rows run in parallel."""
    from tvm.script import tirx as T

    P = ring_page_rows(window, page_rows)
    NPT = ring_pages(window, P)
    page8 = int8_page("int8", P, n_kv_heads, head_dim)
    PB, HKV, D = page8.page_bytes, n_kv_heads, head_dim
    WORDS = PB // 4                                    # float32 words of a page
    RPB, LANES, rows_loop, row_block_loop, lanes_loop = _int8_row_loops(gpu)
    STEPS = -(-D // LANES)                             # elements of a row per lane
    int8_row_max = _int8_row_macro()

    @T.prim_func(private=True, s_tir=True)
    def ring_append(var_cache: T.handle, var_k: T.handle, var_v: T.handle, var_pages: T.handle,
                    var_starts: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n_pages, b, n = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (n_pages, PB), "int8")
        k = T.match_buffer(var_k, (b, n, HKV, D), dtype)
        v = T.match_buffer(var_v, (b, n, HKV, D), dtype)
        pages = T.match_buffer(var_pages, (b, NPT), "int32")
        starts = T.match_buffer(var_starts, (b,), "int32")
        scales = T.decl_buffer((n_pages * WORDS,), "float32", data=cache.data)
        # rows: (sequence, chunk token, k or v, kv head), the chunk's last min(n, W) tokens
        for rb in rows_loop((b * T.min(n, window) * 2 * HKV + RPB - 1) // RPB):
            for ry in row_block_loop():
                for tx in lanes_loop():
                    with T.sblock("append_int8"):
                        T.reads()
                        T.writes()
                        part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        amax = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        r: T.let[T.int64] = rb * RPB + T.Cast("int64", ry)
                        if r < b * T.min(n, window) * 2 * HKV:
                            h: T.let[T.int64] = r % HKV
                            kv: T.let[T.int64] = r // HKV % 2
                            i: T.let[T.int64] = r // (2 * HKV) % T.min(n, window)
                            bi: T.let[T.int64] = r // (2 * HKV * T.min(n, window))
                            token: T.let[T.int64] = n - T.min(n, window) + i
                            ring_row: T.let[T.int64] = T.floormod(T.Cast("int64", starts[bi]) + token, window)
                            page: T.let[T.int64] = T.Cast("int64", pages[bi, ring_row // P])
                            int8_row_max(k, v, kv, bi, token, h, part, amax, tx, D, LANES, gpu)
                            inverse: T.let[T.float32] = T.if_then_else(
                                amax[0] > T.float32(0), T.float32(INT8_MAX) / amax[0], T.float32(0))
                            for j in T.serial(STEPS):
                                if j * LANES + T.Cast("int64", tx) < D:
                                    cache[page, page8.value_offset(kv, ring_row % P, h, j * LANES + tx)] = _int8_code(
                                        T.Cast("float32", T.if_then_else(
                                            kv == 0, k[bi, token, h, j * LANES + tx], v[bi, token, h, j * LANES + tx])),
                                        inverse)
                            if tx == 0:
                                scales[page * WORDS + page8.scale_index(kv, ring_row % P, h)] = \
                                    amax[0] / T.float32(INT8_MAX)

    return ring_attrs(ring_append, window, P)


def int8_roundtrip_func(heads: int, head_dim: int, dtype: str = "float32", gpu: bool = False):
    """PrimFunc (x [b, n, heads, D], y): y = what an 8-bit cache gives back for x, each (b, n, head) row
    quantized as :func:`ring_append_int8_func` stores it, then :func:`int8_dequantized`.

    The attention reads a chunk's own keys and values from the chunk, the earlier ones from the ring:
    through this, both are the cached numbers, so an 8-bit build's results do not depend on how a
    stream is cut into chunks (offline equals any streaming).  The append's loops and arithmetic
    (dlight's schedule of the same function written in TE took 55 us a call for 5 MB on a GPU)."""
    from tvm.script import tirx as T

    D = head_dim
    RPB, LANES, rows_loop, row_block_loop, lanes_loop = _int8_row_loops(gpu)
    STEPS = -(-D // LANES)
    int8_row_max = _int8_row_macro()

    @T.prim_func(private=True, s_tir=True)
    def int8_roundtrip(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, n = T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, n, heads, D), dtype)
        y = T.match_buffer(var_y, (b, n, heads, D), dtype)
        for rb in rows_loop((b * n * heads + RPB - 1) // RPB):
            for ry in row_block_loop():
                for tx in lanes_loop():
                    with T.sblock("roundtrip"):
                        T.reads()
                        T.writes()
                        part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        amax = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        r: T.let[T.int64] = rb * RPB + T.Cast("int64", ry)
                        if r < b * n * heads:
                            h: T.let[T.int64] = r % heads
                            i: T.let[T.int64] = r // heads % n
                            bi: T.let[T.int64] = r // (heads * n)
                            int8_row_max(x, x, 0, bi, i, h, part, amax, tx, D, LANES, gpu)
                            inverse: T.let[T.float32] = T.if_then_else(
                                amax[0] > T.float32(0), T.float32(INT8_MAX) / amax[0], T.float32(0))
                            for j in T.serial(STEPS):
                                if j * LANES + T.Cast("int64", tx) < D:
                                    y[bi, i, h, j * LANES + tx] = T.Cast(dtype, T.Cast("float32", _int8_code(
                                        T.Cast("float32", x[bi, i, h, j * LANES + tx]), inverse))
                                        * (amax[0] / T.float32(INT8_MAX)))

    return int8_roundtrip


# ---- CUDA kernels ----------------------------------------------------------------------------------------
# The TE function above is the definition; on GPUs dlight cannot schedule it (its fallback rejects the
# fused softmax blocks, and would read the whole W-row ring for every query). These two kernels compute
# the same function, split-K ("flash decoding"): ``ring_attention_partial_cuda`` gives each
# (query row, kv head, split) block a contiguous slice of the query's VISIBLE keys only (positions
# max(0, q - W + 1) .. q, from the ring or the chunk), the ``group`` query heads of a kv head sharing the
# keys in shared memory, with an online softmax in float32; ``ring_attention_merge_cuda`` combines the
# splits by their log-sum-exp. targets/cuda.py swaps them in for every ``ring_attention*`` call.

_LOG2E = 1.4426950408889634
_EMPTY = -5.0e4   # running max of an empty softmax; exp2(_EMPTY - real max) == 0 in float32


# CUDA's launch limits (every NVIDIA GPU since compute capability 2.0): threads per block, block z,
# grid y/z, and the static shared memory of one block without the dynamic opt-in.
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_Z = 64
MAX_GRID_YZ = 65535
MAX_SHARED_BYTES = 48 * 1024


# Query rows x query heads that share each K/V tile a block loads: a kv head's group of query heads
# does, and where the group is smaller (the encoder's plain multi-head attention: 1), consecutive query
# rows of a chunk fill the block instead (the streaming encoder's 4 frames a step), so that the rows
# read their keys once instead of once each.
ROWS_X_HEADS_PER_TILE = 4

# Blocks a launch should have before splitting a query's keys further pays: four per SM of an H100
# (132).  ``n_splits`` is the most splits a layout allows (the partial output's size); a call uses
# fewer where its batch already gives this many blocks (active_splits).  A decode step of 144 streams
# had 36864 blocks of about 24 keys each: the partial outputs (75 MB a layer, written, then read by the
# merge) were a third of the traffic of its 448 MB of keys and values, and each block's fixed work
# (loading its queries, merging across tz, storing) was paid for 24 keys.
FILL_BLOCKS = 4 * 132


def active_splits(b, n, lay: dict):
    """The splits a call of ``b`` sequences of ``n`` query rows runs (a TIR expression, the partial and
    the merge kernel agree on it): the fewest that, with the call's other blocks, make FILL_BLOCKS, at
    least 1 and at most the layout's ``n_splits``."""
    other = tirx.max(b * ((n + lay["query_rows"] - 1) // lay["query_rows"]) * (lay["n_kv_heads"] * lay["head_blocks"]),
                     tirx.const(1, "int64"))        # an empty call (b or n 0) divides by 1
    fill = tirx.const(lay["fill_blocks"], "int64")
    return tirx.min(tirx.const(lay["n_splits"], "int64"),
                    tirx.max(tirx.const(1, "int64"), (fill + other - 1) // other))


def cuda_kernel_layout(n_heads: int, n_kv_heads: int, head_dim: int, window: int, dtype: str,
                       threads: int = 128, max_splits: int = 32, keys_per_split: int = 256, *,
                       query_rows: int | None = None, fill_blocks: int = FILL_BLOCKS,
                       max_threads: int = MAX_THREADS_PER_BLOCK, max_z: int = MAX_BLOCK_Z,
                       max_shared_bytes: int = MAX_SHARED_BYTES, max_grid_y: int = MAX_GRID_YZ,
                       max_vector_lanes: int = 16, span_in_registers: bool = False) -> dict:
    """Thread-block shape of the CUDA ring attention: tx over head_dim vectors (one warp at most),
    ty over ``query_rows`` consecutive query rows x the query heads of one kv head, tz over keys;
    up to ``n_splits`` blocks share a query's keys (fewer where the batch fills the GPU without them:
    :func:`active_splits`, ``fill_blocks``).  ``query_rows`` (default: ROWS_X_HEADS_PER_TILE over the
    group, at least 1) is lowered until the block fits; a kv head whose group spreads over several
    head blocks takes one row per block.

    ``threads`` is the block size aimed at; the shape always stays within the launch limits
    (``max_threads`` per block, ``max_z`` on z, ``max_shared_bytes`` of shared memory per block,
    ``max_grid_y`` blocks on y) for any head count, GQA ratio, head size and window: a kv head's
    ``group`` query heads share one block (each K/V row loaded once for all of them) unless that
    block would be too large, and then spread over ``head_blocks`` blocks of ``bdy`` heads (the
    last one masked when ``bdy`` does not divide ``group``).  ``span_in_registers``: the partial kernel
    keeps its block's key span in a local array (see the kernel) instead of recomputing it at every
    key row: not yet the default (on lavapipe's Vulkan it gave wrong batched results; not yet run on a
    CUDA GPU: targets.cuda.CudaTarget.attention_span_in_registers builds it for the comparison)."""
    from voxc.errors import VoxcError

    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads or head_dim < 1 or window < 1:
        raise VoxcError(f"ring attention needs n_heads a multiple of n_kv_heads and positive sizes, got "
                        f"n_heads={n_heads} n_kv_heads={n_kv_heads} head_dim={head_dim} window={window}")
    group = n_heads // n_kv_heads
    esize = 2 if dtype in ("float16", "bfloat16") else 4
    vec = min(16 // esize, max_vector_lanes)
    while vec > 1 and head_dim % vec:
        vec //= 2
    while head_dim // vec > 32:
        vec *= 2
    bdx = head_dim // vec
    # one load/store moves at most 16 bytes (no 32-byte vector types) and ``max_vector_lanes``
    # elements (WGSL's vectors have at most 4: a thread then works on 4 half-precision elements)
    load_lanes = min(vec, 16 // esize, max_vector_lanes)

    def shared_bytes(bdy: int, bdz: int, tile: int) -> int:
        rows = bdz * bdy * tile
        total = 2 * rows * head_dim * esize                  # the K and V tiles
        if bdz > 1:
            total += bdz * bdy * (head_dim + 2) * 4          # the cross-z merge (o, max, sum)
        return total + bdx * bdy * bdz * 4                   # TVM's cross-thread reduction buffer

    bdy_max = 0
    for b in range(1, group + 1):
        if bdx * b <= max_threads and shared_bytes(b, 1, 1) <= max_shared_bytes:
            bdy_max = b
    if bdy_max == 0:
        raise VoxcError(f"ring attention with head_dim {head_dim} ({dtype}) needs more than "
                        f"{max_shared_bytes} bytes of shared memory per block")
    head_blocks = -(-group // bdy_max)
    heads = -(-group // head_blocks)                         # balanced; head_blocks * heads >= group
    rows = 1 if head_blocks > 1 else max(1, ROWS_X_HEADS_PER_TILE // group if query_rows is None else int(query_rows))
    while rows > 1 and (bdx * heads * rows > max_threads or shared_bytes(heads * rows, 1, 1) > max_shared_bytes):
        rows -= 1
    bdy = heads * rows
    bdz = max(1, min(threads // (bdx * bdy), max_threads // (bdx * bdy), max_z))
    while bdz > 1 and shared_bytes(bdy, bdz, 1) > max_shared_bytes:
        bdz -= 1
    tile = max(1, 16 // (bdz * bdy))   # >= 16 keys (2 x 8 KB of K/V at D=128) in flight per block and step
    while tile > 1 and shared_bytes(bdy, bdz, tile) > max_shared_bytes:
        tile -= 1
    if n_kv_heads * head_blocks > max_grid_y or n_heads > max_grid_y:
        raise VoxcError(f"ring attention with {n_heads} heads exceeds the grid limit of {max_grid_y} blocks")
    n_splits = max(1, min(max_splits, -(-window // keys_per_split), max_grid_y // (n_kv_heads * head_blocks)))
    return dict(group=group, vec=vec, load_lanes=load_lanes, bdx=bdx, bdy=bdy, bdz=bdz, tile=tile,
                head_blocks=head_blocks, query_rows=rows, n_splits=n_splits, n_kv_heads=n_kv_heads,
                span_in_registers=bool(span_in_registers),
                fill_blocks=max(1, int(fill_blocks)), shared_bytes=shared_bytes(bdy, bdz, tile))


def float32_lanes(T, vec: int):
    """Loop kind for float32 work on ``vec`` elements: a half-precision cache loads 8 elements per
    16-byte vector, but TVM's CUDA codegen has no float32x8 type (it emits a broken ulonglong4), so
    float32 loops of more than 4 lanes are unrolled instead of vectorized."""
    return T.vectorized if vec <= 4 else T.unroll


def ring_attention_partial_cuda(n_heads: int, n_kv_heads: int, head_dim: int, window: int,
                                dtype: str = "float32", page_rows: int | None = None,
                                kv_dtype: str | None = None, **layout_args):
    """Split-K partial attention: o [b, n, H, splits, D] (normalised within the split) and
    lse [b, n, H, splits] (log2 of the split's softmax mass, plus its max). Same arguments as
    :func:`ring_attention_func` up to ``starts``.

    Each thread row loads its key and value row through the page table on its own (one 4-byte table
    read, L1-resident, per row of 2 x D elements), so a tile of keys may cross a page boundary at no
    cost: its rows are separate loads whether or not they share a page.  Only visible rows are read.
    An 8-bit cache's row is dequantized (values x its scale) on its way into shared memory, so the
    rest of the kernel is the float one; it reads half the bytes of a float16 row."""
    from tvm.script import tirx as T

    P = ring_page_rows(window, page_rows)
    NPT = ring_pages(window, P)
    page8 = int8_page(kv_dtype, P, n_kv_heads, head_dim)
    INT8 = page8 is not None
    CACHE_SHAPE = cache_shape(page8, P, n_kv_heads, head_dim, 1)[1:]
    WORDS = page8.page_bytes // 4 if INT8 else 1
    lay = cuda_kernel_layout(n_heads, n_kv_heads, head_dim, window, dtype, **layout_args)
    G, VEC, LV, bdx, bdy, bdz, TILE, HB, NS, QR = (lay[k] for k in (
        "group", "vec", "load_lanes", "bdx", "bdy", "bdz", "tile", "head_blocks", "n_splits", "query_rows"))
    BH = bdy // QR                      # query heads per block; ty = row * BH + head
    H, HKV, D, W = n_heads, n_kv_heads, head_dim, window
    MASK_HEADS = HB * BH > G            # the last head block has idle ty rows
    MASK_ROWS = QR > 1                  # the last row block of a chunk may have idle ty rows
    F32_LANES = float32_lanes(T, VEC)
    ROWS = bdz * bdy * TILE              # keys per iteration of a block
    SPAN_REGS = lay["span_in_registers"]

    def span_value(register, expression):
        """A key-span value from its register, or the expression itself (inlined at every use)."""
        return T.Cast("int64", register) if SPAN_REGS else expression
    scale = float(head_dim ** -0.5) * _LOG2E

    @T.prim_func(private=True, s_tir=True)
    def ring_attention_partial(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_cache: T.handle,
                               var_pages: T.handle, var_starts: T.handle,
                               var_o: T.handle, var_lse: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, n, n_pages = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (b, n, H, D), dtype)
        k = T.match_buffer(var_k, (b, n, HKV, D), dtype)
        v = T.match_buffer(var_v, (b, n, HKV, D), dtype)
        cache = T.match_buffer(var_cache, (n_pages, *CACHE_SHAPE), kv_dtype or dtype)
        pages = T.match_buffer(var_pages, (b, NPT), "int32")
        starts = T.match_buffer(var_starts, (b,), "int32")
        o = T.match_buffer(var_o, (b, n, H, NS, D), "float32")
        lse = T.match_buffer(var_lse, (b, n, H, NS), "float32")
        scales = T.decl_buffer((n_pages * WORDS,), "float32", data=cache.data)   # an 8-bit page's scales

        for bx in T.thread_binding(b * ((n + QR - 1) // QR), thread="blockIdx.x"):
            for by in T.thread_binding(HKV * HB * active_splits(b, n, lay), thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        for tz in T.thread_binding(bdz, thread="threadIdx.z"):
                            with T.sblock("attn"):
                                q_local = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                k8 = T.sblock_alloc_buffer((LV,), "int8", scope="local")
                                v8 = T.sblock_alloc_buffer((LV,), "int8", scope="local")
                                k_deq = T.sblock_alloc_buffer((LV,), dtype, scope="local")
                                v_deq = T.sblock_alloc_buffer((LV,), dtype, scope="local")
                                k_smem = T.sblock_alloc_buffer((ROWS, D), dtype, scope="shared")
                                v_smem = T.sblock_alloc_buffer((ROWS, D), dtype, scope="shared")
                                o_merge = T.sblock_alloc_buffer((bdz, bdy, D), "float32", scope="shared")
                                md_merge = T.sblock_alloc_buffer((bdz, bdy, 2), "float32", scope="shared")
                                s_part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                s_sum = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                s_local = T.sblock_alloc_buffer((bdy * TILE,), "float32", scope="local")
                                qk = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                m_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                d_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                st_m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                st_d = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                o_local = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                span = T.sblock_alloc_buffer((4,), "int32", scope="local")        # the block's (uniform)
                                row_span = T.sblock_alloc_buffer((2,), "int32", scope="local")    # this thread row's

                                bi: T.let[T.int64] = bx // ((n + QR - 1) // QR)
                                # the block's query rows first .. last; this thread's row i (idle rows
                                # of a last, partial row block compute row n - 1 again and store nothing)
                                first: T.let[T.int64] = bx % ((n + QR - 1) // QR) * QR
                                last: T.let[T.int64] = T.min(first + QR - 1, n - 1)
                                row: T.let[T.int64] = first + T.Cast("int64", ty // BH)
                                i: T.let[T.int64] = T.min(row, n - 1)
                                kvh: T.let[T.int64] = T.Cast("int64", by % HKV)
                                split: T.let[T.int64] = T.Cast("int64", by // (HKV * HB))
                                # query head g of the kv head's group (idle rows of a masked block
                                # compute head G - 1 again and store nothing)
                                g: T.let[T.int64] = T.Cast("int64", by // HKV % HB * BH + ty % BH)
                                h: T.let[T.int64] = kvh * G + T.min(g, T.int64(G - 1))
                                start: T.let[T.int64] = T.Cast("int64", starts[bi])
                                # this row's visible keys lo .. hi; the block's splits cut the union
                                # of its rows' ranges, so that its rows share each tile of keys
                                hi: T.let[T.int64] = start + i
                                lo: T.let[T.int64] = T.max(hi - W + 1, T.int64(0))
                                hi_block: T.let[T.int64] = start + last
                                lo_block: T.let[T.int64] = T.max(start + first - W + 1, T.int64(0))
                                splits: T.let[T.int64] = active_splits(b, n, lay)
                                per: T.let[T.int64] = (hi_block - lo_block + splits) // splits
                                s_lo: T.let[T.int64] = lo_block + split * per
                                s_len: T.let[T.int64] = T.max(T.min(per, hi_block + 1 - s_lo), T.int64(0))
                                # computed once, in registers: TIR inlines a let at every use, and the
                                # loops below then redid 64-bit divisions by run-time values (the split
                                # arithmetic) for every key row -- integer work, not memory, bound the kernel.
                                # int32: positions and batch rows fit, and WGSL has no 64-bit integers.  The
                                # block's values apart from the thread row's: WGSL's uniformity analysis
                                # must see the key loop's bound (it holds barriers) as the same in every thread
                                if SPAN_REGS:
                                    span[0] = T.Cast("int32", s_lo)
                                    span[1] = T.Cast("int32", s_len)
                                    span[2] = T.Cast("int32", start)
                                    span[3] = T.Cast("int32", bi)
                                    row_span[0] = T.Cast("int32", lo)
                                    row_span[1] = T.Cast("int32", hi)
                                key_lo: T.let[T.int64] = span_value(span[0], s_lo)   # (inlined: a register read)
                                key_count: T.let[T.int64] = span_value(span[1], s_len)
                                chunk_start: T.let[T.int64] = span_value(span[2], start)
                                seq: T.let[T.int64] = span_value(span[3], bi)
                                row_lo: T.let[T.int64] = span_value(row_span[0], lo)
                                row_hi: T.let[T.int64] = span_value(row_span[1], hi)

                                st_m[0] = T.float32(_EMPTY)
                                st_d[0] = T.float32(1.0)
                                for vec in F32_LANES(VEC):
                                    o_local[vec] = T.float32(0)
                                for vec in F32_LANES(VEC):
                                    q_local[vec] = T.Cast("float32", q[bi, i, h, tx * VEC + vec]) * T.float32(scale)

                                for it in T.serial((key_count + ROWS - 1) // ROWS):
                                    row_s: T.let[T.int32] = (tz * bdy + ty) * TILE
                                    row_g: T.let[T.int64] = ((it * bdz + T.Cast("int64", tz)) * bdy + T.Cast("int64", ty)) * TILE
                                    for j in T.serial(TILE):
                                        with T.sblock("kv_load"):
                                            T.reads()
                                            T.writes()
                                            if row_g + j < key_count:
                                                pos: T.let[T.int64] = key_lo + row_g + j
                                                if pos < chunk_start:
                                                    # pos >= 0 and < 2^31: a 32-bit remainder by a constant
                                                    ring_row: T.let[T.int32] = T.truncmod(T.Cast("int32", pos), W)
                                                    page: T.let[T.int64] = T.Cast("int64", pages[seq, ring_row // P])
                                                    if INT8:
                                                        k_scale: T.let[T.float32] = scales[
                                                            page * WORDS + page8.scale_index(0, ring_row % P, kvh)]
                                                        v_scale: T.let[T.float32] = scales[
                                                            page * WORDS + page8.scale_index(1, ring_row % P, kvh)]
                                                        for c in T.unroll(VEC // LV):
                                                            for vec in T.vectorized(LV):
                                                                k8[vec] = cache[page, page8.value_offset(
                                                                    0, ring_row % P, kvh, tx * VEC + c * LV + vec)]
                                                            for vec in T.vectorized(LV):
                                                                v8[vec] = cache[page, page8.value_offset(
                                                                    1, ring_row % P, kvh, tx * VEC + c * LV + vec)]
                                                            for vec in T.unroll(LV):
                                                                k_deq[vec] = T.Cast(dtype, T.Cast("float32", k8[vec]) * k_scale)
                                                                v_deq[vec] = T.Cast(dtype, T.Cast("float32", v8[vec]) * v_scale)
                                                            for vec in T.vectorized(LV):   # one 16-byte store each
                                                                k_smem[row_s + j, tx * VEC + c * LV + vec] = k_deq[vec]
                                                            for vec in T.vectorized(LV):
                                                                v_smem[row_s + j, tx * VEC + c * LV + vec] = v_deq[vec]
                                                    else:
                                                        for c in T.unroll(VEC // LV):
                                                            for vec in T.vectorized(LV):
                                                                k_smem[row_s + j, tx * VEC + c * LV + vec] = cache[
                                                                    page, 0, ring_row % P, kvh, tx * VEC + c * LV + vec]
                                                                v_smem[row_s + j, tx * VEC + c * LV + vec] = cache[
                                                                    page, 1, ring_row % P, kvh, tx * VEC + c * LV + vec]
                                                else:
                                                    for c in T.unroll(VEC // LV):
                                                        for vec in T.vectorized(LV):
                                                            k_smem[row_s + j, tx * VEC + c * LV + vec] = k[
                                                                seq, pos - chunk_start, kvh, tx * VEC + c * LV + vec]
                                                            v_smem[row_s + j, tx * VEC + c * LV + vec] = v[
                                                                seq, pos - chunk_start, kvh, tx * VEC + c * LV + vec]
                                            else:
                                                for c in T.unroll(VEC // LV):
                                                    for vec in T.vectorized(LV):
                                                        k_smem[row_s + j, tx * VEC + c * LV + vec] = T.Cast(dtype, 0)
                                                        v_smem[row_s + j, tx * VEC + c * LV + vec] = T.Cast(dtype, 0)
                                    T.tvm_storage_sync("shared")
                                    m_prev[0] = st_m[0]
                                    for j in T.serial(bdy * TILE):
                                        for vec in F32_LANES(VEC):
                                            qk[vec] = q_local[vec] * T.Cast("float32", k_smem[tz * bdy * TILE + j, tx * VEC + vec])
                                        s_part[0] = T.float32(0)
                                        for vec in T.unroll(VEC):
                                            s_part[0] = s_part[0] + qk[vec]
                                        with T.sblock("dot_allreduce"):
                                            T.reads(s_part[0])
                                            T.writes(s_sum[0])
                                            T.attr(T.comm_reducer(lambda x0, y0: x0 + y0, [T.float32(0)]),
                                                   "reduce_scope", T.int32(0))
                                            T.tvm_thread_allreduce(T.uint32(1), s_part[0], True, s_sum[0], tx, dtype="void")
                                        s_local[j] = T.float32(_EMPTY)
                                        key: T.let[T.int64] = (it * bdz + T.Cast("int64", tz)) * bdy * TILE + T.Cast("int64", j)
                                        if key < key_count and (not MASK_ROWS or (key_lo + key >= row_lo and key_lo + key <= row_hi)):
                                            s_local[j] = s_sum[0]
                                        st_m[0] = T.max(st_m[0], s_local[j])
                                    o_scale: T.let[T.float32] = T.exp2(m_prev[0] - st_m[0])
                                    st_d[0] = st_d[0] * o_scale
                                    for j in T.serial(bdy * TILE):
                                        s_local[j] = T.exp2(s_local[j] - st_m[0])
                                        st_d[0] = st_d[0] + s_local[j]
                                    for vec in F32_LANES(VEC):
                                        o_local[vec] = o_local[vec] * o_scale
                                    for j in T.serial(bdy * TILE):
                                        for vec in F32_LANES(VEC):
                                            o_local[vec] = o_local[vec] + s_local[j] * T.Cast(
                                                "float32", v_smem[tz * bdy * TILE + j, tx * VEC + vec])
                                    T.tvm_storage_sync("shared")

                                if bdz > 1:
                                    for vec in F32_LANES(VEC):
                                        o_merge[tz, ty, tx * VEC + vec] = o_local[vec]
                                    md_merge[tz, ty, 0] = st_m[0]
                                    md_merge[tz, ty, 1] = st_d[0]
                                    T.tvm_storage_sync("shared")
                                    st_m[0] = T.float32(_EMPTY)
                                    st_d[0] = T.float32(1.0)
                                    for vec in F32_LANES(VEC):
                                        o_local[vec] = T.float32(0)
                                    for z in T.serial(bdz):
                                        m_prev[0] = st_m[0]
                                        d_prev[0] = st_d[0]
                                        st_m[0] = T.max(m_prev[0], md_merge[z, ty, 0])
                                        st_d[0] = d_prev[0] * T.exp2(m_prev[0] - st_m[0]) + \
                                            md_merge[z, ty, 1] * T.exp2(md_merge[z, ty, 0] - st_m[0])
                                        for vec in F32_LANES(VEC):
                                            o_local[vec] = o_local[vec] * T.exp2(m_prev[0] - st_m[0]) + \
                                                o_merge[z, ty, tx * VEC + vec] * T.exp2(md_merge[z, ty, 0] - st_m[0])
                                if tz == 0 and (not MASK_HEADS or g < G) and (not MASK_ROWS or row < n):
                                    for vec in F32_LANES(VEC):
                                        o[bi, i, h, split, tx * VEC + vec] = o_local[vec] / st_d[0]
                                    if tx == 0:
                                        lse[bi, i, h, split] = st_m[0] + T.log2(st_d[0])

    return ring_attrs(ring_attention_partial, window, P)


def ring_attention_merge_cuda(n_heads: int, n_kv_heads: int, head_dim: int, window: int,
                              dtype: str = "float32", **layout_args):
    """out [b, n, H, D] = the splits of :func:`ring_attention_partial_cuda` weighted by their mass (the
    :func:`active_splits` of the call, which the partial kernel wrote)."""
    from tvm.script import tirx as T

    lay = cuda_kernel_layout(n_heads, n_kv_heads, head_dim, window, dtype, **layout_args)
    VEC, bdx, NS = lay["vec"], lay["bdx"], lay["n_splits"]
    F32_LANES = float32_lanes(T, VEC)
    H, D = n_heads, head_dim

    @T.prim_func(private=True, s_tir=True)
    def ring_attention_merge(var_o: T.handle, var_lse: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b, n = T.int64(), T.int64()
        o = T.match_buffer(var_o, (b, n, H, NS, D), "float32")
        lse = T.match_buffer(var_lse, (b, n, H, NS), "float32")
        out = T.match_buffer(var_out, (b, n, H, D), dtype)
        splits: T.let[T.int64] = active_splits(b, n, lay)   # those the partial kernel wrote
        for bx in T.thread_binding(b * n, thread="blockIdx.x"):
            for h in T.thread_binding(H, thread="blockIdx.y"):
                for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        d = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                        bi: T.let[T.int64] = bx // n
                        i: T.let[T.int64] = bx % n
                        m[0] = T.float32(_EMPTY)
                        for s in T.serial(splits):
                            m[0] = T.max(m[0], lse[bi, i, h, s])
                        d[0] = T.float32(0)
                        for vec in F32_LANES(VEC):
                            acc[vec] = T.float32(0)
                        for s in T.serial(splits):
                            w: T.let[T.float32] = T.exp2(lse[bi, i, h, s] - m[0])
                            d[0] = d[0] + w
                            for vec in F32_LANES(VEC):
                                acc[vec] = acc[vec] + w * o[bi, i, h, s, tx * VEC + vec]
                        for vec in F32_LANES(VEC):
                            out[bi, i, h, tx * VEC + vec] = T.Cast(dtype, acc[vec] / d[0])

    return ring_attention_merge


# ---- CPU kernel ------------------------------------------------------------------------------------------
# TVM's default CPU lowering of the TE definition runs on one thread and scores all W + n ring rows of
# every query (the decoder's W = 8192 rows at any position).  ``ring_attention_cpu`` visits only the
# visible positions, split-K like the GPU kernels: a tile of up to ``query_tile`` consecutive queries of a
# sequence (one token when decoding, an encoder chunk's frames) shares the keys of the union of their
# windows, cut into equal runs of at least ``min_keys_per_run`` keys, one parallel task each (one decode
# row keeps every core busy); a second parallel loop combines the runs by their softmax mass.  A task
# reads whole cache rows [n_kv_heads, head_dim] in position order, a sequential stream the hardware
# prefetchers follow (one kv head's rows lie n_kv_heads * head_dim elements apart, 4 KB in the decoder:
# a walk over one kv head crosses a page at every key and was latency-bound), and scores every query
# head of every query of its tile against each row while it is in L1 or L2: the G = H / Hkv query heads
# of a kv head (GQA) and the tile's queries (a chunk's queries read the ring once, not once each).

_MASKED = 2 * _EMPTY   # score of a key outside a query's window: exp2(_MASKED - running max) == 0


def cpu_kernel_layout(n_heads: int, n_kv_heads: int, head_dim: int, window: int, keys_per_block: int = 16,
                      min_keys_per_run: int = 64, max_runs: int = 32, query_tile: int = 8,
                      tile_vectors: int = 4) -> dict:
    """Loop shape of :func:`ring_attention_cpu`.

    ``lanes``: float32 vector width of the head_dim loops (the largest power of two up to 16 dividing
    head_dim).  The inner loops keep ``tile_vectors`` such vectors of sums in registers (8 AVX2
    registers at 16 lanes), enough independent FMA chains to hide their latency: ``head_tile`` query heads
    of one kv head (the largest divisor of G up to ``tile_vectors``, so every GQA ratio tiles exactly),
    times ``key_tile`` keys for the dot products and ``chunk_tile`` head_dim chunks for the weighted values
    (an MHA head, G = 1, gets 4 keys or 4 chunks).  ``keys_per_block``: keys scored before the online
    softmax rescales its running sums (a multiple of ``key_tile``); ``query_tile``: queries of a chunk
    that share their keys' reads; ``min_keys_per_run``: the shortest run worth a task of its own (a
    task's fixed cost, scaling its queries and writing its partial output, is about that many keys'
    work); ``max_runs``: runs of one query tile at most (no more than its keys need)."""
    from voxc.errors import VoxcError

    if (n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads or head_dim < 1 or window < 1 or keys_per_block < 1
            or min_keys_per_run < 1 or max_runs < 1 or query_tile < 1 or tile_vectors < 1):
        raise VoxcError(f"ring attention needs n_heads a multiple of n_kv_heads and positive sizes, got "
                        f"n_heads={n_heads} n_kv_heads={n_kv_heads} head_dim={head_dim} window={window}")
    group = n_heads // n_kv_heads
    lanes = next(x for x in (16, 8, 4, 2, 1) if head_dim % x == 0)
    head_tile = max(t for t in range(1, min(group, tile_vectors) + 1) if group % t == 0)
    spare = tile_vectors // head_tile
    key_tile = max(t for t in range(1, spare + 1) if keys_per_block % t == 0)
    chunk_tile = max(t for t in range(1, spare + 1) if (head_dim // lanes) % t == 0)
    return dict(group=group, lanes=lanes, head_tile=head_tile, key_tile=key_tile, chunk_tile=chunk_tile,
                keys_per_block=keys_per_block, query_tile=query_tile, min_keys_per_run=min_keys_per_run,
                max_runs=min(max_runs, -(-(window + query_tile - 1) // min_keys_per_run)))


def tile_runs(starts, bi, first_query, n, window: int, query_tile: int, min_keys_per_run: int, max_runs: int):
    """(first visible position, visible key count, run count) of the query tile starting at chunk index
    ``first_query`` of batch row ``bi``: the union of its queries' windows, as TIR expressions (the
    partial and the combine loops of :func:`ring_attention_cpu` agree on them)."""
    query = starts[bi].astype("int64") + first_query
    last = query + tirx.min(tirx.const(query_tile, "int64"), n - first_query) - 1
    first = tirx.max(query - window + 1, tirx.const(0, "int64"))
    count = last + 1 - first
    return first, count, tirx.min(tirx.const(max_runs, "int64"), (count + min_keys_per_run - 1) // min_keys_per_run)


# 2**f = e**(f ln 2) for |f| <= 1/2: Taylor terms (ln 2)**k / k!; the degree-6 remainder is below 2e-7
_EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(7))


def fast_exp2(x):
    """float32 2**x as a vectorizable expression: LLVM turns a vector ``exp2`` into one libm call per
    lane, which made the softmax a large share of the CPU attention.  2**round(x) is built in the exponent
    bits, times a polynomial for the rest; x <= -127 (the running max before any key, a masked key)
    gives exactly 0."""
    x = tirx.max(tirx.min(x, tirx.const(127.0, "float32")), tirx.const(-127.0, "float32"))
    whole = tirx.nearbyint(x)
    frac = x - whole
    poly = tirx.const(_EXP2_TAYLOR[-1], "float32")
    for coef in reversed(_EXP2_TAYLOR[:-1]):
        poly = poly * frac + tirx.const(coef, "float32")
    power = tirx.reinterpret("float32", tirx.shift_left(whole.astype("int32") + 127, 23))
    return poly * power


def ring_attention_cpu(n_heads: int, n_kv_heads: int, head_dim: int, window: int, dtype: str = "float32",
                       page_rows: int | None = None, **layout_args):
    """The TE function's drop-in replacement on llvm (same signature): partial attention of each
    (query tile, run) task over its run of keys, in float32 with an online softmax, into a scratch
    buffer; then each (query, head) combines its tile's runs.  ``layout_args``:
    :func:`cpu_kernel_layout`'s keywords (the tests use small blocks, runs and tiles on tiny windows).

    A run's ring part is read page by page: its positions split into pieces of consecutive rows of one
    page (at page boundaries and at the ring's wrap), each a contiguous stream of whole cache rows,
    scored in key blocks that start at the piece's first row, so no block of ``keys_per_block`` keys
    straddles two pages.  With the default 64-row pages and 16-key blocks a run of the decoder's
    (at least 64 keys) crosses one or two page boundaries."""
    from tvm.script import tirx as T

    P = ring_page_rows(window, page_rows)
    NPT = ring_pages(window, P)
    lay = cpu_kernel_layout(n_heads, n_kv_heads, head_dim, window, **layout_args)
    H, HKV, D, W = n_heads, n_kv_heads, head_dim, window
    G, LANES, KB, QT = lay["group"], lay["lanes"], lay["keys_per_block"], lay["query_tile"]
    GT, JT, CT = lay["head_tile"], lay["key_tile"], lay["chunk_tile"]
    MIN_RUN, RUNS = lay["min_keys_per_run"], lay["max_runs"]
    CHUNKS = D // LANES
    scale = float(head_dim ** -0.5) * _LOG2E   # scores in log2 units: the softmax uses exp2

    @T.macro
    def fold_lanes(part, g, jj, width):
        # one halving step of a vector's horizontal sum (none when the vector is narrower)
        if width >= 1:
            for lane in T.vectorized(width):
                part[g, jj, lane] = part[g, jj, lane] + part[g, jj, lane + width]

    @T.macro
    def attend(keys, values, key_row_expr, value_row_expr, position_expr, count_expr, query_expr, n_queries_expr,
               span, q_scaled, acc, probs, softmax, part, acc_tile):
        # ``count`` consecutive rows of keys [*, HKV, D] from ``key_row`` and of values from ``value_row``,
        # positions ``position``.., for queries at positions ``query``.. (``n_queries`` of them) into
        # acc [QT, H, D] and softmax [QT, H, (running max, mass, rescale)], KB keys at a time.
        # Head h = kvh * G + tile * GT + g.
        # The span goes through a small scratch buffer: TVM's code generator substitutes let-bound values
        # into every index it simplifies, and the chain of lets above (task -> run -> page -> piece) grew
        # each of the unrolled loads' indices into an expression that took minutes to simplify.  Loads
        # stop the substitution; LLVM keeps the 6 values in registers all the same.
        span[0] = key_row_expr
        span[1] = value_row_expr
        span[2] = position_expr
        span[3] = count_expr
        span[4] = query_expr
        span[5] = n_queries_expr
        key_row: T.let[T.int64] = span[0]
        value_row: T.let[T.int64] = span[1]
        position: T.let[T.int64] = span[2]
        count: T.let[T.int64] = span[3]
        query: T.let[T.int64] = span[4]
        n_queries: T.let[T.int64] = span[5]
        for blk in T.serial((count + KB - 1) // KB):
            first: T.let[T.int64] = blk * KB
            in_block: T.let[T.int64] = T.min(T.int64(KB), count - first)
            # scores of GT heads x JT keys at a time (a last partial key tile repeats the last key)
            for jt in T.serial((in_block + JT - 1) // JT):
                for kvh in T.serial(HKV):
                    for tile in T.serial(G // GT):
                        for qi in T.serial(n_queries):
                            for g, jj in T.grid(GT, JT):
                                for lane in T.vectorized(LANES):
                                    part[g, jj, lane] = T.float32(0)
                            for c in T.serial(CHUNKS):
                                for g in T.unroll(GT):
                                    for jj in T.unroll(JT):
                                        for lane in T.vectorized(LANES):
                                            part[g, jj, lane] = part[g, jj, lane] + q_scaled[
                                                qi, kvh * G + tile * GT + g, c * LANES + lane] * T.Cast("float32", keys[
                                                    key_row + T.min(first + jt * JT + jj, count - 1), kvh, c * LANES + lane])
                            for g in T.unroll(GT):
                                for jj in T.unroll(JT):
                                    fold_lanes(part, g, jj, LANES // 2)
                                    fold_lanes(part, g, jj, LANES // 4)
                                    fold_lanes(part, g, jj, LANES // 8)
                                    fold_lanes(part, g, jj, LANES // 16)
                                    probs[qi, kvh * G + tile * GT + g, jt * JT + jj] = part[g, jj, 0]
            for qi, h in T.grid(n_queries, H):
                # the block's keys the query sees: [seen_lo, seen_hi); those past the block's end, after the
                # query or before its window weigh 0
                seen_lo: T.let[T.int32] = T.Cast("int32", T.max(query + qi - W + 1 - position - first, T.int64(0)))
                seen_hi: T.let[T.int32] = T.Cast("int32", T.max(T.min(query + qi + 1 - position - first, in_block),
                                                                T.int64(0)))
                for j in T.vectorized(KB):
                    probs[qi, h, j] = T.Select(j >= seen_lo and j < seen_hi, probs[qi, h, j], T.float32(_MASKED))
                softmax[qi, h, 2] = softmax[qi, h, 0]
                for j in T.serial(KB):
                    softmax[qi, h, 0] = T.max(softmax[qi, h, 0], probs[qi, h, j])
                softmax[qi, h, 2] = fast_exp2(softmax[qi, h, 2] - softmax[qi, h, 0])
                softmax[qi, h, 1] = softmax[qi, h, 1] * softmax[qi, h, 2]
                for j in T.vectorized(KB):
                    probs[qi, h, j] = fast_exp2(probs[qi, h, j] - softmax[qi, h, 0])
                for j in T.serial(KB):
                    softmax[qi, h, 1] = softmax[qi, h, 1] + probs[qi, h, j]
            # GT heads x CT chunks of a query's output stay in registers over the block's values
            for kvh in T.serial(HKV):
                for tile in T.serial(G // GT):
                    for cg in T.serial(CHUNKS // CT):
                        for qi in T.serial(n_queries):
                            for g, ct in T.grid(GT, CT):
                                for lane in T.vectorized(LANES):
                                    acc_tile[g, ct, lane] = acc[qi, kvh * G + tile * GT + g, (cg * CT + ct) * LANES + lane] * \
                                        softmax[qi, kvh * G + tile * GT + g, 2]
                            for j in T.serial(in_block):
                                for g in T.unroll(GT):
                                    for ct in T.unroll(CT):
                                        for lane in T.vectorized(LANES):
                                            acc_tile[g, ct, lane] = acc_tile[g, ct, lane] + probs[
                                                qi, kvh * G + tile * GT + g, j] * T.Cast("float32", values[
                                                    value_row + first + j, kvh, (cg * CT + ct) * LANES + lane])
                            for g, ct in T.grid(GT, CT):
                                for lane in T.vectorized(LANES):
                                    acc[qi, kvh * G + tile * GT + g, (cg * CT + ct) * LANES + lane] = acc_tile[g, ct, lane]

    @T.prim_func(private=True, s_tir=True)
    def ring_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_cache: T.handle,
                       var_pages: T.handle, var_starts: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, n, n_pages = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (b, n, H, D), dtype)
        k = T.match_buffer(var_k, (b, n, HKV, D), dtype)
        v = T.match_buffer(var_v, (b, n, HKV, D), dtype)
        cache = T.match_buffer(var_cache, (n_pages, 2, P, HKV, D), dtype)
        pages = T.match_buffer(var_pages, (b, NPT), "int32")
        starts = T.match_buffer(var_starts, (b,), "int32")
        out = T.match_buffer(var_out, (b, n, H, D), dtype)
        # the same memory as rows of [HKV, D]: cache rows of every (page, k/v, page row), chunk rows
        cache_rows = T.decl_buffer((n_pages * 2 * P, HKV, D), dtype, data=cache.data)
        k_rows = T.decl_buffer((b * n, HKV, D), dtype, data=k.data)
        v_rows = T.decl_buffer((b * n, HKV, D), dtype, data=v.data)
        # per (batch row, query tile, run) and query of the tile: unnormalised output, running max and mass
        n_tiles = T.meta_var((n + QT - 1) // QT)
        tile_len = T.meta_var(T.min(n, T.int64(QT)))
        run_out = T.alloc_buffer((b * n_tiles * RUNS, tile_len, H, D), "float32")
        run_softmax = T.alloc_buffer((b * n_tiles * RUNS, tile_len, H, 2), "float32")

        # RUNS task slots per query tile; a tile of r runs gives them to r slots spread evenly over its
        # RUNS (TVM hands each thread a contiguous range of tasks: a short tile still uses every thread)
        for task in T.parallel(b * n_tiles * RUNS):
            with T.sblock("partial"):
                T.reads()
                T.writes()
                # Scratch of one task.  On llvm, TVM puts "global" buffers under 1 KB on the stack, where
                # LLVM keeps the vector tiles (part, acc_tile) in registers; larger buffers and any
                # "local" one come from TVM's workspace allocator (memory LLVM cannot promote).
                q_scaled = T.sblock_alloc_buffer((QT, H, D), "float32")
                acc = T.sblock_alloc_buffer((QT, H, D), "float32")
                probs = T.sblock_alloc_buffer((QT, H, KB), "float32")
                softmax = T.sblock_alloc_buffer((QT, H, 3), "float32")
                part = T.sblock_alloc_buffer((GT, JT, LANES), "float32")
                acc_tile = T.sblock_alloc_buffer((GT, CT, LANES), "float32")
                span = T.sblock_alloc_buffer((6,), "int64")   # attend()'s rows, positions and counts
                # divisions by a runtime value (n_tiles, runs) go through memory, as attend()'s span does
                task_vars = T.sblock_alloc_buffer((4,), "int64")

                task_vars[0] = task // RUNS // n_tiles
                task_vars[1] = task // RUNS % n_tiles * QT
                bi: T.let[T.int64] = task_vars[0]
                first_query: T.let[T.int64] = task_vars[1]
                n_queries: T.let[T.int64] = T.min(T.int64(QT), n - first_query)
                slot_of_tile: T.let[T.int64] = task % RUNS
                start: T.let[T.int64] = T.Cast("int64", starts[bi])
                visible = T.meta_var(tile_runs(starts, bi, first_query, n, W, QT, MIN_RUN, RUNS))
                first_visible: T.let[T.int64] = visible[0]
                n_visible: T.let[T.int64] = visible[1]
                runs: T.let[T.int64] = visible[2]
                run: T.let[T.int64] = slot_of_tile * runs // RUNS
                if slot_of_tile * runs % RUNS < runs:   # the first task slot of its run
                    task_vars[2] = first_visible + run * n_visible // runs
                    task_vars[3] = first_visible + (run + 1) * n_visible // runs
                    run_lo: T.let[T.int64] = task_vars[2]
                    run_hi: T.let[T.int64] = task_vars[3]
                    for qi, h in T.grid(n_queries, H):
                        for d in T.vectorized(D):
                            q_scaled[qi, h, d] = T.Cast("float32", q[bi, first_query + qi, h, d]) * T.float32(scale)
                            acc[qi, h, d] = T.float32(0)
                        softmax[qi, h, 0] = T.float32(_EMPTY)
                        softmax[qi, h, 1] = T.float32(0)
                    # positions before the chunk are in the ring, at rows (position mod W), in pages of P
                    # rows: the run's part there is contiguous within a page.  Piece g covers page
                    # g % NPT of the ring's pass g // NPT (positions (g // NPT) W + (g % NPT) P ..); the
                    # run's pieces are those from its first position's to its last ring position's.
                    ring_hi: T.let[T.int64] = T.min(run_hi, start)
                    piece_first: T.let[T.int64] = run_lo // W * NPT + T.floormod(run_lo, W) // P
                    piece_last: T.let[T.int64] = T.floordiv(ring_hi - 1, W) * NPT + T.floormod(ring_hi - 1, W) // P
                    for piece in T.serial(T.max(piece_last + 1 - piece_first, T.int64(0))):
                        page_start: T.let[T.int64] = (piece_first + piece) // NPT * W + \
                            T.floormod(piece_first + piece, NPT) * P
                        piece_lo: T.let[T.int64] = T.max(run_lo, page_start)
                        piece_hi: T.let[T.int64] = T.min(ring_hi, page_start + T.min(
                            T.int64(P), W - T.floormod(piece_first + piece, NPT) * P))
                        page_row: T.let[T.int64] = T.Cast("int64", pages[bi, T.floormod(piece_first + piece, NPT)]) * 2 * P \
                            + piece_lo - page_start
                        attend(cache_rows, cache_rows, page_row, page_row + P, piece_lo,
                               T.max(piece_hi - piece_lo, T.int64(0)),
                               start + first_query, n_queries, span, q_scaled, acc, probs, softmax, part, acc_tile)
                    # the chunk's own keys
                    chunk_lo: T.let[T.int64] = T.max(run_lo, start)
                    attend(k_rows, v_rows, bi * n + chunk_lo - start, bi * n + chunk_lo - start, chunk_lo,
                           T.max(run_hi - chunk_lo, T.int64(0)), start + first_query, n_queries,
                           span, q_scaled, acc, probs, softmax, part, acc_tile)
                    for qi, h in T.grid(n_queries, H):
                        for d in T.vectorized(D):
                            run_out[task // RUNS * RUNS + run, qi, h, d] = acc[qi, h, d]
                        run_softmax[task // RUNS * RUNS + run, qi, h, 0] = softmax[qi, h, 0]
                        run_softmax[task // RUNS * RUNS + run, qi, h, 1] = softmax[qi, h, 1]

        for task in T.parallel(b * n * H):
            with T.sblock("combine"):
                T.reads()
                T.writes()
                total = T.sblock_alloc_buffer((D,), "float32")
                stat = T.sblock_alloc_buffer((3,), "float32")   # max, mass, the run's weight
                row = T.sblock_alloc_buffer((2,), "int64")   # divisions by n through memory (see span)
                row[0] = task // H // n
                row[1] = task // H % n
                bi: T.let[T.int64] = row[0]
                i: T.let[T.int64] = row[1]
                h: T.let[T.int64] = task % H
                tile_row: T.let[T.int64] = (bi * n_tiles + i // QT) * RUNS   # the tile's first run
                runs: T.let[T.int64] = tile_runs(starts, bi, i // QT * QT, n, W, QT, MIN_RUN, RUNS)[2]
                stat[0] = T.float32(_EMPTY)
                for run in T.serial(runs):
                    stat[0] = T.max(stat[0], run_softmax[tile_row + run, i % QT, h, 0])
                stat[1] = T.float32(0)
                for d in T.vectorized(D):
                    total[d] = T.float32(0)
                for run in T.serial(runs):
                    stat[2] = fast_exp2(run_softmax[tile_row + run, i % QT, h, 0] - stat[0])
                    stat[1] = stat[1] + stat[2] * run_softmax[tile_row + run, i % QT, h, 1]
                    for d in T.vectorized(D):
                        total[d] = total[d] + stat[2] * run_out[tile_row + run, i % QT, h, d]
                for d in T.vectorized(D):
                    out[bi, i, h, d] = T.Cast(dtype, total[d] / stat[1])

    return ring_attrs(ring_attention, window, P)
