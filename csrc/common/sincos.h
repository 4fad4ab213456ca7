// cos and sin of a row of fp32 angles in one `omp simd` loop (the rotary tables). libm's cosf /
// sinf are a call per element that GCC does not vectorise; the polynomial below does, in every
// flavour.
//
// Each fp32 angle x is widened to double (exactly) and reduced, x = k pi/2 + r with |r| <= pi/4,
// by a 3-constant Cody-Waite split of pi/2 (P1, P2 of 32 significant bits, P3 the rest): for
// |k| < 2^21 the products k P1 and k P2 are exact and x - k P1 is exact (Sterbenz), so r is
// within ~1 double ulp of exact. sin r and cos r are the Taylor polynomials through r^15 and
// r^16 (truncation below 6e-17 on |r| <= pi/4), the quadrant k mod 4 swaps and negates them with
// integer bit operations (GCC does not if-convert float selects under -ftrapping-math), and each
// result is rounded once to fp32. So the outputs are the correctly rounded cos/sin of the fp32
// angle except when the exact value lies within ~1e-16 of a rounding midpoint; the error is
// <= 2^-25 + 1e-16 absolute. Measured against float64 cos/sin of the fp32 angle (GCC 12; generic,
// AVX2 and AVX-512 flavours alike): positions 0..70000 step 7 times Qwen's inv_freq (theta 1e6,
// D 128) and 2^21 angles float(p) * f with p uniform in [0, 2^21), f uniform in [0, 1): every
// result the correctly rounded one, max abs error 2^-25 (half an ulp of 1).
//
// Valid for |x| <= 2^21 (positions < 2^21 times inv_freq <= 1); larger angles, inf and NaN are
// computed as 0 in the simd loop and then recomputed by std::cos / std::sin in a scalar fix-up
// pass that costs nothing when no angle is out of range.
//
// Speed (2-core Xeon (Sapphire Rapids) dev box, 2 threads, 4096 tokens x 64 angles, medians of 40):
// the table build mrope_cos_sin 0.96 -> 0.18 ms AVX-512, 0.95 -> 0.23 ms AVX2, 0.90 -> 0.51 ms
// generic (libm sinf + cosf per pair before: ~7 ns a pair per thread, now ~1.4 ns with AVX-512).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/bits.h"

#ifndef MMFUSE_ISA_NS
#error "common/sincos.h belongs to kernel sources compiled per ISA (MMFUSE_ISA_NS)"
#endif

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace sincos_detail {

constexpr uint32_t kMaxAngleBits = 0x4A000000u;  // 2^21 as fp32 bits

// cos and sin of x (|x| <= 2^21) as fp32 bit patterns; sin's sign bit is flipped by sin_flip.
inline void sincos_bits(float x, uint32_t sin_flip, uint32_t& cos_bits, uint32_t& sin_bits) {
  const double xd = x;
  // k = round(x * 2/pi): adding 1.5 * 2^52 leaves k in the low mantissa bits (two's complement).
  const double shifted = xd * 0.63661977236758138 + 6755399441055744.0;
  const double kd = shifted - 6755399441055744.0;
  const uint32_t q = static_cast<uint32_t>(double_to_bits(shifted));
  double r = xd - kd * 0x1.921fb544p+0;       // P1, exact
  r = r - kd * 0x1.0b4611a6p-34;              // P2
  r = r - kd * 0x1.3198a2e037073p-69;         // P3
  const double r2 = r * r;
  double sp = -7.6471637318198165e-13;        // -1/15!
  sp = sp * r2 + 1.6059043836821613e-10;      //  1/13!
  sp = sp * r2 - 2.5052108385441720e-08;      // -1/11!
  sp = sp * r2 + 2.7557319223985893e-06;      //  1/9!
  sp = sp * r2 - 1.9841269841269841e-04;      // -1/7!
  sp = sp * r2 + 8.3333333333333333e-03;      //  1/5!
  sp = sp * r2 - 1.6666666666666667e-01;      // -1/3!
  const double sr = r + r * r2 * sp;
  double cp = 4.7794773323873853e-14;         //  1/16!
  cp = cp * r2 - 1.1470745597729725e-11;      // -1/14!
  cp = cp * r2 + 2.0876756987868099e-09;      //  1/12!
  cp = cp * r2 - 2.7557319223985891e-07;      // -1/10!
  cp = cp * r2 + 2.4801587301587302e-05;      //  1/8!
  cp = cp * r2 - 1.3888888888888889e-03;      // -1/6!
  cp = cp * r2 + 4.1666666666666667e-02;      //  1/4!
  cp = cp * r2 - 0.5;                         // -1/2!
  const double cr = 1.0 + r2 * cp;
  // Quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s).
  const uint32_t sb = float_to_bits(static_cast<float>(sr)), cb = float_to_bits(static_cast<float>(cr));
  const uint32_t swap = 0u - (q & 1u);
  sin_bits = ((sb & ~swap) | (cb & swap)) ^ ((q & 2u) << 30) ^ sin_flip;
  cos_bits = ((cb & ~swap) | (sb & swap)) ^ (((q + 1u) & 2u) << 30);
}

}  // namespace sincos_detail

// c[j] = cos(x[j]), s[j] = sin(x[j]) (-sin(x[j]) with negate_sin) for j < n, in fp32.
inline void sincos_row(const float* __restrict x, float* __restrict c, float* __restrict s, int64_t n,
                       bool negate_sin) {
  using namespace sincos_detail;
  const uint32_t flip = negate_sin ? 0x80000000u : 0u;
  uint32_t out_of_range = 0;
#pragma omp simd reduction(| : out_of_range)
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t xb = float_to_bits(x[j]);
    const uint32_t bad = 0u - static_cast<uint32_t>((xb & 0x7FFFFFFFu) > kMaxAngleBits);
    out_of_range |= bad;
    uint32_t cb, sb;
    sincos_bits(bits_to_float(xb & ~bad), flip, cb, sb);
    c[j] = bits_to_float(cb);
    s[j] = bits_to_float(sb);
  }
  if (out_of_range) {
    for (int64_t j = 0; j < n; ++j) {
      if ((float_to_bits(x[j]) & 0x7FFFFFFFu) > kMaxAngleBits) {
        c[j] = std::cos(x[j]);
        s[j] = negate_sin ? -std::sin(x[j]) : std::sin(x[j]);
      }
    }
  }
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
