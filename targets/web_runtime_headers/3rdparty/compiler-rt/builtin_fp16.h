/*
 * voxc: minimal stand-in for a header that the apache-tvm wheel does not ship.
 * Generic IEEE-754 binary conversions between formats given by their bit representations:
 *   __extendXfYf2__<SrcT, SrcRepT, SrcSigBits, DstT, DstRepT, DstSigBits>(a)  (narrow -> wide, exact)
 *   __truncXfYf2__<...>(a)                                  (wide -> narrow, round to nearest even)
 * e.g. half -> float is __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>.
 * SrcT/DstT may be the integer representation itself (half has no C++ type here).
 */
#ifndef VOXC_BUILTIN_FP16_H_
#define VOXC_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace voxc_fp {
template <typename RepT, int SigBits>
struct Format {
  static constexpr int kBits = sizeof(RepT) * 8;
  static constexpr int kExpBits = kBits - SigBits - 1;
  static constexpr int kExpMax = (1 << kExpBits) - 1;
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr uint64_t kSigMask = (uint64_t(1) << SigBits) - 1;
  static uint64_t Pack(uint64_t sign, uint64_t exp, uint64_t sig) {
    return (sign << (kBits - 1)) | (exp << SigBits) | sig;
  }
};
template <typename T, typename RepT>
inline RepT ToRep(T a) {
  static_assert(sizeof(T) == sizeof(RepT), "type and representation must have the same size");
  RepT r;
  std::memcpy(&r, &a, sizeof(r));
  return r;
}
template <typename T, typename RepT>
inline T FromRep(RepT r) {
  T a;
  std::memcpy(&a, &r, sizeof(a));
  return a;
}
}  // namespace voxc_fp

template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT, int DstSigBits>
inline DstT __extendXfYf2__(SrcT a) {
  using S = voxc_fp::Format<SrcRepT, SrcSigBits>;
  using D = voxc_fp::Format<DstRepT, DstSigBits>;
  static_assert(DstSigBits >= SrcSigBits && D::kExpBits >= S::kExpBits, "extend must widen");
  const uint64_t x = voxc_fp::ToRep<SrcT, SrcRepT>(a);
  const uint64_t sign = x >> (S::kBits - 1);
  const int exp = static_cast<int>((x >> SrcSigBits) & S::kExpMax);
  uint64_t sig = x & S::kSigMask;
  uint64_t out;
  if (exp == S::kExpMax) {  // inf / nan (nan stays quiet)
    uint64_t dsig = sig << (DstSigBits - SrcSigBits);
    if (sig != 0) dsig |= uint64_t(1) << (DstSigBits - 1);
    out = D::Pack(sign, D::kExpMax, dsig);
  } else if (exp == 0) {
    if (sig == 0) {
      out = D::Pack(sign, 0, 0);
    } else {  // subnormal source: normalize, the wider format represents it exactly
      int e = 1 - S::kBias;
      while ((sig & (uint64_t(1) << SrcSigBits)) == 0) {
        sig <<= 1;
        --e;
      }
      out = D::Pack(sign, e + D::kBias, (sig & S::kSigMask) << (DstSigBits - SrcSigBits));
    }
  } else {
    out = D::Pack(sign, exp - S::kBias + D::kBias, sig << (DstSigBits - SrcSigBits));
  }
  return voxc_fp::FromRep<DstT, DstRepT>(static_cast<DstRepT>(out));
}

template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT, int DstSigBits>
inline DstT __truncXfYf2__(SrcT a) {
  using S = voxc_fp::Format<SrcRepT, SrcSigBits>;
  using D = voxc_fp::Format<DstRepT, DstSigBits>;
  static_assert(SrcSigBits > DstSigBits && S::kExpBits >= D::kExpBits, "trunc must narrow");
  const uint64_t x = voxc_fp::ToRep<SrcT, SrcRepT>(a);
  const uint64_t sign = x >> (S::kBits - 1);
  const int exp = static_cast<int>((x >> SrcSigBits) & S::kExpMax);
  const uint64_t sig = x & S::kSigMask;
  constexpr int kShift = SrcSigBits - DstSigBits;
  uint64_t out;
  if (exp == S::kExpMax) {
    uint64_t dsig = sig >> kShift;
    if (sig != 0) dsig |= uint64_t(1) << (DstSigBits - 1);  // keep nan a (quiet) nan
    out = D::Pack(sign, D::kExpMax, dsig);
  } else if (exp == 0) {
    out = D::Pack(sign, 0, 0);  // source subnormals are far below the narrow format's range
  } else {
    const uint64_t m = sig | (uint64_t(1) << SrcSigBits);
    int dexp = exp - S::kBias + D::kBias;
    // A normal result shifts by kShift; a subnormal one (dexp <= 0) by 1 - dexp more.
    const int shift = dexp >= 1 ? kShift : kShift + 1 - dexp;
    if (dexp >= D::kExpMax) {
      out = D::Pack(sign, D::kExpMax, 0);
    } else if (shift > SrcSigBits + 1) {
      out = D::Pack(sign, 0, 0);  // below half the smallest subnormal
    } else {
      uint64_t keep = m >> shift;
      const uint64_t rem = m & ((uint64_t(1) << shift) - 1);
      const uint64_t half = uint64_t(1) << (shift - 1);
      if (rem > half || (rem == half && (keep & 1))) ++keep;
      if (dexp >= 1) {
        if (keep >> (DstSigBits + 1)) {  // rounding carried into the next binade
          keep >>= 1;
          ++dexp;
        }
        out = dexp >= D::kExpMax ? D::Pack(sign, D::kExpMax, 0)
                                 : D::Pack(sign, dexp, keep & D::kSigMask);
      } else {
        // keep may round up to 1 << DstSigBits, which is exactly the smallest normal's encoding.
        out = D::Pack(sign, 0, keep);
      }
    }
  }
  return voxc_fp::FromRep<DstT, DstRepT>(static_cast<DstRepT>(out));
}

#endif  // VOXC_BUILTIN_FP16_H_
