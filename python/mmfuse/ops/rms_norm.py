"""`mmfuse::rms_norm` and `mmfuse::add_rms_norm`: RMSNorm with Hugging Face Qwen2RMSNorm rounding,
optionally fused with the residual add that precedes it in every transformer block.

Autograd saves only the input (x, or the sum for add_rms_norm) and the weight; the backward kernel
recomputes rstd and the normalised row from the row it has to read anyway, so nothing else is kept.
"""

from __future__ import annotations

import torch

from mmfuse import _core
from mmfuse.ops import _alloc, _backend, reference
from mmfuse.ops._checks import check_float, check_same_device, dtype_code, num_threads, ptr
from mmfuse.ops._eager import FusedOp

_HALF = (torch.float16, torch.bfloat16)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    check_same_device(op, x=x, weight=weight, residual=residual)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension, got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if not (weight.dtype == x.dtype or (weight.dtype == torch.float32 and x.dtype in _HALF)):
        raise TypeError(f"{op}: weight dtype {weight.dtype} must equal x dtype {x.dtype} "
                        "(or be float32 with float16/bfloat16 x)")
    if residual is not None:
        check_float(op, "residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual must match x in shape and dtype, got {tuple(residual.shape)} "
                             f"{residual.dtype} vs x {tuple(x.shape)} {x.dtype}")


def _cpp_fwd(x, weight, residual, eps):
    C = _core.require()
    x = x.contiguous()
    w = weight.contiguous()
    y = _alloc.empty(x.shape, _out_dtype(x, w))
    r = residual.contiguous() if residual is not None else None
    s = _alloc.empty(x.shape, x.dtype) if r is not None else None
    D = x.shape[-1]
    C.rms_norm_fwd(ptr(x), ptr(r), ptr(w), ptr(y), ptr(s), 0, x.numel() // max(D, 1), D,
                   dtype_code(x), dtype_code(w), dtype_code(y), eps, num_threads())
    return y, s


def _cpp_bwd(dy, x, weight, eps, dsum):
    C = _core.require()
    x = x.contiguous()
    w = weight.contiguous()
    dy = dy.to(_out_dtype(x, w)).contiguous()
    ds = dsum.to(x.dtype).contiguous() if dsum is not None else None
    dx = _alloc.empty(x.shape, x.dtype)
    dw = torch.empty_like(w)
    D = x.shape[-1]
    C.rms_norm_bwd(ptr(dy), ptr(x), ptr(w), 0, ptr(ds), ptr(dx), ptr(dw), x.numel() // max(D, 1), D,
                   dtype_code(x), dtype_code(w), dtype_code(dy), eps, num_threads())
    return dx, dw


def _triton_fwd(x, weight, residual, eps):
    return _backend.triton_kernels("rms_norm").forward(x, weight, residual, eps, _out_dtype(x, weight))


def _triton_bwd(dy, x, weight, eps, dsum):
    return _backend.triton_kernels("rms_norm").backward(dy.to(_out_dtype(x, weight)), x, weight, eps, dsum)


def _reference_bwd(dy, x, weight, eps, dsum):
    # Closed form: autograd is unavailable inside a custom op's implementation.
    dx, dw = reference.rms_norm_backward(dy, x, weight, eps)
    if dsum is not None:
        dx = dx + dsum
    return dx, dw


# ---- rms_norm ----------------------------------------------------------------------------------

@FusedOp.define("mmfuse::rms_norm")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check("rms_norm", x, weight)
    backend = _backend.select("rms_norm", x, weight)
    if backend == "cpp":
        return _cpp_fwd(x, weight, None, eps)[0]
    if backend == "triton":
        return _triton_fwd(x, weight, None, eps)[0]
    return reference.rms_norm(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    _check("rms_norm", x, weight)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@FusedOp.define("mmfuse::rms_norm_backward")
def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                       dsum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.select("rms_norm_backward", x, weight)
    if backend == "cpp":
        return _cpp_bwd(dy, x, weight, eps, dsum)
    if backend == "triton":
        return _triton_bwd(dy, x, weight, eps, dsum)
    return _reference_bwd(dy, x, weight, eps, dsum)


@_rms_norm_backward.register_fake
def _(dy, x, weight, eps, dsum):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward(dy, x, weight, ctx.eps, None)
    return dx, dw, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# ---- add_rms_norm ------------------------------------------------------------------------------

@FusedOp.define("mmfuse::add_rms_norm")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check("add_rms_norm", x, weight, residual)
    backend = _backend.select("add_rms_norm", x, residual, weight)
    if backend == "cpp":
        return _cpp_fwd(x, weight, residual, eps)
    if backend == "triton":
        return _triton_fwd(x, weight, residual, eps)
    normed, summed = reference.add_rms_norm(x, residual, weight, eps)
    return normed, summed


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _check("add_rms_norm", x, weight, residual)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), torch.empty_like(x)


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)  # the sum: the only activation backward needs
    ctx.eps = eps


def _add_rms_norm_grad(ctx, dnormed, dsummed):
    summed, weight = ctx.saved_tensors
    dsum, dw = _rms_norm_backward(dnormed, summed, weight, ctx.eps, dsummed)
    return dsum, dsum, dw, None


_add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


# ---- public API --------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), fp32 math (HF Qwen2RMSNorm).

    x [..., D] in fp32/bf16/fp16/fp64; weight [D] of x's dtype (or fp32 with half x, giving fp32 out).
    """
    return _rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(rms_norm(x + residual), x + residual) in one pass: the residual stream and the next norm's input."""
    return _add_rms_norm(x, residual, weight, float(eps))
