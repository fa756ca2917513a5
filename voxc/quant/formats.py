"""GGUF block formats Q4_0, Q8_0 and Q4_K: quantize, dequantize, and the word-aligned kernel layout.

Everything here is vectorized numpy over whole tensors.  Two layouts exist for a quantized
``[rows, cols]`` weight (quantization blocks run along ``cols``, the input features):

* **GGUF blocks** (``QuantTensor.data``): ``uint8 [rows, cols / block * block_bytes]``, byte for byte
  what ggml stores.  ``dequantize`` is bit-exact with ``gguf.quants.dequantize`` (same float32
  operation order, no fused multiply-add).

  - Q4_0, 32 elements, 18 bytes: f16 ``d``; 16 bytes of nibbles, low nibble of byte j = element j,
    high nibble = element j + 16; value = (q - 8) * d.
  - Q8_0, 32 elements, 34 bytes: f16 ``d``; 32 int8 ``q``; value = q * d.
  - Q4_K, 256 elements, 144 bytes: f16 ``d``, f16 ``dmin``; 12 bytes holding eight 6-bit scales
    ``sc`` and eight 6-bit mins ``m`` (one per 32-element sub-block); 128 bytes of nibbles in four
    64-element chunks, low nibble of chunk byte l = element l, high nibble = element 32 + l;
    value = (d * sc) * q - (dmin * m).

* **Kernel layout** (``to_kernel_layout``): two ``uint32`` arrays, so that every load a GPU kernel
  makes is a naturally aligned 32-bit (or 128-bit) word and nothing needs f16 or 8-bit types
  (WebGPU on Chrome/NVIDIA has no ``shader-f16`` and WGSL has no 8-bit integers):

  - ``qweight``: Q4_0/Q4_K ``[rows, cols / 8]``, nibble t (bits 4t..4t+3) of word w = element
    8w + t (sequential, so 8 consecutive activations meet one word); Q8_0 ``[rows, cols / 4]``,
    byte t of word w = int8 element 4w + t.
  - ``scales``: ``[rows, ceil(cols / 64)]`` for all three types.  Q4_0/Q8_0: the f16 bits of the
    block scales two to a word (block 2i in the low half, 2i + 1 in the high half; the last high
    half is zero when the block count is odd).  Q4_K: the 16-byte super-block header verbatim as
    four words (word 0 = d | dmin << 16, words 1..3 = the 12 packed scale/min bytes).

  The repacking is a permutation of bits plus zero padding, so ``from_kernel_layout`` restores
  the GGUF bytes exactly; the bits per weight stay 4.5 (Q4_0, Q4_K) and 8.5 (Q8_0).
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from voxc.errors import VoxcError


class QType(str, enum.Enum):
    """Quantized weight types voxc runs natively.  The value is the lower-case GGUF name."""
    Q4_0 = "q4_0"
    Q8_0 = "q8_0"
    Q4_K = "q4_k"

    @classmethod
    def parse(cls, value: "QType | str") -> "QType":
        if isinstance(value, QType):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise VoxcError(f"unknown quantization type {value!r}: voxc supports "
                            f"{', '.join(q.value for q in cls)}") from None

    @property
    def block_size(self) -> int:
        return 256 if self is QType.Q4_K else 32

    @property
    def block_bytes(self) -> int:
        return {QType.Q4_0: 18, QType.Q8_0: 34, QType.Q4_K: 144}[self]

    @property
    def elements_per_word(self) -> int:
        """Weights packed into one uint32 of ``qweight``."""
        return 4 if self is QType.Q8_0 else 8

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    @property
    def ggml_type_id(self) -> int:
        """``GGMLQuantizationType`` value."""
        return {QType.Q4_0: 2, QType.Q8_0: 8, QType.Q4_K: 12}[self]


@dataclasses.dataclass
class QuantTensor:
    """A quantized 2-D weight in GGUF block layout.

    ``shape`` is the logical PyTorch shape ``(rows, cols)`` (``[out, in]`` for a linear);
    ``data`` is ``uint8 [rows, cols / block_size * block_bytes]``.
    """
    qtype: QType
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self):
        self.qtype = QType.parse(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        rows, cols = _check_2d(self.shape, self.qtype)
        want = (rows, cols // self.qtype.block_size * self.qtype.block_bytes)
        if self.data.dtype != np.uint8 or self.data.size != want[0] * want[1]:
            raise VoxcError(f"{self.qtype.value} tensor of shape {self.shape} needs {want[0] * want[1]} bytes "
                            f"(uint8), got {self.data.size} {self.data.dtype}")
        self.data = self.data.reshape(want)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.qtype).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _check_2d(shape, qtype: QType) -> tuple[int, int]:
    if len(shape) != 2:
        raise VoxcError(f"quantized weights must be 2-D [rows, cols], got shape {tuple(shape)}")
    rows, cols = shape
    if cols % qtype.block_size:
        raise VoxcError(f"{qtype.value} needs the row length (input features) to be a multiple of "
                        f"{qtype.block_size}, got shape {tuple(shape)}")
    return rows, cols


# ---- rounding helpers (ggml semantics) ------------------------------------------------------

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: ties away from zero (ggml's Q8_0 reference quantizer)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: the float32 magic-number trick, i.e. round half to even."""
    return np.rint(x).astype(np.int32)


def _f16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


# ---- Q4_0 -----------------------------------------------------------------------------------

def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """ggml ``quantize_row_q4_0_ref``: d = (signed value of largest magnitude) / -8."""
    n = blocks.shape[0]
    imax = np.abs(blocks).argmax(axis=-1)[:, None]
    vmax = np.take_along_axis(blocks, imax, axis=-1)
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.float32).clip(0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16_bits(d).view(np.uint8).reshape(n, 2), packed], axis=1)


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


# ---- Q8_0 -----------------------------------------------------------------------------------

def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """ggml ``quantize_row_q8_0_ref``: d = absmax / 127, q = roundf(x / d)."""
    n = blocks.shape[0]
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(blocks * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bits(d).view(np.uint8).reshape(n, 2), q], axis=1)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


# ---- Q4_K -----------------------------------------------------------------------------------

def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0,
                   rdelta: float = 0.1, nstep: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Weighted asymmetric fit of each row of ``x`` as ``scale * L - min_`` with L in 0..nmax.

    The search of ggml's ``make_qkx2_quants`` (weighted squared error), vectorized over rows:
    start from the min/max fit, then try ``nstep + 1`` stretched grids ``(nmax + rmin + rdelta * i) /
    (max - min)``; for each, solve the weighted least-squares scale and offset for the rounded
    levels and keep whichever has the lowest weighted error.  Returns (scale, min_) with
    min_ >= 0 (the value subtracted).  float32 throughout, like the C code.
    """
    f32 = np.float32
    xmin = np.minimum(x.min(axis=1), f32(0))
    xmax = x.max(axis=1)
    sum_w = w.sum(axis=1, dtype=f32)
    sum_x = (w * x).sum(axis=1, dtype=f32)
    flat = xmax == xmin
    span = np.where(flat, f32(1), xmax - xmin)

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax).astype(f32)
    diff = scale[:, None] * L + xmin[:, None] - x
    best_err = (w * diff * diff).sum(axis=1, dtype=f32)
    best_scale, best_min = scale.copy(), xmin.copy()

    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        L = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax).astype(f32)
        wl = w * L
        sum_l = wl.sum(axis=1, dtype=f32)
        sum_l2 = (wl * L).sum(axis=1, dtype=f32)
        sum_xl = (wl * x).sum(axis=1, dtype=f32)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive_min = this_min > 0     # the offset may only pull values down: refit without it
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(positive_min, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(positive_min, f32(0), this_min)
        diff = this_scale[:, None] * L + this_min[:, None] - x
        err = (w * diff * diff).sum(axis=1, dtype=f32)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, this_scale, best_scale)
        best_min = np.where(better, this_min, best_min)

    best_scale = np.where(flat, f32(0), best_scale)
    return best_scale.astype(f32), (-best_min).astype(f32)


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12-byte ggml packing."""
    n = ls.shape[0]
    out = np.zeros((n, 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    return out


def _unpack_q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12-byte packing -> (scales, mins) uint8 [n, 8] (ggml ``get_scale_min_k4``)."""
    lo, hi, mix = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc, mn


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """ggml ``quantize_row_q4_K_ref``, vectorized over all super-blocks."""
    f32 = np.float32
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    # Importance weights as in ggml: rms of the sub-block plus |x|, so large values fit better.
    rms = np.sqrt((sub * sub).sum(axis=1, dtype=f32) / f32(32))
    scales, mins = _fit_scale_min(sub, rms[:, None] + np.abs(sub))
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    d16 = (max_scale / f32(63)).astype(np.float16)
    dmin16 = (max_min / f32(63)).astype(np.float16)

    # Levels are chosen against the scales as they will be decoded (f16 super-scale * 6-bit).
    d = (d16.astype(f32)[:, None] * ls.astype(f32)).reshape(n, 8, 1)
    dm = (dmin16.astype(f32)[:, None] * lm.astype(f32)).reshape(n, 8, 1)
    x = blocks.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = _nearest_int((x + dm) / np.where(d == 0, f32(1), d))
    L = np.where(d == 0, 0, np.clip(L, 0, 15)).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(n, 128)

    head = np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2),
                           _pack_q4_k_scales(ls, lm)], axis=1)
    return np.concatenate([head, qs], axis=1)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    f32 = np.float32
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(f32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(f32)
    sc, mn = _unpack_q4_k_scales(blocks[:, 4:16])
    scale = (d * sc.astype(f32)).reshape(n, 8, 1)
    offset = (dmin * mn.astype(f32)).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32).astype(f32)
    return (scale * q - offset).reshape(n, 256)


_QUANTIZE = {QType.Q4_0: _quantize_q4_0, QType.Q8_0: _quantize_q8_0, QType.Q4_K: _quantize_q4_k}
_DEQUANTIZE = {QType.Q4_0: _dequantize_q4_0, QType.Q8_0: _dequantize_q8_0, QType.Q4_K: _dequantize_q4_k}
_CHUNK_BLOCKS = 1 << 16     # bounds the temporaries of the Q4_K search (~21 passes over a chunk)


def quantize(x: np.ndarray, qtype: QType | str) -> np.ndarray:
    """float ``[..., K]`` -> GGUF blocks ``uint8 [..., K / block * block_bytes]``."""
    qtype = QType.parse(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % qtype.block_size:
        raise VoxcError(f"{qtype.value} needs the last dimension to be a multiple of {qtype.block_size}, "
                        f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise VoxcError("cannot quantize a tensor holding NaN or infinity")
    blocks = x.reshape(-1, qtype.block_size)
    out = np.empty((blocks.shape[0], qtype.block_bytes), np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = _QUANTIZE[qtype](blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // qtype.block_size * qtype.block_bytes)


def dequantize(data: np.ndarray, qtype: QType | str) -> np.ndarray:
    """GGUF blocks ``uint8 [..., nbytes]`` -> float32 ``[..., K]`` (bit-exact with gguf.quants)."""
    qtype = QType.parse(qtype)
    data = np.ascontiguousarray(data).view(np.uint8)
    if data.ndim == 0 or data.shape[-1] % qtype.block_bytes:
        raise VoxcError(f"{qtype.value} data must be whole blocks of {qtype.block_bytes} bytes, got shape {data.shape}")
    blocks = data.reshape(-1, qtype.block_bytes)
    out = _DEQUANTIZE[qtype](blocks)
    return out.reshape(*data.shape[:-1], data.shape[-1] // qtype.block_bytes * qtype.block_size)


def quantize_tensor(weight: np.ndarray, qtype: QType | str) -> QuantTensor:
    qtype = QType.parse(qtype)
    weight = np.asarray(weight)
    _check_2d(weight.shape, qtype)
    return QuantTensor(qtype, weight.shape, quantize(weight, qtype))


# ---- kernel layout --------------------------------------------------------------------------

_NIBBLE_SHIFTS = (4 * np.arange(8, dtype=np.uint32))


def _nibbles_to_words(nib: np.ndarray) -> np.ndarray:
    """uint8 [rows, K] of 0..15 -> uint32 [rows, K/8], element 8w + t in bits 4t..4t+3 of word w."""
    rows, k = nib.shape
    return np.bitwise_or.reduce(nib.reshape(rows, k // 8, 8).astype(np.uint32) << _NIBBLE_SHIFTS, axis=2)


def _words_to_nibbles(words: np.ndarray) -> np.ndarray:
    rows = words.shape[0]
    return ((words[:, :, None] >> _NIBBLE_SHIFTS) & 15).astype(np.uint8).reshape(rows, -1)


def _pair_halves(halves: np.ndarray) -> np.ndarray:
    """uint16 [rows, n] -> uint32 [rows, ceil(n/2)], element 2i low half, 2i+1 high half."""
    rows, n = halves.shape
    if n % 2:
        halves = np.concatenate([halves, np.zeros((rows, 1), np.uint16)], axis=1)
    return np.ascontiguousarray(halves).view("<u4").astype(np.uint32).reshape(rows, -1)


def _unpair_halves(words: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(words.astype("<u4")).view(np.uint16).reshape(words.shape[0], -1)[:, :n]


def kernel_layout_shapes(qtype: QType | str, rows: int, cols: int) -> dict[str, tuple[int, int]]:
    """Shapes of the ``uint32`` arrays of :func:`to_kernel_layout`."""
    qtype = QType.parse(qtype)
    _check_2d((rows, cols), qtype)
    return {"qweight": (rows, cols // qtype.elements_per_word), "scales": (rows, -(-cols // 64))}


def to_kernel_layout(qt: QuantTensor) -> dict[str, np.ndarray]:
    """GGUF blocks -> ``{"qweight": uint32, "scales": uint32}`` (see the module docstring)."""
    rows, cols = qt.shape
    nb = cols // qt.qtype.block_size
    blocks = qt.data.reshape(rows, nb, qt.qtype.block_bytes)
    if qt.qtype is QType.Q4_0:
        qs = blocks[:, :, 2:]
        nib = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, cols)
        qweight = _nibbles_to_words(nib)
        scales = _pair_halves(blocks[:, :, :2].copy().view(np.uint16).reshape(rows, nb))
    elif qt.qtype is QType.Q8_0:
        qweight = np.ascontiguousarray(blocks[:, :, 2:]).reshape(rows, cols).view("<u4").astype(np.uint32)
        scales = _pair_halves(blocks[:, :, :2].copy().view(np.uint16).reshape(rows, nb))
    else:
        qs = blocks[:, :, 16:].reshape(rows, nb, 4, 1, 32)
        nib = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(rows, cols)
        qweight = _nibbles_to_words(nib)
        scales = np.ascontiguousarray(blocks[:, :, :16]).view("<u4").astype(np.uint32).reshape(rows, nb * 4)
    return {"qweight": np.ascontiguousarray(qweight), "scales": np.ascontiguousarray(scales)}


def from_kernel_layout(params: dict[str, np.ndarray], qtype: QType | str, shape: tuple[int, int]) -> QuantTensor:
    """Inverse of :func:`to_kernel_layout`."""
    qtype = QType.parse(qtype)
    rows, cols = _check_2d(shape, qtype)
    want = kernel_layout_shapes(qtype, rows, cols)
    for key, shp in want.items():
        if key not in params or tuple(params[key].shape) != shp:
            raise VoxcError(f"{qtype.value} kernel layout of a {tuple(shape)} weight needs {key} {shp}, "
                            f"got {None if key not in params else tuple(params[key].shape)}")
    qweight, scales = params["qweight"].astype(np.uint32), params["scales"].astype(np.uint32)
    nb = cols // qtype.block_size
    if qtype is QType.Q4_0:
        nib = _words_to_nibbles(qweight).reshape(rows, nb, 2, 16)
        qs = nib[:, :, 0, :] | (nib[:, :, 1, :] << 4)
        d = _unpair_halves(scales, nb).reshape(rows, nb, 1).view(np.uint8)
        blocks = np.concatenate([d.reshape(rows, nb, 2), qs], axis=2)
    elif qtype is QType.Q8_0:
        qs = qweight.astype("<u4").view(np.uint8).reshape(rows, nb, 32)
        d = _unpair_halves(scales, nb).reshape(rows, nb, 1).view(np.uint8)
        blocks = np.concatenate([d.reshape(rows, nb, 2), qs], axis=2)
    else:
        nib = _words_to_nibbles(qweight).reshape(rows, nb, 4, 2, 32)
        qs = (nib[:, :, :, 0, :] | (nib[:, :, :, 1, :] << 4)).reshape(rows, nb, 128)
        head = scales.astype("<u4").view(np.uint8).reshape(rows, nb, 16)
        blocks = np.concatenate([head, qs], axis=2)
    return QuantTensor(qtype, (rows, cols), np.ascontiguousarray(blocks).reshape(rows, -1))


def dequantize_kernel_layout(params: dict[str, np.ndarray], qtype: QType | str, shape: tuple[int, int]) -> np.ndarray:
    """Reference float32 weights straight from the kernel layout (what the kernels compute)."""
    return from_kernel_layout(params, qtype, shape).dequantize()
