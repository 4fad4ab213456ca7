"""Which implementation runs an op: chosen by the tensors' device, overridable with MMFUSE_BACKEND.

    cpu  -> "cpp"        the C++ core (mmfuse._C)
    cuda -> "triton"     Triton kernels (mmfuse.kernels.triton); "reference" when triton is not installed
    npu  -> "npu"        torch_npu fused ops (not built yet: falls back to "reference")
    else -> "reference"  pure PyTorch (mmfuse.ops.reference), also the test oracle

MMFUSE_BACKEND=reference forces the reference everywhere; MMFUSE_BACKEND=cpp forces the C++ core
and raises for tensors that are not on the CPU; MMFUSE_BACKEND=triton forces the Triton kernels,
also for CPU tensors when triton was imported in interpreter mode (TRITON_INTERPRET=1; slow, for
tests). Ops whose inputs include float64 run the reference instead of Triton (the kernels keep to
fp32 math: no float64 on Ascend, and slow float64 on most GPUs), and so do ops that have no Triton
kernel (they take the "triton" answer as "not cpp").
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from mmfuse import _core

BACKENDS = ("auto", "cpp", "reference", "triton", "npu")

# Backends with kernels in this build, per device type. The torch_npu path plugs in here.
_DEVICE_DEFAULT = {"cpu": "cpp", "cuda": "triton"}


def requested() -> str:
    value = os.environ.get("MMFUSE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MMFUSE_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_kernels(name: str) -> ModuleType:
    """The launchers of one op family, `mmfuse.kernels.triton.<name>` (imported on first use, so
    importing mmfuse never imports triton)."""
    return importlib.import_module(f"mmfuse.kernels.triton.{name}")


def _check_forced_triton(op: str, device: torch.device) -> None:
    if not triton_installed():
        raise ValueError(f"{op}: MMFUSE_BACKEND=triton but triton is not installed (pip install triton)")
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"{op}: MMFUSE_BACKEND=triton runs on CUDA tensors (or CPU tensors in Triton's "
                         f"interpreter), got a tensor on {device}")
    from mmfuse.kernels.triton import interpreted

    if not interpreted():
        raise ValueError(f"{op}: MMFUSE_BACKEND=triton on CPU tensors needs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 in the environment before triton is first imported")


def select(op: str, *tensors: torch.Tensor | None) -> str:
    """The backend that runs `op` on these tensors (all on one device, checked by the op)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    want = requested()
    if want == "reference":
        return "reference"
    if want == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: MMFUSE_BACKEND=cpp runs on CPU tensors only, got a tensor on {device}")
        _core.require()
        return "cpp"
    if want == "npu":
        raise NotImplementedError(f"{op}: the npu backend is not part of this build yet; unset MMFUSE_BACKEND")
    if want == "triton":
        _check_forced_triton(op, device)
        choice = "triton"
    else:
        choice = _DEVICE_DEFAULT.get(device.type, "reference")
    if choice == "cpp" and _core.load() is None:
        return "reference"
    if choice == "triton":
        if not triton_installed() or any(t.dtype == torch.float64 for t in present):
            return "reference"
    return choice
