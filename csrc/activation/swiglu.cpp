// PLACEHOLDER: filled by the SwiGLU implementation.
#include <stdexcept>
#include "mmfuse/activation.h"
namespace mmfuse { namespace MMFUSE_ISA_NS {
void swiglu_fwd(const SwigluFwdArgs&) { throw std::runtime_error("swiglu: not implemented yet"); }
void swiglu_bwd(const SwigluBwdArgs&) { throw std::runtime_error("swiglu: not implemented yet"); }
}}
