// Softmax cross-entropy per row: loss, lse and (optionally in place) the gradient wrt the logits
// (compiled once per ISA flavour).
//
// Per row, one pass of online log-sum-exp over L1-sized tiles: the tile's max, a rescale of the
// running sum when the max grows (one scalar exp per tile, not per element), then the tile's
// sum of exp(x - max) with the vectorised exp of common/fast_exp.h. The gradient pass reads the
// row a second time and writes exp(x - lse) * scale, minus scale at the label; the target logit
// is read before that pass, so the gradient can overwrite the logits. A vocab row (151936 fp32 =
// 594 KiB) stays in L2 between the two passes. Rows are split over the threads.
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/convert.h"
#include "common/dtype_switch.h"
#include "common/fast_exp.h"
#include "common/parallel.h"
#include "mmfuse/loss.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace {

// Elements per tile: two fp32 tile buffers per thread stay within L1.
constexpr int64_t kTile = 2048;

inline float exp_shifted(float d) { return exp_clamped(d); }
inline double exp_shifted(double d) { return std::exp(d < 0 ? d : 0.0); }

// log(sum_j exp(x_j)) of one row; NaN if the row holds a NaN.
template <typename T>
math_t<T> row_lse(const T* x, int64_t V, math_t<T>* buf) {
  using M = math_t<T>;
  M m = -std::numeric_limits<M>::infinity();
  M s = 0;
  int nan = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int64_t n = V - j0 < kTile ? V - j0 : kTile;
    const M* t = tile_in<T>(x + j0, buf, n);
    M tm = -std::numeric_limits<M>::infinity();
#pragma omp simd reduction(max : tm)
    for (int64_t k = 0; k < n; ++k) tm = t[k] > tm ? t[k] : tm;
    if (tm > m) {
      s *= std::exp(m - tm);  // exp(-inf) = 0 on the first tile
      m = tm;
    }
    M ts = 0;
#pragma omp simd reduction(+ : ts) reduction(| : nan)
    for (int64_t k = 0; k < n; ++k) {
      ts += exp_shifted(t[k] - m);
      nan |= static_cast<int>(t[k] != t[k]);
    }
    s += ts;
  }
  if (nan) return std::numeric_limits<M>::quiet_NaN();
  return m + std::log(s);
}

template <typename T>
void kernel(const CrossEntropyArgs& a) {
  using M = math_t<T>;
  const int64_t V = a.vocab;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const M* lse_in = static_cast<const M*>(a.lse_in);
  M* loss = static_cast<M*>(a.loss);
  M* lse_out = static_cast<M*>(a.lse);
  const M* row_scale = static_cast<const M*>(a.row_scale);
  const int64_t passes = (lse_in ? 0 : 1) + (grad ? 2 : 0);
  const int nt = resolve_threads(a.num_threads, a.rows, a.rows * V * int64_t(sizeof(T)) * (passes ? passes : 1));

#pragma omp parallel num_threads(nt)
  {
    alignas(64) M buf[kTile];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      const T* x = logits + i * a.logits_row_stride;
      const int64_t label = a.labels[i];
      const bool ignored = label == a.ignore_index;
      const bool in_range = label >= 0 && label < V;
      M lse = 0;
      if (lse_in) lse = lse_in[i];
      else if (!ignored || lse_out) lse = row_lse<T>(x, V, buf);
      if (lse_out) lse_out[i] = lse;
      if (loss) {
        if (ignored) loss[i] = 0;
        else loss[i] = in_range ? lse - load<T>(x[label]) : std::numeric_limits<M>::quiet_NaN();
      }
      if (!grad) continue;
      T* g = grad + i * a.grad_row_stride;
      if (ignored) {
        const T zero = store<T>(M(0));
        for (int64_t j = 0; j < V; ++j) g[j] = zero;
        continue;
      }
      const M sc = static_cast<M>(a.grad_scale) * (row_scale ? row_scale[i] : M(1));
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = V - j0 < kTile ? V - j0 : kTile;
        const M* t = tile_in<T>(x + j0, buf, n);
        // fp32/fp64 write straight into the gradient row (t may be that same row); half types
        // compute in buf and store the tile.
        M* o;
        if constexpr (std::is_same_v<T, M>) o = g + j0;
        else o = buf;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) o[k] = exp_shifted(t[k] - lse) * sc;
        if (in_range && label >= j0 && label < j0 + n) o[label - j0] -= sc;
        if constexpr (!std::is_same_v<T, M>) store_row<T>(o, g + j0, n);
      }
    }
  }
}

}  // namespace

void cross_entropy(const CrossEntropyArgs& a) {
  if (a.rows == 0 || a.vocab == 0) return;
  dispatch_dtype(a.dtype, "cross_entropy", [&](auto tag) { kernel<decltype(tag)>(a); });
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
