"""The backends the op tests run on.

Tests that take the `device` fixture (tests/ops/conftest.py) run once per `backend` parameter:
"cpp", the C++ core on CPU tensors, and "triton", the Triton kernels forced with
MMFUSE_BACKEND=triton, on CUDA tensors when a GPU is present and otherwise on CPU tensors through
Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py). The interpreter runs every
program of a grid as Python (~5 ms each), so there the Triton cases are a small subset, chosen per
test with `with_backends(cases, small)` or `shrink(...)`; on a GPU every case runs on Triton too.
"""

from __future__ import annotations

import torch

GPU = torch.cuda.is_available()
BACKENDS = ("cpp", "triton")


def with_backends(cases, small=lambda *case: True) -> list[tuple]:
    """Parameter tuples: every case with "cpp", then with "triton" the cases `small(*case)` accepts
    (every case when a GPU runs the kernels)."""
    cases = [c if isinstance(c, tuple) else (c,) for c in cases]
    return [(*c, "cpp") for c in cases] + [(*c, "triton") for c in cases if GPU or small(*c)]


def shrink(backend: str, full, small):
    """`small` for Triton in the interpreter, `full` everywhere else."""
    return small if backend == "triton" and not GPU else full


def on(device, *tensors: torch.Tensor):
    """The tensors moved to `device` (generated on the CPU first, so every backend sees the same values)."""
    moved = tuple(t.to(device) for t in tensors)
    return moved if len(moved) > 1 else moved[0]
