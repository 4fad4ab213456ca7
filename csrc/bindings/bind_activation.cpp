// PLACEHOLDER: filled with the activation kernels.
#include "bindings/common.h"
namespace mmfuse::bind {
void bind_activation(py::module_& m) { (void)m; }
}  // namespace mmfuse::bind
