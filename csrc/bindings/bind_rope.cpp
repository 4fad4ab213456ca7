// PLACEHOLDER: filled with the rope kernels.
#include "bindings/common.h"
namespace mmfuse::bind {
void bind_rope(py::module_& m) { (void)m; }
}  // namespace mmfuse::bind
