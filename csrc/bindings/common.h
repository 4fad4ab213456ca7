// Helpers shared by the binding files. Pointers arrive as integers (tensor.data_ptr()) and dtypes
// as DType codes; mmfuse.ops has already validated shapes, dtypes and contiguity, so nothing is
// checked twice here. Every kernel call releases the GIL.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "mmfuse/dtype.h"

namespace mmfuse::bind {

namespace py = pybind11;

template <typename T = void>
inline T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline DType dtype(int code) { return static_cast<DType>(code); }

using release_gil = py::call_guard<py::gil_scoped_release>;

void bind_norm(py::module_& m);
void bind_rope(py::module_& m);
void bind_activation(py::module_& m);
void bind_attention(py::module_& m);
void bind_loss(py::module_& m);

}  // namespace mmfuse::bind
