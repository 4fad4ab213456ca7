// mmfuse._C: the pybind11 module over the C++ core.
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "mmfuse/cpu.h"

namespace py = pybind11;
using namespace mmfuse;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfuse C++ core (no libtorch): fused CPU kernels over raw pointers";
  m.def("version", &version);
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_active_isa", [](const std::string& name) {
    for (Isa i : {Isa::generic, Isa::avx2, Isa::avx512, Isa::neon})
      if (name == isa_name(i)) return set_active_isa(i);
    throw std::invalid_argument("unknown ISA '" + name + "' (expected generic, avx2, avx512 or neon)");
  });
  m.def("compiled_isas", [] {
    std::vector<std::string> out;
    for (Isa i : compiled_isas()) out.emplace_back(isa_name(i));
    return out;
  });
  m.def("supported_isas", [] {
    std::vector<std::string> out;
    for (Isa i : compiled_isas())
      if (cpu_supports(i)) out.emplace_back(isa_name(i));
    return out;
  });
  m.def("default_num_threads", &default_num_threads);
  bind::bind_norm(m);
  bind::bind_rope(m);
  bind::bind_activation(m);
  bind::bind_attention(m);
  bind::bind_loss(m);
}
