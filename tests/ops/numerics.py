"""The tolerance rules of DESIGN.md "Numerics and tests", shared by every op test.

- fp32 (and fp64): within 1e-5 relative of the float64 reference in the forward, 1e-4 in gradients.
  "Relative" is taken elementwise against |ref| plus the tensor's RMS, so elements that cancel to
  ~0 are judged on the tensor's scale rather than their own.
- bf16/fp16: the error against the float64 reference is at most twice the error of the eager
  low-precision computation (the reference formulation run in that dtype) against float64.
"""

from __future__ import annotations

import torch

import mmfuse._C as _C

FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def assert_close_fp(actual: torch.Tensor, ref64: torch.Tensor, rtol: float, what: str) -> None:
    a, r = actual.double(), ref64.double()
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    err = (a - r).abs()
    bound = rtol * (r.abs() + _rms(r))
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {r.numel()} elements outside rtol {rtol}; first at {idx}: "
            f"got {a[tuple(idx)].item():.9g}, reference {r[tuple(idx)].item():.9g}; max err {err.max().item():.3g}")


def assert_low_precision(actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    a, e, r = actual.double(), eager.double(), ref64.double()
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    ours = (a - r).abs().max().item() if r.numel() else 0.0
    theirs = (e - r).abs().max().item() if r.numel() else 0.0
    floor = 1e-6 * _rms(r)  # eager can be exact on tiny inputs; allow rounding noise then
    assert ours <= 2 * theirs + floor, (
        f"{what}: max error {ours:.3g} vs float64 exceeds 2x the eager {actual.dtype} error {theirs:.3g}")


def assert_matches(actual: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor | None, *, grad: bool,
                   what: str, low_precision: bool | None = None) -> None:
    """Apply the rule for actual's dtype (or `low_precision`, when an fp32 output was computed from
    half inputs). `eager` is the reference run in the inputs' dtype (needed for half)."""
    if low_precision is None:
        low_precision = actual.dtype in LOW_PRECISION
    if low_precision:
        assert eager is not None, f"{what}: low-precision check needs the eager result"
        assert_low_precision(actual, eager, ref64, what)
    else:
        assert_close_fp(actual, ref64, GRAD_RTOL if grad else FWD_RTOL, what)


def supported_isas() -> list[str]:
    """Every kernel flavour this build and CPU can run; tests run the C++ ops under each."""
    return list(_C.supported_isas())


class use_isa:
    """Context manager: run the C++ kernels of one flavour, restoring the previous one after."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.prev = _C.active_isa()
        _C.set_active_isa(self.name)

    def __exit__(self, *exc):
        _C.set_active_isa(self.prev)
