// PLACEHOLDER: filled by the rotary implementation.
#include <stdexcept>
#include "mmfuse/rope.h"
namespace mmfuse { namespace MMFUSE_ISA_NS {
void rotary(const RotaryArgs&) { throw std::runtime_error("rotary: not implemented yet"); }
}}
