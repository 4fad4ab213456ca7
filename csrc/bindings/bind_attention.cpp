#include "bindings/common.h"
#include "mmfuse/attention.h"

namespace mmfuse::bind {

namespace {

void set_shape(AttentionShape& a, uintptr_t cu_q, uintptr_t cu_k, int64_t batch, int64_t total_q, int64_t total_k,
               int64_t heads_q, int64_t heads_k, int64_t dim, double scale, bool causal, int64_t window_left,
               int64_t window_right, int dtype_code, int num_threads) {
  a.cu_seqlens_q = ptr<const int32_t>(cu_q);
  a.cu_seqlens_k = ptr<const int32_t>(cu_k);
  a.batch = batch; a.total_q = total_q; a.total_k = total_k;
  a.heads_q = heads_q; a.heads_k = heads_k; a.dim = dim;
  a.scale = scale; a.causal = causal; a.window_left = window_left; a.window_right = window_right;
  a.dtype = dtype(dtype_code); a.num_threads = num_threads;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def(
      "attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k,
         int64_t batch, int64_t total_q, int64_t total_k, int64_t heads_q, int64_t heads_k, int64_t dim,
         double scale, bool causal, int64_t window_left, int64_t window_right, int dtype_code, int num_threads) {
        AttentionFwdArgs a;
        set_shape(a, cu_q, cu_k, batch, total_q, total_k, heads_q, heads_k, dim, scale, causal, window_left,
                  window_right, dtype_code, num_threads);
        a.q = ptr(q); a.k = ptr(k); a.v = ptr(v); a.out = ptr(out); a.lse = ptr(lse);
        attention_fwd(a);
      },
      release_gil());
  m.def(
      "attention_bwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t dout, uintptr_t dlse,
         uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_q, uintptr_t cu_k, int64_t batch, int64_t total_q,
         int64_t total_k, int64_t heads_q, int64_t heads_k, int64_t dim, double scale, bool causal,
         int64_t window_left, int64_t window_right, int dtype_code, int num_threads) {
        AttentionBwdArgs a;
        set_shape(a, cu_q, cu_k, batch, total_q, total_k, heads_q, heads_k, dim, scale, causal, window_left,
                  window_right, dtype_code, num_threads);
        a.q = ptr(q); a.k = ptr(k); a.v = ptr(v); a.out = ptr(out); a.lse = ptr(lse);
        a.dout = ptr(dout); a.dlse = ptr(dlse); a.dq = ptr(dq); a.dk = ptr(dk); a.dv = ptr(dv);
        attention_bwd(a);
      },
      release_gil());
}

}  // namespace mmfuse::bind
