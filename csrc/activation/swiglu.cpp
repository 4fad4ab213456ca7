// SwiGLU forward and backward (compiled once per ISA flavour).
//
//   out   = silu(g) * u                       s = sigmoid(g), silu(g) = g * s
//   dgate = dout * u * s * (1 + g * (1 - s))
//   dup   = dout * g * s
// fp32 math (fp64 for fp64), one rounding per output. The backward recomputes s from g, so the
// forward saves nothing but its inputs. Bytes: forward reads g, u and writes out; backward reads
// dout, g, u and writes dgate, dup. Nothing else touches memory.
//
// Work is a flat range of (row, column-tile) pairs split evenly over the threads, so a few long
// rows still keep every core busy. Each tile is converted into small fp32 buffers (fp32 inputs
// are read in place) and the element loop is one `omp simd` loop: exp is the polynomial of
// common/fast_exp.h (libm's expf is a call per element that GCC does not vectorise).
// At 8192x5632 fp32 into existing buffers on the 2-core dev box: forward 25 ms, backward 39 ms,
// i.e. ~22 GB/s moved against ~24 GB/s for a plain copy_ (memory bound, as intended).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/convert.h"
#include "common/dtype_switch.h"
#include "common/fast_exp.h"
#include "common/parallel.h"
#include "mmfuse/activation.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace {

// Elements per tile: three to five fp32 tile buffers per thread stay within L1.
constexpr int64_t kTile = 512;

// s = sigmoid(g) and 1 - s, both without cancellation: with e = exp(-|g|) <= 1,
// sigmoid(|g|) = 1 / (1 + e) and sigmoid(-|g|) = e / (1 + e).
// The clamp and the selects work on the bits: GCC does not if-convert float compares under its
// default -ftrapping-math, and a branch in the loop would stop it vectorising (seen with GCC 12
// for the generic and AVX2 flavours).
inline void sigmoid_pair(float g, float& s, float& one_minus_s) {
  const uint32_t gb = float_to_bits(g);
  const int32_t abs_bits = static_cast<int32_t>(gb & 0x7FFFFFFFu);
  const int32_t kClamp = 0x42D00000;  // 104.0f; NaN (above +inf) clamps too and g carries it on
  const float e = exp_nonpositive(-bits_to_float(static_cast<uint32_t>(abs_bits < kClamp ? abs_bits : kClamp)));
  const float d = 1.0f / (1.0f + e);
  const float ed = e * d;
  const uint32_t neg = 0u - (gb >> 31);  // all ones when g's sign bit is set
  const uint32_t db = float_to_bits(d), edb = float_to_bits(ed);
  s = bits_to_float((db & ~neg) | (edb & neg));
  one_minus_s = bits_to_float((edb & ~neg) | (db & neg));
}

inline void sigmoid_pair(double g, double& s, double& one_minus_s) {
  const double e = std::exp(g < 0 ? g : -g);
  const double d = 1.0 / (1.0 + e);
  s = g >= 0 ? d : e * d;
  one_minus_s = g >= 0 ? e * d : d;
}

// Where a tile of an output is computed: in place for fp32 (fp64), else in `buf` then stored.
template <typename T>
inline math_t<T>* tile_out(T* dst, math_t<T>* buf) {
  if constexpr (std::is_same_v<T, math_t<T>>) {
    (void)buf;
    return dst;
  } else {
    (void)dst;
    return buf;
  }
}

template <typename T>
inline void tile_store(const math_t<T>* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, math_t<T>>) store_row<T>(buf, dst, n);
  else { (void)buf; (void)dst; (void)n; }
}

// The tile range: tile t covers row t / per_row, columns [(t % per_row) * kTile, + kTile).
struct Tiles {
  int64_t per_row, count;
  Tiles(int64_t rows, int64_t cols) : per_row((cols + kTile - 1) / kTile), count(rows * per_row) {}
  void locate(int64_t t, int64_t cols, int64_t& row, int64_t& col, int64_t& n) const {
    row = t / per_row;
    col = (t - row * per_row) * kTile;
    n = cols - col < kTile ? cols - col : kTile;
  }
};

template <typename T>
void fwd_kernel(const SwigluFwdArgs& a) {
  using M = math_t<T>;
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* out = static_cast<T*>(a.out);
  const Tiles tiles(a.rows, a.cols);
  const int nt = resolve_threads(a.num_threads, tiles.count, a.rows * a.cols * int64_t(sizeof(T)) * 3);

#pragma omp parallel num_threads(nt)
  {
    alignas(64) M gbuf[kTile], ubuf[kTile], obuf[kTile];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles.count; ++t) {
      int64_t i, j, n;
      tiles.locate(t, a.cols, i, j, n);
      const M* __restrict g = tile_in<T>(gate + i * a.gate_row_stride + j, gbuf, n);
      const M* __restrict u = tile_in<T>(up + i * a.up_row_stride + j, ubuf, n);
      T* dst = out + i * a.out_row_stride + j;
      M* __restrict o = tile_out<T>(dst, obuf);
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        M s, oms;
        sigmoid_pair(g[k], s, oms);
        o[k] = g[k] * s * u[k];
      }
      tile_store<T>(o, dst, n);
    }
  }
}

template <typename T>
void bwd_kernel(const SwigluBwdArgs& a) {
  using M = math_t<T>;
  const T* dout = static_cast<const T*>(a.dout);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* dgate = static_cast<T*>(a.dgate);
  T* dup = static_cast<T*>(a.dup);
  const Tiles tiles(a.rows, a.cols);
  const int nt = resolve_threads(a.num_threads, tiles.count, a.rows * a.cols * int64_t(sizeof(T)) * 5);

#pragma omp parallel num_threads(nt)
  {
    alignas(64) M dbuf[kTile], gbuf[kTile], ubuf[kTile], dgbuf[kTile], dubuf[kTile];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles.count; ++t) {
      int64_t i, j, n;
      tiles.locate(t, a.cols, i, j, n);
      if constexpr (kElementwiseVectorises<T> && !std::is_same_v<T, M>) {
        // bf16: one pass from the stored inputs to the stored gradients, no tile buffers
        // (8192x5632, 2 threads: 31.6 -> 24.6 ms; the same change made the forward slower, 19 -> 29 ms).
        const T* __restrict ds_ = dout + i * a.dout_row_stride + j;
        const T* __restrict gs = gate + i * a.gate_row_stride + j;
        const T* __restrict us = up + i * a.up_row_stride + j;
        T* __restrict dgs = dgate + i * a.dgate_row_stride + j;
        T* __restrict dus = dup + i * a.dup_row_stride + j;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const M gk = load<T>(gs[k]);
          M s, oms;
          sigmoid_pair(gk, s, oms);
          const M dsk = load<T>(ds_[k]) * s;
          dgs[k] = store<T>(dsk * load<T>(us[k]) * (M(1) + gk * oms));
          dus[k] = store<T>(dsk * gk);
        }
        continue;
      }
      const M* __restrict d = tile_in<T>(dout + i * a.dout_row_stride + j, dbuf, n);
      const M* __restrict g = tile_in<T>(gate + i * a.gate_row_stride + j, gbuf, n);
      const M* __restrict u = tile_in<T>(up + i * a.up_row_stride + j, ubuf, n);
      T* dg_dst = dgate + i * a.dgate_row_stride + j;
      T* du_dst = dup + i * a.dup_row_stride + j;
      M* __restrict dg = tile_out<T>(dg_dst, dgbuf);
      M* __restrict du = tile_out<T>(du_dst, dubuf);
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        M s, oms;
        sigmoid_pair(g[k], s, oms);
        const M ds = d[k] * s;
        dg[k] = ds * u[k] * (M(1) + g[k] * oms);
        du[k] = ds * g[k];
      }
      tile_store<T>(dg, dg_dst, n);
      tile_store<T>(du, du_dst, n);
    }
  }
}

}  // namespace

void swiglu_fwd(const SwigluFwdArgs& a) {
  if (a.rows == 0 || a.cols == 0) return;
  dispatch_dtype(a.dtype, "swiglu_fwd", [&](auto tag) { fwd_kernel<decltype(tag)>(a); });
}

void swiglu_bwd(const SwigluBwdArgs& a) {
  if (a.rows == 0 || a.cols == 0) return;
  dispatch_dtype(a.dtype, "swiglu_bwd", [&](auto tag) { bwd_kernel<decltype(tag)>(a); });
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
