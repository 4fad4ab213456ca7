"""Output tensors for the CPU kernels, backed by huge pages when they are large.

A fresh CPU tensor of many MiB costs more in page faults than the kernel that fills it: on the
2-core dev box (THP in "madvise" mode) the SwiGLU fwd+bwd at 8192x5632 fp32 spends ~65 ms in the
kernels and ~140 ms faulting in the three new 176 MiB outputs 4 KiB at a time. Advising huge
pages on the 2 MiB-aligned interior of each large output before the kernel first writes it
brings fwd+bwd from ~210 to ~100 ms. PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every
allocation; here it applies to the outputs of every mmfuse CPU op (and nothing else). Benchmarks
report mmfuse and its baselines both with and without THP_MEM_ALLOC_ENABLE=1, so the share of a
speed-up that comes from this (rather than from the kernel) is visible. The advice is a hint: where it is
unavailable or refused, the tensor is an ordinary one.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from mmfuse.runtime import allocator

_MADV_HUGEPAGE = 14  # Linux
_HUGE_PAGE = 1 << 21
_MIN_BYTES = 4 * _HUGE_PAGE  # smaller outputs mostly reuse pages the allocator already has


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU; huge pages advised when it is large.

    Not after `mmfuse.runtime.tune_allocator()`: freed blocks then stay in malloc's heap, and
    advising huge pages on reused heap memory made each write slower, not faster (32 MiB: 5.4 ->
    40 ms; 176 MiB: 23 -> 266 ms, synchronous compaction under THP defrag=madvise).
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _madvise is not None and nbytes >= _MIN_BYTES and not allocator.is_tuned():
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)
    return t
