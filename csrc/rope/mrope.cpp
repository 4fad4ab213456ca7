// M-RoPE (Qwen2-VL / Qwen2.5-VL) with the angles computed in the kernel, and its cos/sin table
// builder (compiled once per ISA flavour).
//
// Per token: D/2 angles float(pos[stream(j)][t]) * inv_freq[j] (one fp32 multiply, as HF does),
// their fp32 cos/sin into per-thread buffers, then every q head and every k head of the token is
// rotated with them. The [tokens, D] cos/sin tables are never written: bytes are read q, k and
// write q_out, k_out, plus 3 position ids per token. The D/2 cos/sin per token are one vectorised
// loop (common/sincos.h; fp64 inputs keep libm): with libm they were ~7 ns a pair, ~0.8 ms of the
// q+k 4096 tokens x 16 heads x 128 fp32 kernel on 2 threads; there now fwd 4.45 -> 3.61 ms and
// bwd 4.31 -> 3.48 ms with AVX-512, 4.85 -> 4.16 / 4.64 -> 4.04 ms with AVX2 (medians of 40,
// 2-core Xeon dev box; copy_ of q and k into existing buffers: 4.9 ms).
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/convert.h"
#include "common/dtype_switch.h"
#include "common/parallel.h"
#include "common/sincos.h"
#include "mmfuse/rope.h"
#include "rope/rotate.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace {

void check_sections(const int64_t sections[3], int64_t half, const char* what) {
  if (sections[0] < 0 || sections[1] < 0 || sections[2] < 0 || sections[0] + sections[1] + sections[2] != half)
    throw std::invalid_argument(std::string(what) + ": sections must be >= 0 and sum to dim / 2 = " +
                                std::to_string(half));
}

// angle[j] for token t; frequency j in section s uses stream s. No per-element branch: one loop
// per section with its position hoisted.
inline void token_angles(const int64_t* pos, int64_t tokens, int64_t t, const float* inv_freq,
                         const int64_t sections[3], float* angle) {
  int64_t j0 = 0;
  for (int s = 0; s < 3; ++s) {
    const float p = static_cast<float>(pos[s * tokens + t]);
    const int64_t j1 = j0 + sections[s];
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) angle[j] = p * inv_freq[j];
    j0 = j1;
  }
}

// fp32 math: the vectorised sincos_row; fp64 keeps libm per element.
template <typename M>
inline void cos_sin_of(const float* angle, M* c, M* s, int64_t n, bool negate_sin) {
  if constexpr (std::is_same_v<M, float>) {
    sincos_row(angle, c, s, n, negate_sin);
  } else {
    const float sign = negate_sin ? -1.0f : 1.0f;
    for (int64_t j = 0; j < n; ++j) {
      c[j] = static_cast<M>(std::cos(angle[j]));
      s[j] = static_cast<M>(sign * std::sin(angle[j]));
    }
  }
}

template <typename T>
void mrope_kernel(const MRopeArgs& a) {
  using M = math_t<T>;
  const int64_t D = a.dim, half = D / 2;
  const T* q = static_cast<const T*>(a.q);
  T* qo = static_cast<T*>(a.q_out);
  const T* k = static_cast<const T*>(a.k);
  T* ko = static_cast<T*>(a.k_out);
  const int64_t k_heads = k ? a.k_heads : 0;
  const int64_t bytes = a.tokens * (a.q_heads + k_heads) * D * int64_t(sizeof(T)) * 2;
  const int nt = resolve_threads(a.num_threads, a.tokens, bytes);

#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<float[]> abuf(new float[half]);
    std::unique_ptr<M[]> cbuf(new M[half]), sbuf(new M[half]), rbuf(new M[D]);
    M* c = cbuf.get();
    M* s = sbuf.get();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      token_angles(a.position_ids, a.tokens, t, a.inv_freq, a.sections, abuf.get());
      cos_sin_of<M>(abuf.get(), c, s, half, a.inverse);
      rotate_rows<T>(q + t * a.q_heads * D, qo + t * a.q_heads * D, a.q_heads, D, c, s, half, false, rbuf.get());
      if (k_heads)
        rotate_rows<T>(k + t * k_heads * D, ko + t * k_heads * D, k_heads, D, c, s, half, false, rbuf.get());
    }
  }
  stream_fence();
}

}  // namespace

void mrope(const MRopeArgs& a) {
  if (a.dim % 2 != 0) throw std::invalid_argument("mrope: dim must be even, got " + std::to_string(a.dim));
  check_sections(a.sections, a.dim / 2, "mrope");
  if (a.tokens == 0 || a.dim == 0) return;
  dispatch_dtype(a.dtype, "mrope", [&](auto tag) { mrope_kernel<decltype(tag)>(a); });
}

void mrope_cos_sin(const MRopeCosSinArgs& a) {
  check_sections(a.sections, a.half_dim, "mrope_cos_sin");
  if (a.tokens == 0 || a.half_dim == 0) return;
  const int64_t half = a.half_dim;
  const int nt = resolve_threads(a.num_threads, a.tokens, a.tokens * half * 8);
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<float[]> abuf(new float[half]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      token_angles(a.position_ids, a.tokens, t, a.inv_freq, a.sections, abuf.get());
      cos_sin_of<float>(abuf.get(), a.cos + t * half, a.sin + t * half, half, false);
    }
  }
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
