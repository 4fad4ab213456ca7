// Rotary embedding from cos/sin tables (compiled once per ISA flavour).
//
// Per token: the cos/sin row (R values) is converted once into per-thread math-type buffers (sin
// negated for the inverse rotation) and applied to all heads of the token. Bytes: read x, write y,
// plus R cos/sin values per token (or per position, when rows repeat over a batch).
#include <memory>
#include <type_traits>

#include "common/convert.h"
#include "common/dtype_switch.h"
#include "common/parallel.h"
#include "mmfuse/rope.h"
#include "rope/rotate.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {
namespace {

// cos/sin rows are stored as TC (float or x's dtype) and used in x's math type M.
template <typename TC, typename M>
inline void load_table_row(const TC* src, M* dst, int64_t n, bool negate) {
  const M sign = negate ? M(-1) : M(1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = sign * static_cast<M>(load<TC>(src[i]));
}

template <typename TX, typename TC>
void rotary_kernel(const RotaryArgs& a) {
  using M = math_t<TX>;
  const TX* x = static_cast<const TX*>(a.x);
  TX* y = static_cast<TX*>(a.y);
  const TC* cos = static_cast<const TC*>(a.cos);
  const TC* sin = static_cast<const TC*>(a.sin);
  const int64_t HD = a.heads * a.dim, R = a.rot;
  const int nt = resolve_threads(a.num_threads, a.tokens, a.tokens * HD * int64_t(sizeof(TX)) * 2);

#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<M[]> cbuf(new M[R > 0 ? R : 1]), sbuf(new M[R > 0 ? R : 1]), rbuf(new M[a.dim]);
    M* c = cbuf.get();
    M* s = sbuf.get();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.tokens; ++t) {
      const int64_t row = a.cos_rows > 1 ? t % a.cos_rows : 0;
      load_table_row<TC, M>(cos + row * R, c, R, false);
      load_table_row<TC, M>(sin + row * R, s, R, a.inverse);
      rotate_rows<TX>(x + t * HD, y + t * HD, a.heads, a.dim, c, s, R, a.interleaved, rbuf.get());
    }
  }
  stream_fence();
}

}  // namespace

void rotary(const RotaryArgs& a) {
  if (a.tokens == 0 || a.heads == 0 || a.dim == 0) return;
  if (a.rot < 0 || 2 * a.rot > a.dim || (a.rot > 0 && a.cos_rows <= 0))
    throw std::invalid_argument("rotary: need 0 <= rot <= dim / 2 and cos_rows > 0");
  dispatch_dtype(a.dtype, "rotary", [&](auto xtag) {
    using TX = decltype(xtag);
    if (a.cs_dtype == a.dtype) return rotary_kernel<TX, TX>(a);
    if (a.cs_dtype == DType::f32) return rotary_kernel<TX, float>(a);
    throw std::invalid_argument(std::string("rotary: cos/sin dtype ") + dtype_name(a.cs_dtype) +
                                " must equal x dtype " + dtype_name(a.dtype) + " or be float32");
  });
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
