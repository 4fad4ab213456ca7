// Run-time CPU capabilities, the instruction set in use, threads and version.
#pragma once
#include <string>
#include <vector>

namespace mmfuse {

// Kernel flavours. Each kernel source is compiled once per flavour the build supports;
// the best one the CPU can run is chosen on first use.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, neon = 3 };

const char* isa_name(Isa isa);
// Flavours compiled into this library (generic always; avx2/avx512 on x86-64; neon on aarch64).
std::vector<Isa> compiled_isas();
// Whether this CPU can run `isa` (CPUID / OS support for the register state).
bool cpu_supports(Isa isa);
// The flavour in use: MMFUSE_CPU_ISA=generic|avx2|avx512|neon when set, else the best supported.
Isa active_isa();
// Force a flavour (tests use it to check every flavour). Throws std::invalid_argument when the
// flavour is not compiled in or the CPU cannot run it.
void set_active_isa(Isa isa);
// Threads the kernels use when a call passes num_threads <= 0 (OpenMP's default).
int default_num_threads();
const char* version();

}  // namespace mmfuse
