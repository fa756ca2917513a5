"""Hand-written GPU GEMV (CUDA and WebGPU) over the quantized kernel layout: 1..8 activation rows,
each weight read once.

``y[b, n] = sum_k x[b, k] * W[n, k]`` for Q4_0 / Q4_K / Q8_0 ``W`` in the layout of
:mod:`voxc.quant.formats`, with float32 accumulation whatever the activation dtype.  One kernel
family for both targets (``target="cuda"`` or ``"webgpu"``): the same units, lane groups, rows per
thread and steps in flight, differing only where WGSL must (last bullet).

Why not the TE schedule of :mod:`schedules.dequant_matmul` (which still serves 9..16 rows): that
schedule gave each 32-element group four threads, each loading one 32-bit word and each decoding
the group's scale (Q4_K's 6-bit sub-scale select costs ~30 integer ops, paid once per 8 weights),
and it measured 7-29% of the copy bandwidth at the decoder's shapes on an H100; its multi-row form
ran about 11x slower than one row.  Here:

* A *unit* is 64 weights of one row, loaded as 128-bit words: Q4_0 groups ``2u, 2u+1`` (contiguous,
  one scale word); Q4_K sub-blocks ``j`` and ``j+4`` of one super-block, so which branch of ggml's
  ``get_scale_min_k4`` applies is fixed per half at compile time and both halves decode their
  6-bit scale and min from the super-block's 16-byte header, loaded once; Q8_0 one 32-element group
  (also 2 x 128 bits).  An odd number of Q4_0 groups falls back to one group per unit.
* A warp splits into ``32 / L`` lane groups of ``L`` lanes (``L`` = ``lanes_per_row``, 32 by default,
  down to 4), each on ``R`` rows of its own; lane ``x`` of a group takes units ``x, x+L, ...`` of them.
  With 32 lanes a 3072-wide Q4_K row (48 units) leaves a quarter of the lanes idle in its second
  step and a 1280-wide one (the encoder's: 20 units) 12 of 32 lanes idle throughout; fewer lanes per
  row fill them but also put fewer bytes in flight at once on a narrow matrix, so which wins is for
  bench/quant_gpu.py's variants to measure (``lanes_for`` gives the count that idles fewest).  All ``R`` units' words are
  loaded before any arithmetic (``R x 32`` bytes in flight per thread), and every activation the
  thread loads serves its ``R`` rows; warps on ``threadIdx.y`` take further rows.  A group's ``L``
  partial sums of each (row, activation row) meet in a warp-shuffle reduction.
* Per group ``g`` the math is factored as in dequant_matmul: ``sum_i x_i * level_i`` once per
  element, then ``scale_g * part - offset_g * sum_i x_i`` (the offset only for Q4_K).  Levels become
  floats by the exponent trick (``bits | 0x4B000000`` minus ``2^23``): integer-to-float conversion
  runs at a quarter rate on NVIDIA.
* ``max_rows`` activation rows are unrolled into registers.  With ``symbolic_rows`` the row count
  is a variable ``m`` (rows past ``m`` read zeros and are not stored), so one kernel serves, e.g.,
  the 3- and 4-row calls that a symbolic-shape entry makes; ``blockIdx.y`` takes chunks of
  ``max_rows`` rows, so ``m`` may exceed ``max_rows`` (each chunk reads the weights again: for a
  few chunks that still beats a tiled GEMM whose 64-row tiles are mostly empty).
* WebGPU (``target="webgpu"``, the browser bundle and the vulkan/metal targets' WGSL): no warp
  shuffles (TVM's WGSL has no subgroup operations we can rely on, and Chrome on Linux offers
  subgroups only sometimes), so each lane writes its ``R x B`` partial sums to workgroup memory and,
  after one barrier, lane ``x`` of a group adds the group's ``L`` values of outputs ``x, x+L, ...``
  and stores them (one barrier where a tree would take ``log2 L``; at most 4 KiB of the 16 KiB every
  adapter grants, 128 invocations of the 256).  The f16 scales are decoded with integer ops and
  ``bitcast<f32>`` (:func:`schedules.float_bits.half_to_f32`), so float32 activations need no
  ``shader-f16``; float16 activations (q4f16 on native adapters that have it) load as f16.  WGSL
  vectors stop at 4 lanes, so a 128-bit word is a ``vec4<u32>`` that TVM assembles from four u32
  reads of the ``array<u32>`` binding, and f16 activations load 4 at a time.  Layouts keep the grid
  within 65535 workgroups: tvmjs folds a larger ``blockIdx.x`` into z, but the guard TVM's WGSL puts
  on the padding (``> packGridDimX``, not ``>=``) lets one extra workgroup run when the fold is
  uneven; a row count with no such layout (odd, past 65535) keeps the TE schedule (:func:`supports`).

Entry point :func:`gpu_gemv`; :func:`gemv_layout` gives the launch layout (checked by tests on the
host, as launch limits are).
"""
from __future__ import annotations

import dataclasses

from tvm import tirx

from schedules import pin_source
from schedules.float_bits import half_to_f32
from voxc.errors import VoxcError
from voxc.quant.formats import QType, kernel_layout_shapes

pin_source(__name__)

GROUP = 32
UNIT = 64                 # weights of one row a lane handles per step (Q8_0: 32)
WARP = 32
MAX_ROWS = 8              # activation rows held in registers (beyond: dequant_matmul's kernels)
MAGIC = 0x4B000000        # float bits of 2^23: OR-ing a small integer into the mantissa gives 2^23 + v


MAX_K_SPLITS = 8          # warps sharing one row (threadIdx.z): the block stays within 1024 threads
LANE_GROUPS = (32, 16, 8, 4)   # lanes per weight row a warp may use (powers of two: the shuffle tree)
TARGETS = ("cuda", "webgpu")
# WebGPU's default limits (what every adapter grants): invocations and workgroup storage per
# workgroup, workgroups per grid dimension (tvmjs folds a larger blockIdx.x into z, but TVM's WGSL
# lets the first padding workgroup of an uneven fold run, so the layouts stay within it)
WEBGPU_MAX_INVOCATIONS = 256
CUDA_MAX_THREADS = 1024
WEBGPU_MAX_WORKGROUP_STORAGE = 16 << 10
WEBGPU_MAX_WORKGROUPS = 65535


@dataclasses.dataclass(frozen=True)
class GemvLayout:
    groups_per_unit: int      # 32-element groups per unit (1 or 2)
    words_per_group: int      # uint32 words of one group (Q4: 4, Q8: 8)
    units: int                # units per weight row
    steps: int                # units a lane visits per row (ceil(units / lanes_per_row))
    rows_per_thread: int      # weight rows each thread accumulates (R)
    warps: int                # warps per block (threadIdx.y)
    blocks: int
    lanes_per_row: int = WARP  # lanes sharing one row's units (L); a warp holds 32 / L lane groups
    k_splits: int = 1          # warps (threadIdx.z) sharing the same rows, each on every S-th lane step

    @property
    def rows_per_warp(self) -> int:
        return self.rows_per_thread * (WARP // self.lanes_per_row)

    @property
    def threads(self) -> tuple[int, int, int]:
        return (WARP, self.warps, self.k_splits)


def lanes_for(units: int) -> int:
    """Lanes per row that leave the fewest lane-steps idle (the most lanes among equals)."""
    return min(LANE_GROUPS, key=lambda lanes: (-(-units // lanes) * lanes, -lanes))


# Split-K by default for Q4_K on CUDA below this many weight rows (the LM head's 131072 rows fill the GPU
# without it: measured the same or slower there)
SPLIT_K_MAX_N = 65536


def split_k_default(units: int) -> tuple[int, int]:
    """(lanes per row, k_splits) for a row of ``units`` on CUDA at 1-4 activation rows, from the sweep on
    an H100 (bench/RESULTS.md, sixteenth run; one warp of rows per block, two rows per thread): the
    fastest layouts gave each row a lane count that divides its units, so every thread runs the same
    few independent loads: 48 lanes (16 x 3 splits) at 48 and 144 units (K 3072, 9216: decoder
    GEMVs 8-21% faster), 64 (32 x 2) at 64 units (K 4096), 32 lanes at up to 32 units (as before);
    otherwise 32 lanes and enough splits (at most 4) for about one step (K 5120: 27% faster)."""
    if units % 48 == 0:
        return 16, 3
    if units % 64 == 0:
        return 32, 2
    return WARP, max(1, min(4, -(-units // WARP)))


def gemv_layout(qtype: QType | str, n: int, k: int, max_rows: int = 1,
                rows_per_thread: int | None = None, warps: int | None = None,
                lanes_per_row: int | None = None, target: str = "cuda", k_splits: int | None = None) -> GemvLayout:
    """The launch layout of :func:`gpu_gemv` for an ``[n, k]`` weight (any valid shape on CUDA; on
    WebGPU a VoxcError where even the largest row blocks leave over 65535 workgroups, see
    :func:`supports`).  ``k_splits`` warps share each row (split-K within a block): a row's units are
    dealt to ``lanes_per_row x k_splits`` lanes, so each thread has fewer steps, that is fewer
    dependent rounds of memory latency, at the cost of one shared-memory reduction."""
    qtype = QType.parse(qtype)
    if target not in TARGETS:
        raise VoxcError(f"gpu_gemv: no kernel for target {target!r} (have {', '.join(TARGETS)})")
    if k % qtype.block_size or n < 1:
        raise VoxcError(f"gpu_gemv: a {n}x{k} {qtype.value} weight needs k a multiple of {qtype.block_size}")
    if not 1 <= max_rows <= MAX_ROWS:
        raise VoxcError(f"gpu_gemv: 1..{MAX_ROWS} activation rows, got {max_rows}")
    groups = k // GROUP
    if qtype is QType.Q4_K:
        per_unit = 2
    elif qtype is QType.Q4_0:
        per_unit = 2 if groups % 2 == 0 else 1
    else:
        per_unit = 1
    units = groups // per_unit
    if rows_per_thread is None:
        # two rows halve the activation loads per weight; with 8 activation rows the registers
        # (8 x 8 activations, 2 x 8 x 2 sums) would cut the number of resident warps instead
        rows_per_thread = 2 if max_rows <= 4 else 1
    if (lanes_per_row, warps, k_splits) == (None, None, None) and target == "cuda" and qtype is QType.Q4_K \
            and max_rows <= 4 and n < SPLIT_K_MAX_N:
        lanes, splits = split_k_default(units)
        if splits > 1:   # measured with one warp of rows per block; one split keeps the layout below
            lanes_per_row, k_splits, warps = lanes, splits, 1
    if lanes_per_row is None:
        # Measured on an H100 (bench/RESULTS.md, fifth run): 16 lanes on a 3072-wide row (48 units)
        # took the LM head (131072 rows) from 58% to 75% of copy bandwidth and a 9216-row w1/w3 from
        # 43% to 47%, but cost a third on 3072-row matrices, whose fewer threads then hide less latency
        # (WebGPU takes the same defaults: not measured in a browser or through wgpu yet)
        lanes_per_row = 16 if units % WARP == 16 and n >= 8192 else WARP
    if lanes_per_row not in LANE_GROUPS:
        raise VoxcError(f"gpu_gemv: lanes_per_row must be one of {LANE_GROUPS}, got {lanes_per_row}")
    k_splits = 1 if k_splits is None else int(k_splits)
    if not 1 <= k_splits <= MAX_K_SPLITS:
        raise VoxcError(f"gpu_gemv: k_splits must be 1..{MAX_K_SPLITS}, got {k_splits}")
    # every lane group of every warp of every block owns whole rows: fall back to fewer rows per
    # thread, more lanes per row, fewer warps until the row count divides (any n: 32 lanes, 1 row);
    # WebGPU also keeps the grid within 65535 workgroups
    max_blocks = WEBGPU_MAX_WORKGROUPS if target == "webgpu" else n
    found = next(((r, lanes, w) for r in dict.fromkeys((rows_per_thread, 1))
                  for lanes in sorted(LANE_GROUPS) if lanes >= lanes_per_row
                  for w in (warps or 4, 4, 2, 1) if w <= (warps or 4)
                  and n % (r * (WARP // lanes) * w) == 0 and n // (r * (WARP // lanes) * w) <= max_blocks), None)
    if found is None:
        raise VoxcError(f"gpu_gemv: no {target} layout of {n} rows within {max_blocks} workgroups")
    r, lanes, w = found
    max_threads = WEBGPU_MAX_INVOCATIONS if target == "webgpu" else CUDA_MAX_THREADS
    if WARP * w * k_splits > max_threads:
        raise VoxcError(f"gpu_gemv: {w} warps x {k_splits} k-splits exceed {max_threads} {target} threads a block")
    return GemvLayout(per_unit, 8 if qtype is QType.Q8_0 else 4, units, -(-units // (lanes * k_splits)), r, w,
                      n // (r * (WARP // lanes) * w), lanes, k_splits)


def _level(word, e, qtype: QType):
    """Element ``e`` of a packed word as float: Q4_0 q - 8, Q4_K q, Q8_0 the signed byte."""
    u32 = lambda v: tirx.const(v, "uint32")   # noqa: E731
    if qtype is QType.Q8_0:
        byte = ((word >> tirx.Cast("uint32", e * 8)) & u32(255)) ^ u32(128)   # two's complement -> +128
        return tirx.reinterpret("float32", byte | u32(MAGIC)) - tirx.const(2.0 ** 23 + 128, "float32")
    nibble = (word >> tirx.Cast("uint32", e * 4)) & u32(15)
    offset = 8 if qtype is QType.Q4_0 else 0
    return tirx.reinterpret("float32", nibble | u32(MAGIC)) - tirx.const(2.0 ** 23 + offset, "float32")


def supports(qtype: QType | str, n: int, k: int, max_rows: int, target: str) -> bool:
    """Whether :func:`gpu_gemv` has a layout for this call (always on CUDA; on WebGPU unless an odd
    row count past 65535 leaves too many workgroups)."""
    try:
        gemv_layout(qtype, n, k, max_rows, target=target)
    except VoxcError:
        return False
    return True


def _half(bits, target: str):
    """f32 value of the f16 in the low 16 bits of a uint32 expression (WGSL: integer ops, no f16)."""
    return half_to_f32(bits & tirx.const(0xFFFF, "uint32"), target)


def _small(v):
    """float(v) for a uint32 v < 2^16 (exponent trick)."""
    return tirx.reinterpret("float32", v | tirx.const(MAGIC, "uint32")) - tirx.const(2.0 ** 23, "float32")


def gpu_gemv(qtype: QType | str, n: int, k: int, max_rows: int, dtype: str = "float32", *,
             symbolic_rows: bool = False, rows_per_thread: int | None = None,
             warps: int | None = None, lanes_per_row: int | None = None,
             steps_in_flight: int | None = None, k_splits: int | None = None,
             target: str = "cuda") -> tirx.PrimFunc:
    """PrimFunc ``(x [rows, k], qweight, scales, y [rows, n])``; ``rows`` is ``max_rows`` or, with
    ``symbolic_rows``, an int32 variable ``m`` (any count: ``ceil(m / max_rows)`` row chunks).
    ``target``: "cuda" (warp-shuffle reduction) or "webgpu" (WGSL: workgroup-memory reduction, f16
    scales decoded with integer ops, at most 4-wide vectors).
    ``steps_in_flight``: a thread issues the loads of that many of its steps before the arithmetic
    of the first (more bytes in flight per thread, more registers).  By default 2 for one activation
    row (on an H100 within 1% or faster at every unstacked decoder, encoder and adapter shape: 14% on
    1280x5120, 27% on 1024x3072) and 1 for more rows, whose activations already fill the registers.
    ``k_splits``: see :func:`gemv_layout`."""
    from tvm.script import tirx as T

    qtype = QType.parse(qtype)
    lay = gemv_layout(qtype, n, k, max_rows, rows_per_thread, warps, lanes_per_row, target, k_splits)
    GU, WPG, U, STEPS, R, TY, L, S = (lay.groups_per_unit, lay.words_per_group, lay.units, lay.steps,
                                      lay.rows_per_thread, lay.warps, lay.lanes_per_row, lay.k_splits)
    GROUPS_PER_WARP = WARP // L
    if steps_in_flight is None:
        steps_in_flight = 2 if max_rows == 1 else 1
    P = max(1, min(int(steps_in_flight), STEPS))
    CHUNKS_OF_STEPS = -(-STEPS // P)
    B = max_rows
    EPW = qtype.elements_per_word
    WEBGPU = target == "webgpu"
    # activations per vector load: 128 bits on CUDA; WGSL's widest vector is vec4 (64 bits of f16)
    LV = min(EPW, 4 if WEBGPU else 16 // (2 if dtype == "float16" else 4))
    # WebGPU: one float per (row, activation row) of every invocation in workgroup memory
    RED = R * B * TY * WARP * S
    OUTPUT_STEPS = -(-(R * B) // L)          # outputs each lane of a group finishes (WebGPU)
    if WEBGPU and (WARP * TY * S > WEBGPU_MAX_INVOCATIONS or RED * 4 > WEBGPU_MAX_WORKGROUP_STORAGE):
        raise VoxcError(f"gpu_gemv: {WARP * TY * S} invocations and {RED * 4} B of workgroup memory exceed "
                        f"WebGPU's defaults ({WEBGPU_MAX_INVOCATIONS}, {WEBGPU_MAX_WORKGROUP_STORAGE} B)")
    # CUDA with k_splits: each lane group's first lane leaves its R x B sums for the z == 0 warp
    KRED = S * TY * GROUPS_PER_WARP * R * B
    shapes = kernel_layout_shapes(qtype, n, k)
    QK = qtype is QType.Q4_K
    PAIRED = qtype is QType.Q4_0 and GU == 2                     # one scale word holds both halves
    PARTIAL = U % (L * S) != 0 or STEPS % P != 0      # some (lane, step) pairs have no unit
    rows = tirx.Var("m", "int32") if symbolic_rows else B
    MASK_ROWS = bool(symbolic_rows)
    CHUNKS = (rows + B - 1) // B if symbolic_rows else 1

    def group_of(u, h):
        if QK:
            return (u // 4) * 8 + u % 4 + 4 * h
        return u * GU + h

    def scale_of(hdr, sw, r, u, h):
        """(scale, offset) of group (u, h) of row r from the loaded scale words."""
        if QK:
            shift = tirx.Cast("uint32", (u % 4) * 8)
            b0 = (hdr[r * 4 + 1] >> shift) & tirx.const(255, "uint32")
            b4 = (hdr[r * 4 + 2] >> shift) & tirx.const(255, "uint32")
            b8 = (hdr[r * 4 + 3] >> shift) & tirx.const(255, "uint32")
            c6, c15, c4 = (tirx.const(v, "uint32") for v in (63, 15, 4))
            six = tirx.const(6, "uint32")
            sc = tirx.Select(h == 0, b0 & c6, (b8 & c15) | ((b0 >> six) << c4))
            mn = tirx.Select(h == 0, b4 & c6, (b8 >> c4) | ((b4 >> six) << c4))
            d = _half(hdr[r * 4], target)
            dmin = _half(hdr[r * 4] >> tirx.const(16, "uint32"), target)
            return d * _small(sc), dmin * _small(mn)
        if PAIRED:
            half_index = h
        else:
            half_index = group_of(u, h) % 2
        bits = sw[r] >> tirx.Cast("uint32", half_index * 16)
        return _half(bits, target), tirx.const(0.0, "float32")

    @T.prim_func(private=True, s_tir=True)
    def gemv(var_x: T.handle, var_qweight: T.handle, var_scales: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(var_x, (rows, k), dtype)
        qweight = T.match_buffer(var_qweight, shapes["qweight"], "uint32")
        scales = T.match_buffer(var_scales, shapes["scales"], "uint32")
        y = T.match_buffer(var_y, (rows, n), dtype)
        for by in T.thread_binding(CHUNKS, thread="blockIdx.y"):
          for bx in T.thread_binding(lay.blocks, thread="blockIdx.x"):
            for tz in T.thread_binding(S, thread="threadIdx.z"):
              for ty in T.thread_binding(TY, thread="threadIdx.y"):
                for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        sums = T.sblock_alloc_buffer((R * B,), "float32", scope="local")
                        part = T.sblock_alloc_buffer((R * B,), "float32", scope="local")
                        xsum = T.sblock_alloc_buffer((B,), "float32", scope="local")
                        xh = T.sblock_alloc_buffer((B * EPW,), dtype, scope="local")
                        words = T.sblock_alloc_buffer((P * R * GU * WPG,), "uint32", scope="local")
                        hdr = T.sblock_alloc_buffer((P * R * 4,), "uint32", scope="local")
                        sw = T.sblock_alloc_buffer((P * R,), "uint32", scope="local")
                        sc = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        off = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        row0: T.let[T.int32] = ((bx * TY + ty) * GROUPS_PER_WARP + tx // L) * R
                        for i in T.unroll(R * B):
                            sums[i] = T.float32(0)
                        for chunk in T.serial(CHUNKS_OF_STEPS):
                            # every load of the chunk's P steps first: P x R x 32 B per thread in flight
                            for s in T.unroll(P):
                                u: T.let[T.int32] = ((chunk * P + s) * S + tz) * L + tx % L
                                if not PARTIAL or u < U:
                                    for r in T.unroll(R):
                                        for h in T.unroll(GU):
                                            for c in T.unroll(WPG // 4):
                                                for v in T.vectorized(4):
                                                    words[((s * R + r) * GU + h) * WPG + c * 4 + v] = qweight[
                                                        row0 + r, group_of(u, h) * WPG + c * 4 + v]
                                        if QK:
                                            for v in T.vectorized(4):
                                                hdr[(s * R + r) * 4 + v] = scales[row0 + r, (u // 4) * 4 + v]
                                        else:
                                            sw[s * R + r] = scales[row0 + r, group_of(u, 0) // 2]
                            for s in T.unroll(P):
                                u: T.let[T.int32] = ((chunk * P + s) * S + tz) * L + tx % L
                                if not PARTIAL or u < U:
                                    for h in T.unroll(GU):
                                        for r in T.unroll(R):
                                            sc[r] = scale_of(hdr, sw, s * R + r, u, h)[0]
                                            off[r] = scale_of(hdr, sw, s * R + r, u, h)[1]
                                        for i in T.unroll(R * B):
                                            part[i] = T.float32(0)
                                        for b in T.unroll(B):
                                            xsum[b] = T.float32(0)
                                        for w in T.unroll(WPG):
                                            for b in T.unroll(B):
                                                if not MASK_ROWS or by * B + b < rows:
                                                    for c in T.unroll(EPW // LV):
                                                        for v in T.vectorized(LV):
                                                            xh[b * EPW + c * LV + v] = x[
                                                                by * B + b, group_of(u, h) * GROUP + w * EPW + c * LV + v]
                                                else:
                                                    for e in T.unroll(EPW):
                                                        xh[b * EPW + e] = T.Cast(dtype, 0)
                                            if QK:
                                                for b in T.unroll(B):
                                                    for e in T.unroll(EPW):
                                                        xsum[b] = xsum[b] + T.Cast("float32", xh[b * EPW + e])
                                            for r in T.unroll(R):
                                                for e in T.unroll(EPW):
                                                    for b in T.unroll(B):
                                                        part[r * B + b] = part[r * B + b] + _level(
                                                            words[((s * R + r) * GU + h) * WPG + w], e, qtype) * T.Cast(
                                                            "float32", xh[b * EPW + e])
                                        for r in T.unroll(R):
                                            for b in T.unroll(B):
                                                if QK:
                                                    sums[r * B + b] = sums[r * B + b] + sc[r] * part[r * B + b] - off[r] * xsum[b]
                                                else:
                                                    sums[r * B + b] = sums[r * B + b] + sc[r] * part[r * B + b]
                        if WEBGPU:
                            # WGSL has no subgroup operations we can count on: every lane puts its R x B
                            # partial sums in workgroup memory, one barrier (reached by every invocation:
                            # uniform control flow), then lane x of a group adds up the group's L values
                            # of outputs x, x + L, ... and stores them.  One barrier instead of a tree's
                            # log2(L); the L reads per output are independent loads.  Slots are
                            # thread-major, so at each of the L reads the lanes finishing different
                            # outputs read adjacent words.
                            red = T.sblock_alloc_buffer((RED,), "float32", scope="shared")
                            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            for i in T.unroll(R * B):
                                red[((tz * TY + ty) * WARP + tx) * (R * B) + i] = sums[i]
                            T.tvm_storage_sync("shared")
                            for q in T.unroll(OUTPUT_STEPS):
                                o: T.let[T.int32] = q * L + tx % L          # (row, activation row) o // B, o % B
                                if tz == 0 and o < R * B and (not MASK_ROWS or by * B + o % B < rows):
                                    total[0] = T.float32(0)
                                    for z in T.unroll(S):
                                        for lane in T.unroll(L):
                                            total[0] = total[0] + red[
                                                ((z * TY + ty) * WARP + tx - tx % L + lane) * (R * B) + o]
                                    y[by * B + o % B, row0 + o // B] = T.Cast(dtype, total[0])
                        else:
                            for r in T.unroll(R):
                                for b in T.unroll(B):
                                    # shuffle tree L/2, ..., 1: a group's first lane ends with the sums of
                                    # its L lanes (what other lanes pick up across groups is never stored)
                                    for j in T.unroll(L.bit_length() - 1):
                                        sums[r * B + b] = sums[r * B + b] + T.tvm_warp_shuffle_down(
                                            T.uint32(0xFFFFFFFF), sums[r * B + b], (L // 2) >> j, WARP, WARP)
                            if S > 1:
                                # the k-splits' sums meet in shared memory; the z == 0 warp adds and stores
                                kred = T.sblock_alloc_buffer((KRED,), "float32", scope="shared")
                                if tx % L == 0:
                                    for i in T.unroll(R * B):
                                        kred[((tz * TY + ty) * GROUPS_PER_WARP + tx // L) * (R * B) + i] = sums[i]
                                T.tvm_storage_sync("shared")
                                if tz == 0 and tx % L == 0:
                                    for i in T.unroll(R * B):
                                        sums[i] = T.float32(0)
                                        for z in T.unroll(S):
                                            sums[i] = sums[i] + kred[((z * TY + ty) * GROUPS_PER_WARP + tx // L) * (R * B) + i]
                            for r in T.unroll(R):
                                for b in T.unroll(B):
                                    if (S == 1 or tz == 0) and tx % L == 0 and (not MASK_ROWS or by * B + b < rows):
                                        y[by * B + b, row0 + r] = T.Cast(dtype, sums[r * B + b])

    return gemv
