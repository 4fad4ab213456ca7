#include "bindings/common.h"
#include "mmfuse/norm.h"

namespace mmfuse::bind {

void bind_norm(py::module_& m) {
  m.def(
      "rms_norm_fwd",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t y, uintptr_t sum, uintptr_t rstd,
         int64_t rows, int64_t dim, int x_dtype, int w_dtype, int y_dtype, double eps, int num_threads) {
        RmsNormFwdArgs a;
        a.x = ptr(x); a.residual = ptr(residual); a.weight = ptr(weight);
        a.y = ptr(y); a.sum = ptr(sum); a.rstd = ptr(rstd);
        a.rows = rows; a.dim = dim;
        a.x_dtype = dtype(x_dtype); a.w_dtype = dtype(w_dtype); a.y_dtype = dtype(y_dtype);
        a.eps = eps; a.num_threads = num_threads;
        rms_norm_fwd(a);
      },
      release_gil());
  m.def(
      "rms_norm_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dsum, uintptr_t dx, uintptr_t dw,
         int64_t rows, int64_t dim, int x_dtype, int w_dtype, int y_dtype, double eps, int num_threads) {
        RmsNormBwdArgs a;
        a.dy = ptr(dy); a.x = ptr(x); a.weight = ptr(weight); a.rstd = ptr(rstd);
        a.dsum = ptr(dsum); a.dx = ptr(dx); a.dw = ptr(dw);
        a.rows = rows; a.dim = dim;
        a.x_dtype = dtype(x_dtype); a.w_dtype = dtype(w_dtype); a.y_dtype = dtype(y_dtype);
        a.eps = eps; a.num_threads = num_threads;
        rms_norm_bwd(a);
      },
      release_gil());
}

}  // namespace mmfuse::bind
