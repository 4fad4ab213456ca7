"""Argument checks and conversions shared by the ops. Every error names the op, the argument
and the shapes or dtypes it got, so a caller can fix the call without reading our source."""

from __future__ import annotations

from typing import Sequence

import torch

# DType codes of the C++ core (csrc/include/mmfuse/dtype.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def check_float(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_rank(op: str, name: str, t: torch.Tensor, ranks: Sequence[int]) -> None:
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")


def num_threads() -> int:
    """Kernels follow torch's thread setting so one knob (torch.set_num_threads) controls both."""
    return torch.get_num_threads()


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
