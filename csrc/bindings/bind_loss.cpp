#include "bindings/common.h"
#include "mmfuse/loss.h"

namespace mmfuse::bind {

void bind_loss(py::module_& m) {
  m.def(
      "cross_entropy",
      [](uintptr_t logits, int64_t logits_row_stride, uintptr_t labels, uintptr_t lse_in, uintptr_t loss,
         uintptr_t lse, uintptr_t grad, int64_t grad_row_stride, double grad_scale, uintptr_t row_scale,
         int64_t rows, int64_t vocab, int64_t ignore_index, int dtype_code, int num_threads) {
        CrossEntropyArgs a;
        a.logits = ptr(logits); a.logits_row_stride = logits_row_stride;
        a.labels = ptr<const int64_t>(labels); a.lse_in = ptr(lse_in);
        a.loss = ptr(loss); a.lse = ptr(lse);
        a.grad = ptr(grad); a.grad_row_stride = grad_row_stride;
        a.grad_scale = grad_scale; a.row_scale = ptr(row_scale);
        a.rows = rows; a.vocab = vocab; a.ignore_index = ignore_index;
        a.dtype = dtype(dtype_code); a.num_threads = num_threads;
        cross_entropy(a);
      },
      release_gil());
}

}  // namespace mmfuse::bind
