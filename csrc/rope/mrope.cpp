// PLACEHOLDER: filled by the M-RoPE implementation.
#include <stdexcept>
#include "mmfuse/rope.h"
namespace mmfuse { namespace MMFUSE_ISA_NS {
void mrope(const MRopeArgs&) { throw std::runtime_error("mrope: not implemented yet"); }
void mrope_cos_sin(const MRopeCosSinArgs&) { throw std::runtime_error("mrope_cos_sin: not implemented yet"); }
}}
