"""f16 -> f32 from integer bits, shared by the dequant kernels (schedules/dequant_matmul.py's TE
schedules and schedules/gpu_gemv.py's hand-written GEMV, which dequant_matmul imports).

The quantized layouts keep their f16 scales packed two to a uint32 word (voxc.quant.formats), so
every kernel turns 16 bits into an f32.  Where f16 exists (llvm, cuda) that is a reinterpret and a
cast; WGSL has neither a 16-bit integer type nor, without ``shader-f16`` (which Chrome on Linux and
SwiftShader lack), an f16 type, so there it is built from integer ops and ``bitcast<f32>``.
"""
from __future__ import annotations

from tvm import tirx

F32 = "float32"


def _u32(v: int):
    return tirx.const(v, "uint32")


def _f32(v: float):
    return tirx.const(v, F32)


def half_to_f32(h, target: str):
    """f32 value of the f16 whose bits are the low 16 bits of the uint32 expression ``h`` (the
    caller masks off the high bits).  ``target`` is a target kind name: "webgpu" gets the
    integer-op form, exact for normal and subnormal halves (infinities and NaNs, which no quantizer
    writes as a scale, come out as large finite values)."""
    if target != "webgpu":
        return tirx.Cast(F32, tirx.reinterpret("float16", tirx.Cast("uint16", h)))
    # Build the f32 bits.  Normal halves: re-bias the exponent (15 -> 127) by adding 112 << 23 to the
    # shifted magnitude; subnormals (exponent 0) are mant * 2^-24, done in float so that no f32
    # denormal (which GPUs may flush) ever appears.
    magnitude = (h & _u32(0x7FFF)) << _u32(13)
    normal = tirx.reinterpret(F32, ((h & _u32(0x8000)) << _u32(16)) | (magnitude + _u32(112 << 23)))
    sign = tirx.Select((h & _u32(0x8000)) != _u32(0), _f32(-1.0), _f32(1.0))
    subnormal = tirx.Cast(F32, h & _u32(0x3FF)) * _f32(2.0 ** -24) * sign
    return tirx.Select((h & _u32(0x7C00)) == _u32(0), subnormal, normal)
