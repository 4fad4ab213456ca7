// Threading helpers shared by the kernels.
#pragma once
#include <omp.h>

#include <cstdint>

#include "mmfuse/cpu.h"

namespace mmfuse {
namespace MMFUSE_ISA_NS {

// Threads for a call: the caller's request (Python passes torch.get_num_threads()), else
// OpenMP's default; never more than there are work items, and 1 for tiny problems where
// waking a team costs more than the work (~5 us per parallel region on 2 cores).
inline int resolve_threads(int requested, int64_t work_items, int64_t bytes_touched) {
  int n = requested > 0 ? requested : default_num_threads();
  if (bytes_touched < (int64_t{1} << 16)) n = 1;
  if (work_items < n) n = static_cast<int>(work_items < 1 ? 1 : work_items);
  return n;
}

}  // namespace MMFUSE_ISA_NS
}  // namespace mmfuse
