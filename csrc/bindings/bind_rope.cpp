#include "bindings/common.h"
#include "mmfuse/rope.h"

namespace mmfuse::bind {

void bind_rope(py::module_& m) {
  m.def(
      "rotary",
      [](uintptr_t x, uintptr_t y, uintptr_t cos, uintptr_t sin, int64_t tokens, int64_t heads, int64_t dim,
         int64_t rot, int64_t cos_rows, int dtype_, int cs_dtype, bool interleaved, bool inverse, int num_threads) {
        RotaryArgs a;
        a.x = ptr(x); a.y = ptr(y); a.cos = ptr(cos); a.sin = ptr(sin);
        a.tokens = tokens; a.heads = heads; a.dim = dim; a.rot = rot; a.cos_rows = cos_rows;
        a.dtype = dtype(dtype_); a.cs_dtype = dtype(cs_dtype);
        a.interleaved = interleaved; a.inverse = inverse; a.num_threads = num_threads;
        rotary(a);
      },
      release_gil());
  m.def(
      "mrope",
      [](uintptr_t q, uintptr_t q_out, int64_t q_heads, uintptr_t k, uintptr_t k_out, int64_t k_heads,
         uintptr_t position_ids, uintptr_t inv_freq, int64_t tokens, int64_t dim, int64_t s_t, int64_t s_h,
         int64_t s_w, int dtype_, bool inverse, int num_threads) {
        MRopeArgs a;
        a.q = ptr(q); a.q_out = ptr(q_out); a.q_heads = q_heads;
        a.k = ptr(k); a.k_out = ptr(k_out); a.k_heads = k_heads;
        a.position_ids = ptr<const int64_t>(position_ids); a.inv_freq = ptr<const float>(inv_freq);
        a.tokens = tokens; a.dim = dim;
        a.sections[0] = s_t; a.sections[1] = s_h; a.sections[2] = s_w;
        a.dtype = dtype(dtype_); a.inverse = inverse; a.num_threads = num_threads;
        mrope(a);
      },
      release_gil());
  m.def(
      "mrope_cos_sin",
      [](uintptr_t position_ids, uintptr_t inv_freq, uintptr_t cos, uintptr_t sin, int64_t tokens, int64_t half_dim,
         int64_t s_t, int64_t s_h, int64_t s_w, int num_threads) {
        MRopeCosSinArgs a;
        a.position_ids = ptr<const int64_t>(position_ids); a.inv_freq = ptr<const float>(inv_freq);
        a.cos = ptr<float>(cos); a.sin = ptr<float>(sin);
        a.tokens = tokens; a.half_dim = half_dim;
        a.sections[0] = s_t; a.sections[1] = s_h; a.sections[2] = s_w;
        a.num_threads = num_threads;
        mrope_cos_sin(a);
      },
      release_gil());
}

}  // namespace mmfuse::bind
