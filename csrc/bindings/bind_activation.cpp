#include "bindings/common.h"
#include "mmfuse/activation.h"

namespace mmfuse::bind {

void bind_activation(py::module_& m) {
  m.def(
      "swiglu_fwd",
      [](uintptr_t gate, int64_t gate_row_stride, uintptr_t up, int64_t up_row_stride, uintptr_t out,
         int64_t out_row_stride, int64_t rows, int64_t cols, int dtype_code, int num_threads) {
        SwigluFwdArgs a;
        a.gate = ptr(gate); a.gate_row_stride = gate_row_stride;
        a.up = ptr(up); a.up_row_stride = up_row_stride;
        a.out = ptr(out); a.out_row_stride = out_row_stride;
        a.rows = rows; a.cols = cols;
        a.dtype = dtype(dtype_code); a.num_threads = num_threads;
        swiglu_fwd(a);
      },
      release_gil());
  m.def(
      "swiglu_bwd",
      [](uintptr_t dout, int64_t dout_row_stride, uintptr_t gate, int64_t gate_row_stride, uintptr_t up,
         int64_t up_row_stride, uintptr_t dgate, int64_t dgate_row_stride, uintptr_t dup, int64_t dup_row_stride,
         int64_t rows, int64_t cols, int dtype_code, int num_threads) {
        SwigluBwdArgs a;
        a.dout = ptr(dout); a.dout_row_stride = dout_row_stride;
        a.gate = ptr(gate); a.gate_row_stride = gate_row_stride;
        a.up = ptr(up); a.up_row_stride = up_row_stride;
        a.dgate = ptr(dgate); a.dgate_row_stride = dgate_row_stride;
        a.dup = ptr(dup); a.dup_row_stride = dup_row_stride;
        a.rows = rows; a.cols = cols;
        a.dtype = dtype(dtype_code); a.num_threads = num_threads;
        swiglu_bwd(a);
      },
      release_gil());
}

}  // namespace mmfuse::bind
