"""Which implementation runs an op: chosen by the tensors' device, overridable with MMFUSE_BACKEND.

    cpu  -> "cpp"        the C++ core (mmfuse._C)
    cuda -> "triton"     (not built yet: falls back to "reference")
    npu  -> "npu"        torch_npu fused ops (not built yet: falls back to "reference")
    else -> "reference"  pure PyTorch (mmfuse.ops.reference), also the test oracle

MMFUSE_BACKEND=reference forces the reference everywhere; MMFUSE_BACKEND=cpp forces the C++ core
and raises for tensors that are not on the CPU.
"""

from __future__ import annotations

import os

import torch

from mmfuse import _core

BACKENDS = ("auto", "cpp", "reference", "triton", "npu")

# Backends with kernels in this build, per device type. The Triton and torch_npu paths plug in here.
_DEVICE_DEFAULT = {"cpu": "cpp"}


def requested() -> str:
    value = os.environ.get("MMFUSE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MMFUSE_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def select(op: str, *tensors: torch.Tensor | None) -> str:
    """The backend that runs `op` on these tensors (all on one device, checked by the op)."""
    device = next(t.device for t in tensors if t is not None)
    want = requested()
    if want == "reference":
        return "reference"
    if want == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: MMFUSE_BACKEND=cpp runs on CPU tensors only, got a tensor on {device}")
        _core.require()
        return "cpp"
    if want in ("triton", "npu"):
        raise NotImplementedError(f"{op}: the {want} backend is not part of this build yet; unset MMFUSE_BACKEND")
    choice = _DEVICE_DEFAULT.get(device.type, "reference")
    if choice == "cpp" and _core.load() is None:
        return "reference"
    return choice
