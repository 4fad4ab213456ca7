// Umbrella header for C++ users: `find_package(mmfuse)` + `target_link_libraries(app mmfuse::core)`.
#pragma once
#include "mmfuse/activation.h"
#include "mmfuse/cpu.h"
#include "mmfuse/dtype.h"
#include "mmfuse/norm.h"
#include "mmfuse/rope.h"
