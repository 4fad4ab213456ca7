// Branch-free fp32 exp for element loops that must vectorise (libm's expf is a call per element
// that GCC does not vectorise without -ffast-math). Shared by SwiGLU, cross-entropy and attention.
#pragma once
#include <cstdint>

#include "common/bits.h"

#ifndef MMFUSE_ISA_NS
#error "common/fast_exp.h belongs to kernel sources compiled per ISA (MMFUSE_ISA_NS)"
#endif

namespace mmfuse {
namespace MMFUSE_ISA_NS {

// exp(x) for x in [-104, 0], branch-free so that it vectorises. Cephes expf: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two so n * C1 is exact), e^r by a degree-7 polynomial, then the
// scale 2^n, applied as two factors 2^(n/2) so that results down to the smallest subnormal
// (n >= -150) come out without an out-of-range exponent. Below -104 fp32 e^x rounds to 0.
// Error <= 1.02 ulp against the float64 exp over every fp32 in [-104, 0] (exhaustive check with
// GCC 12, generic/AVX2/AVX-512 flavours); the resulting sigmoid is within 2e-7 relative.
inline float exp_nonpositive(float x) {
  const float nf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(nf);  // in [-150, 0]
  const int32_t n1 = n / 2, n2 = n - n1;       // each in [-75, 0]
  return p * bits_to_float(static_cast<uint32_t>(n1 + 127) << 23) *
         bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
}

// exp(min(x, 0)) for any x: arguments below -104 (including -inf) clamp to -104 (e^-104 is below
// fp32's normal range, so the result is as good as 0), positive ones to 0. The clamps work on the
// bits: GCC does not if-convert float compares under -ftrapping-math, and a branch would stop the
// loop vectorising. NaN is not propagated (callers that care test for it separately).
inline float exp_clamped(float x) {
  const uint32_t b = float_to_bits(x);
  const int32_t abs_bits = static_cast<int32_t>(b & 0x7FFFFFFFu);
  const int32_t kClamp = 0x42D00000;  // 104.0f
  const uint32_t neg = 0u - (b >> 31);  // all ones when x's sign bit is set
  const uint32_t c = static_cast<uint32_t>(abs_bits < kClamp ? abs_bits : kClamp) & neg;
  return exp_nonpositive(-bits_to_float(c));
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
