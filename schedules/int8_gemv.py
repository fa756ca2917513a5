"""CPU GEMV over quantized weights with int8 activations and integer dot products (decode, batch 1..16).

The float GEMV of :mod:`schedules.dequant_matmul` converts every 4-bit level to float before its
FMA, and on the CPU that unpack, not the memory, bounds it (13% of the read bandwidth on 2 Xeon
vCPUs).  This family does what llama.cpp does with Q8_0/Q8_K activations: the activation rows are
quantized to int8 once per call, per 32-element group ``g`` (``xq = round(x / dx[g])``,
``dx[g] = max|x_g| / 127``), and each group's dot product is an integer one::

    y[b, n] = sum_g  wscale(n, g) * dx[b, g] * (sum_i u(n, 32g+i) * xq[b, 32g+i]  -  z * sum_i xq[b, 32g+i])
                     -  offset(n, g) * sum_i x[b, 32g+i]                                  # Q4_K mins

with ``u`` the weight level as an unsigned byte and ``z`` its zero point (Q4_0: nibble, z = 8;
Q4_K: nibble, z = 0; Q8_0: int8 xor 0x80, z = 128; with a signed-by-signed dot, Q8_0 keeps its int8
and z = 0).  One group of the kernel layout is one 128-bit vector: 4 words of nibbles (Q4) or two
vectors of 4 words of bytes (Q8_0).  Low nibbles (``w & 0x0F0F0F0F``) hold the even elements of
each word, high nibbles the odd ones, so the activations are stored permuted to match: word ``p``
of group ``g`` in ``xq`` holds elements ``32g + 8l + 2j + h`` (``p = 4h + l``, byte ``j``) for Q4,
``32g + 4p + j`` for Q8_0.  The activations are quantized a group at a time in 32-lane vectors.

Several activation rows share each accumulator vector (``slots`` = 1, 2 or 4 rows, :func:`batch_slots`;
more rows run in blocks of 4, the last padded with zero rows): each 4-word chunk of a vector gives
``4 / slots`` lanes to each row of the block, and the block's dot product takes ``slots`` steps, step
``s`` rotating the weight words within their chunk by ``s * 4 / slots`` (one in-lane shuffle) against
activations stored in the matching order.  The lanes of a vector are then converted to float and
accumulated with the group's weight scale times its row's activation scale, less the zero-point and
Q4_K-min terms (per lane, each divided among the row's lanes of the group), once per block instead
of once per row; the lanes of a row are summed at the end.  Per weight vector the weight words are
loaded and unpacked once, and a tile of up to 4 weight rows reads the activations once
(:func:`default_rows_per_tile`).  Q4_K decodes a unit's 8 group scales and 8 mins once per weight
row into one vector, and each weight vector's per-lane scales are shuffles of it.

The dot product instruction comes from the build target's CPU features (:func:`int8_isa`):

* ``vnni``: ``vpdpbusd`` (AVX512-VNNI with AVX512-VL, or AVX-VNNI), u8 x s8 -> 4-way i32 sums;
* ``avx2``: ``vpmaddubsw`` (u8 x s8 -> i16 pairs) + ``vpmaddwd`` by ones; its i16 pair sums would
  saturate for Q8_0's 0..255 levels, so Q8_0 there keeps the float kernel;
* ``dotprod``: AArch64 ``sdot`` (s8 x s8; Q8_0 signed, nibbles are small positive s8);
* ``generic``: the same sums in plain 32-bit integer vector arithmetic (any CPU).

Accuracy: the activation rounding adds about 0.4% relative error per dot product (measured in
tests/test_quant.py); it is therefore an option of the build (``voxc build --int8-activations``,
targets/llvm.py), off by default.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from voxc.errors import VoxcError
from voxc.quant.formats import QType, kernel_layout_shapes

GROUP = 32
# Each thread reads its row tiles' words front to back, 4 interleaved streams of a few KB: the hardware
# prefetchers barely ramp up before a stream ends, so the kernel prefetches the same words 8 rows (two
# tiles) ahead.  On 2 Xeon vCPUs with the weights in DRAM: 1.3-1.65x at one row (the decoder's
# 18432x3072 w1/w3: 5.6 -> 3.4 ms), 1.1-1.5x at the encoder's 4 rows; results bit-identical.
PREFETCH_ROWS = 8
ISAS = ("vnni", "avx2", "dotprod", "generic")


def int8_isa(features) -> str:
    """The integer dot product a target with LLVM CPU ``features`` (e.g. ``{"avx512vnni", ...}``,
    from ``tvm.target.codegen.llvm_get_cpu_features``) gets."""
    f = {str(x).lstrip("+") for x in features}
    if "avxvnni" in f or {"avx512vnni", "avx512vl"} <= f:
        return "vnni"
    if "avx2" in f:
        return "avx2"
    if "dotprod" in f:
        return "dotprod"
    return "generic"


def supports(qtype: QType, isa: str) -> bool:
    """Whether the int8 kernel exists for ``qtype`` on ``isa`` (Q8_0's 0..255 levels overflow
    ``vpmaddubsw``'s 16-bit pair sums)."""
    return not (qtype is QType.Q8_0 and isa == "avx2")


def available(qtype: QType, k: int, isa: str) -> bool:
    """Whether :func:`int8_gemv` covers ``qtype`` with ``k`` input features on ``isa``."""
    return supports(qtype, isa) and vector_words(qtype, isa, k) is not None


def _signed_weights(qtype: QType, isa: str) -> bool:
    return isa == "dotprod"


def _zero_point(qtype: QType, isa: str) -> int:
    if qtype is QType.Q4_0:
        return 8
    if qtype is QType.Q8_0 and not _signed_weights(qtype, isa):
        return 128
    return 0


def dot4(acc, a, b, isa: str):
    """``acc + [sum_j a.byte(4i+j) * b.byte(4i+j)]_i`` for int32 vectors of 4, 8 or 16 lanes:
    ``a``'s bytes unsigned (signed for ``dotprod``), ``b``'s signed."""
    lanes = int(str(acc.ty.dtype).split("x")[1])
    vec = lambda t: f"{t}x{lanes * 4 // (4 if t.endswith('32') else 2 if t.endswith('16') else 1)}"  # noqa: E731
    bits = 32 * lanes
    a8, b8 = tirx.reinterpret(vec("int8"), a), tirx.reinterpret(vec("int8"), b)
    if isa == "vnni":
        # LLVM >= 21 types the byte operands as <N x i8>
        return tirx.call_llvm_pure_intrin(vec("int32"), f"llvm.x86.avx512.vpdpbusd.{bits}", acc, a8, b8)
    if isa == "avx2":
        madd_ub, madd_wd = {128: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
                            256: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")}[bits]
        pairs = tirx.call_llvm_pure_intrin(vec("int16"), madd_ub, a8, b8)
        ones = tirx.Broadcast(tirx.const(1, "int16"), 2 * lanes)
        return acc + tirx.call_llvm_pure_intrin(vec("int32"), madd_wd, pairs, ones)
    if isa == "dotprod":
        return tirx.call_llvm_pure_intrin(vec("int32"), f"llvm.aarch64.neon.sdot.v{lanes}i32.v{4 * lanes}i8", acc, a8, b8)
    if isa != "generic":
        raise VoxcError(f"unknown int8 ISA {isa!r} (have {', '.join(ISAS)})")
    total = acc
    c = lambda v: tirx.Broadcast(tirx.const(v, "int32"), lanes)    # noqa: E731
    for j in range(4):
        ua = (a >> c(8 * j)) & c(255)
        sb = (b << c(24 - 8 * j)) >> c(24)          # arithmetic shift: sign-extended byte j
        total = total + ua * sb
    return total


def vector_words(qtype: QType, isa: str, k: int) -> int | None:
    """Packed words per vector (lanes of int32): 16 (512-bit) with AVX-512, else 8 (AVX2/AVX-VNNI),
    4 (NEON, generic); smaller when ``k`` does not fill a unit of that width; None if none fits."""
    widest = {"vnni": 16, "avx2": 8, "dotprod": 4, "generic": 4}[isa]
    for lanes in (16, 8, 4):
        if lanes <= widest and k % (_unit_groups(qtype, lanes) * GROUP) == 0:
            return lanes
    return None


def _unit_groups(qtype: QType, lanes: int) -> int:
    """Groups per unrolled unit: whole scale words (Q4_0/Q8_0: 2 groups a word; Q4_K: the 8
    sub-blocks of a super-block) and whole vectors, so every lane's scale position is a constant."""
    wpg = 8 if qtype is QType.Q8_0 else 4
    natural = 8 if qtype is QType.Q4_K else 2
    return max(natural, lanes // wpg)


class _LaneScales:
    """Per-lane weight scale (and Q4_K min) vectors of one unit of one row: lane ``l`` of vector ``v``
    belongs to group ``(v * lanes + l) // wpg`` of the unit, a Python constant, so every vector is a
    broadcast scale word shifted by a constant per-lane vector (no gathers).  Q4_K decodes its unit's
    8 scales and 8 mins once, into one 16-lane vector that each vector's lanes are shuffled from."""

    def __init__(self, qtype: QType, scales, row, unit, lanes: int, wpg: int):
        self.qtype, self.scales, self.row, self.unit, self.lanes, self.wpg = qtype, scales, row, unit, lanes, wpg
        self.ugroups = _unit_groups(qtype, lanes)
        if qtype is QType.Q4_K:
            self.decoded = T.bind(self._q4k_scales_and_mins())

    def _groups(self, v):
        return [(v * self.lanes + l) // self.wpg for l in range(self.lanes)]

    def _select(self, words_of_lane):
        """uint32 lanes vector from scale words ``scales[row, idx]``, ``idx`` per lane (Python ints
        relative to the unit's first word)."""
        distinct = sorted(set(words_of_lane))
        base = self.unit * (self.ugroups // 2)
        vec = tirx.Broadcast(self.scales[self.row, base + distinct[-1]], self.lanes)
        lane = tirx.Ramp(tirx.const(0, "int32"), 1, self.lanes)
        for w in reversed(distinct[:-1]):
            last = max(l for l, x in enumerate(words_of_lane) if x == w)   # lanes are sorted by word
            vec = tirx.Select(lane <= tirx.Broadcast(tirx.const(last, "int32"), self.lanes),
                              tirx.Broadcast(self.scales[self.row, base + w], self.lanes), vec)
        return vec

    def _q4k_scales_and_mins(self):
        """float32x16: lanes 0..7 the unit's 8 group scales ``d * sc[j]``, lanes 8..15 its mins
        ``dmin * m[j]`` (ggml's get_scale_min_k4 on the 12 packed bytes, all 16 lanes at once)."""
        words = self.scales[self.row, tirx.Ramp(self.unit * 4, 1, 4)]      # head (d, dmin), 12 bytes

        def byte_bits(byte_of_lane, shift_of_lane, mask_of_lane):
            # (packed byte >> shift) & mask per lane; the packed bytes follow the head word
            picked = tirx.Shuffle([words] * 4, [tirx.const(1 + b // 4, "int32") for b in byte_of_lane])   # (a shuffle makes at most its inputs' lanes)
            return (picked >> _u32v([8 * (b % 4) + sh for b, sh in zip(byte_of_lane, shift_of_lane)])) & _u32v(mask_of_lane)

        low_byte, low_shift, low_mask, high_byte, high_mask = [], [], [], [], []
        for is_min in (False, True):
            for j in range(8):
                if j < 4:             # 6 bits of byte j (scale) or j + 4 (min)
                    low_byte.append(j + 4 if is_min else j), low_shift.append(0), low_mask.append(63)
                    high_byte.append(0), high_mask.append(0)
                else:                 # 4 bits of byte j + 4, the top 2 bits of byte j - 4 (scale) or j (min)
                    low_byte.append(j + 4), low_shift.append(4 if is_min else 0), low_mask.append(15)
                    high_byte.append(j if is_min else j - 4), high_mask.append(3)
        levels = byte_bits(low_byte, low_shift, low_mask) | \
            (byte_bits(high_byte, [6] * 16, high_mask) << _u32v([4] * 16))
        d_dmin = tirx.Cast("float32x2", tirx.reinterpret("float16x2", tirx.Shuffle([words], [tirx.const(0, "int32")])))
        factors = tirx.Shuffle([d_dmin] * 8, [tirx.const(i // 8, "int32") for i in range(16)])
        return factors * tirx.Cast("float32x16", levels)

    def scale(self, v):
        groups = self._groups(v)
        if self.qtype is QType.Q4_K:
            return tirx.Shuffle([self.decoded], [tirx.const(g, "int32") for g in groups])
        words = self._select([g // 2 for g in groups])
        return _half((words >> _u32v([16 * (g % 2) for g in groups])) & _u32v([0xFFFF] * self.lanes), self.lanes)

    def offset(self, v):
        return tirx.Shuffle([self.decoded], [tirx.const(8 + g, "int32") for g in self._groups(v)])


def _reduce(op, vec):
    """``op`` folded over the lanes of ``vec`` (a power of two), halving the vector each step."""
    lanes = vec.ty.lanes if hasattr(vec.ty, "lanes") else int(str(vec.ty.dtype).split("x")[1])
    while lanes > 1:
        lanes //= 2
        vec = op(tirx.Shuffle([vec], [tirx.const(i, "int32") for i in range(lanes)]),
                 tirx.Shuffle([vec], [tirx.const(lanes + i, "int32") for i in range(lanes)]))
    return vec


def _u32v(values):
    lanes = len(values)
    if len(set(values)) == 1:
        return tirx.Broadcast(tirx.const(values[0], "uint32"), lanes)
    return tirx.Shuffle([tirx.const(v, "uint32") for v in values], [tirx.const(i, "int32") for i in range(lanes)])


def _half(bits, lanes: int):
    """f32 lanes of the f16 in the low 16 bits of uint32 lanes ``bits``."""
    return tirx.Cast(f"float32x{lanes}", tirx.reinterpret(f"float16x{lanes}", tirx.Cast(f"uint16x{lanes}", bits)))


def batch_slots(batch: int) -> int:
    """Activation rows that share one accumulator vector (1, 2 or 4; see :func:`int8_gemv`)."""
    return 1 if batch == 1 else 2 if batch == 2 else 4


def default_rows_per_tile(n: int, batch: int, slots: int) -> int:
    """Weight rows per parallel tile (each reads the block's activations once for all of them):
    4 for one block of activation rows, else 2.  Measured on 2 znver5 vCPUs, Q4_K: 4 rows per tile
    beat 1 at 4 activation rows; at 8 and 16, 4 rows spill (0.12 against 0.07 ms at 2048x1280)
    and 1 row re-reads 4 blocks of activations per weight row (16 rows, 9216x3072: 2.3 against
    1.3 ms with 2)."""
    blocks = -(-batch // slots)
    widest = 4 if blocks == 1 else 2
    return next(r for r in (4, 2, 1) if r <= widest and n % r == 0)


def int8_gemv(qtype: QType, n: int, k: int, batch: int, dtype: str, isa: str, name: str = "main",
              slots: int | None = None, rows_per_tile: int | None = None) -> tirx.PrimFunc:
    """PrimFunc ``(x [batch, k], qweight, scales, y [batch, n])`` (the signature of the float GEMV).

    ``slots`` activation rows (1, 2, 4; default :func:`batch_slots`) share each accumulator vector,
    each 4-word lane chunk giving ``4 / slots`` lanes to each row, so that a vector's float work (the
    conversion and scaling by the group's activation and weight scales, the zero point and Q4_K min
    terms) is paid once per ``slots`` rows instead of once per row.  Each of the ``slots`` dot
    product steps then rotates the weight words within their 4-word chunk (one in-lane shuffle),
    and the activations are stored in the matching order.  Rows past ``batch`` (up to a multiple
    of ``slots``) are zeros."""
    qtype = QType.parse(qtype)
    lanes = vector_words(qtype, isa, k)
    if lanes is None or not supports(qtype, isa):
        raise VoxcError(f"no int8 GEMV for {qtype.value} {n}x{k} on {isa}")
    slots = slots or batch_slots(batch)
    if slots not in (1, 2, 4):
        raise VoxcError(f"int8 GEMV: slots must be 1, 2 or 4, got {slots}")
    blocks = -(-batch // slots)                         # accumulator vectors per weight row
    lanes_per_slot = 4 // slots                         # lanes of each 4-word chunk per activation row
    groups = k // GROUP
    wpg = 4 if qtype is not QType.Q8_0 else 8          # packed words per group
    words = k // (8 if qtype is not QType.Q8_0 else 4)
    halves = 2 if qtype is not QType.Q8_0 else 1       # activation words per weight word
    zp = _zero_point(qtype, isa)
    ugroups = _unit_groups(qtype, lanes)
    vectors = ugroups * wpg // lanes                    # vectors per unit
    shapes = kernel_layout_shapes(qtype, n, k)
    rows_per_tile = rows_per_tile or default_rows_per_tile(n, batch, slots)
    F = f"float32x{lanes}"
    i32 = lambda v: tirx.const(v, "int32")            # noqa: E731
    f32 = lambda v: tirx.const(v, "float32")          # noqa: E731
    vlanes = lambda base: tirx.Ramp(base, 1, lanes)    # noqa: E731
    vgroup = lambda g: tirx.Ramp(g * GROUP, 1, GROUP)   # noqa: E731
    G = f"float32x{GROUP}"

    def rotated(vec, step: int):
        """``vec`` with lane ``4c + p`` holding word ``4c + (p + step * lanes_per_slot) % 4``."""
        if step == 0:
            return vec
        order = [4 * (l // 4) + (l % 4 + step * lanes_per_slot) % 4 for l in range(lanes)]
        return tirx.Shuffle([vec], [i32(i) for i in order])

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            x = T.arg("x", T.buffer((batch, k), dtype))
            qweight = T.arg("qweight", T.buffer(shapes["qweight"], "uint32"))
            scales = T.arg("scales", T.buffer(shapes["scales"], "uint32"))
            y = T.arg("y", T.buffer((batch, n), dtype))
            T.func_attr({"tirx.noalias": True})
            # packed int8 per block of ``slots`` rows: per weight vector, ``slots`` steps of ``halves``
            # vectors, lane 4c + p of step s holding the word that the rotated weights put there
            xq = T.alloc_buffer((blocks, words * halves * slots), "int32")
            # per lane of a block: its row's group activation scale, the zero-point term
            # dx * z * sum(xq) and (Q4_K) sum(x), both divided among the row's lanes of the group
            dxe = T.alloc_buffer((blocks, words), "float32")
            corre = T.alloc_buffer((blocks, words), "float32")
            xsume = T.alloc_buffer((blocks, words), "float32")
            lanes_per_row_group = wpg // slots

            # -- quantize the activation rows (and the padding rows, to zeros), one group at a time,
            # in vectors of the group's 32 elements (a scalar loop with local accumulators took 20 us
            # of a 70 us 4-row 2048x1280 call)
            with T.parallel(0, blocks * slots * groups) as bg:
                b, g = bg // groups, bg % groups
                blk, slot = b // slots, b % slots
                if batch % slots == 0:
                    xs = x[b, vgroup(g)].astype(G)
                else:        # a select, not a branch: if_then_else on the vector scalarized the loop
                    xs = tirx.Select(tirx.Broadcast(b < batch, GROUP), x[tirx.min(b, batch - 1), vgroup(g)].astype(G),
                                     tirx.Broadcast(f32(0.0), GROUP))
                xs = T.bind(xs)
                amax = T.bind(_reduce(tirx.max, tirx.abs(xs)))
                inv = tirx.Select(amax > f32(0.0), f32(127.0) / amax, f32(0.0))
                q = T.bind(tirx.Cast(f"int32x{GROUP}", tirx.round(xs * tirx.Broadcast(inv, GROUP))))
                # the group's activation words, bytes in the order the weight words hold their levels
                order = [4 * p + j if qtype is QType.Q8_0 else 8 * (p % 4) + 2 * j + p // 4
                         for p in range(wpg * halves) for j in range(4)]
                packed = T.bind(tirx.reinterpret(f"int32x{GROUP // 4}", tirx.Cast(f"int8x{GROUP}", tirx.Shuffle([q], [i32(e) for e in order]))))
                for p in range(wpg * halves):
                    if qtype is QType.Q8_0:
                        w, h = g * wpg + p, 0
                    else:
                        w, h = g * wpg + p % 4, p // 4
                    chunk_word = w % 4
                    lane = (w % lanes // 4) * 4 + slot * lanes_per_slot + chunk_word % lanes_per_slot
                    step = (chunk_word // lanes_per_slot - slot + slots) % slots
                    dest = ((w // lanes) * slots + step) * halves * lanes + h * lanes + lane
                    T.buffer_store(xq, tirx.Shuffle([packed], [i32(p)]), [blk, dest])
                d = amax / f32(127.0)
                correction = d * tirx.Cast("float32", _reduce(lambda u, v: u + v, q) * i32(zp)) / f32(lanes_per_row_group)
                xsum = _reduce(lambda u, v: u + v, xs) / f32(lanes_per_row_group)
                with T.serial(0, wpg // 4) as chunk:          # this row's lanes of the group
                    with T.serial(0, lanes_per_slot) as i:
                        pos = g * wpg + chunk * 4 + slot * lanes_per_slot + i
                        T.buffer_store(dxe, d, [blk, pos])
                        T.buffer_store(corre, correction, [blk, pos])
                        T.buffer_store(xsume, xsum, [blk, pos])

            # -- the integer GEMV: row tiles in parallel; per unit of groups, vectors of ``lanes`` words
            with T.parallel(0, n // rows_per_tile) as io:
                acc = T.alloc_local((blocks, rows_per_tile, lanes), "float32")
                with T.serial(0, blocks) as blk:
                    with T.serial(0, rows_per_tile) as r:
                        T.buffer_store(acc, tirx.Broadcast(f32(0.0), lanes), [blk, r, vlanes(i32(0))])
                with T.serial(0, groups // ugroups) as unit:
                    with T.unroll(0, rows_per_tile) as r:
                        row = io * rows_per_tile + r
                        lane_scales = _LaneScales(qtype, scales, row, unit, lanes, wpg)
                        for v in range(vectors):
                            w0 = unit * (ugroups * wpg) + v * lanes
                            # one prefetch per vector (a 64-byte line at 16 words); x86 and AArch64
                            ahead = tirx.min(row + PREFETCH_ROWS, n - 1)
                            T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch", tirx.address_of(
                                qweight[ahead, w0]), i32(0), i32(3), i32(1)))
                            wv = qweight[row, vlanes(w0)]
                            if qtype is QType.Q8_0:
                                ops = [wv if _signed_weights(qtype, isa) else wv ^ _u32v([0x80808080] * lanes)]
                            else:
                                mask = _u32v([0x0F0F0F0F] * lanes)
                                ops = [wv & mask, (wv >> _u32v([4] * lanes)) & mask]
                            ops = [tirx.reinterpret(f"int32x{lanes}", o) for o in ops]
                            wscale = lane_scales.scale(v)
                            offset = lane_scales.offset(v) if qtype is QType.Q4_K else None
                            with T.serial(0, blocks) as blk:
                                dot = tirx.Broadcast(i32(0), lanes)
                                for step in range(slots):
                                    for h, op in enumerate(ops):
                                        xbase = w0 * slots * halves + (step * halves + h) * lanes
                                        dot = dot4(dot, rotated(op, step), xq[blk, vlanes(xbase)], isa)
                                t = tirx.Cast(F, dot) * dxe[blk, vlanes(w0)]
                                if zp:        # Q4_K's levels need no zero point (its mins are the offset below)
                                    t = t - corre[blk, vlanes(w0)]
                                total = acc[blk, r, vlanes(i32(0))] + t * wscale
                                if offset is not None:
                                    total = total - offset * xsume[blk, vlanes(w0)]
                                T.buffer_store(acc, total, [blk, r, vlanes(i32(0))])
                with T.serial(0, rows_per_tile) as r:
                    for b in range(batch):           # each row's lanes of its block's accumulators
                        blk, slot = divmod(b, slots)
                        mine = [l for l in range(lanes) if (l % 4) // lanes_per_slot == slot]
                        total = acc[blk, r, mine[0]]
                        for l in mine[1:]:
                            total = total + acc[blk, r, l]
                        T.buffer_store(y, total.astype(dtype), [b, io * rows_per_tile + r])
    return ib.get()
