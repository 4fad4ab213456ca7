// The rotation shared by the rotary and M-RoPE kernels, on one head row in the math type.
// `in` and `out` may alias: iteration i touches only channels {i, i + R} (or {2i, 2i + 1}), which
// no other iteration touches, so the simd loops are safe in place.
//   out_a = a * cos - b * sin,   out_b = b * cos + a * sin
// The inverse rotation (the backward) is the same loop with sin negated by the caller.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/convert.h"

#ifndef MMFUSE_ISA_NS
#error "rope/rotate.h belongs to kernel sources compiled per ISA (MMFUSE_ISA_NS)"
#endif

namespace mmfuse {
namespace MMFUSE_ISA_NS {

template <typename M>
inline void rotate_half_pairs(const M* in, M* out, const M* __restrict c, const M* __restrict s, int64_t R) {
#pragma omp simd
  for (int64_t i = 0; i < R; ++i) {
    const M a = in[i], b = in[i + R];
    out[i] = a * c[i] - b * s[i];
    out[i + R] = b * c[i] + a * s[i];
  }
}

template <typename M>
inline void rotate_interleaved_pairs(const M* in, M* out, const M* __restrict c, const M* __restrict s,
                                     int64_t R) {
#pragma omp simd
  for (int64_t i = 0; i < R; ++i) {
    const M a = in[2 * i], b = in[2 * i + 1];
    out[2 * i] = a * c[i] - b * s[i];
    out[2 * i + 1] = b * c[i] + a * s[i];
  }
}

template <typename M>
inline void rotate_pairs(const M* in, M* out, const M* c, const M* s, int64_t R, bool interleaved) {
  if (interleaved)
    rotate_interleaved_pairs(in, out, c, s, R);
  else
    rotate_half_pairs(in, out, c, s, R);
}

// Rotate the first 2R channels of `heads` consecutive rows of `dim` channels, x -> y (y may be x).
// Each row is rotated into `buf` ([dim] math type) and written with streaming stores (the output
// is not read again here; skipping the read-for-ownership saves a third of the traffic). Callers
// issue stream_fence() after their parallel region.
template <typename T>
inline void rotate_rows(const T* x, T* y, int64_t heads, int64_t dim, const math_t<T>* c, const math_t<T>* s,
                        int64_t R, bool interleaved, math_t<T>* buf) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* xr = x + h * dim;
    if constexpr (std::is_same_v<T, math_t<T>>) {
      rotate_pairs(xr, buf, c, s, R, interleaved);
      for (int64_t j = 2 * R; j < dim; ++j) buf[j] = xr[j];
    } else {
      load_row<T>(xr, buf, dim);
      rotate_pairs(buf, buf, c, s, R, interleaved);
    }
    stream_row<T>(buf, y + h * dim, dim);
  }
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
