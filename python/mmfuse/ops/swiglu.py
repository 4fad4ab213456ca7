"""`mmfuse::swiglu` and `mmfuse::swiglu_packed`: silu(gate) * up, the gated MLP activation.

fp32 math (fp64 for fp64), one rounding. `swiglu_packed` takes the fused gate/up projection's
output [..., 2N] and reads its halves in place; its backward writes one [..., 2N] gradient in the
same layout, so neither direction splits or concatenates. Autograd saves only the inputs: the
backward kernel recomputes sigmoid(gate) from the rows it reads anyway.

Inputs whose rows have unit column stride and one common row stride (contiguous tensors, a slice
of the last dim, the halves of a packed tensor) are passed to the kernel as they are; others are
made contiguous first.
"""

from __future__ import annotations

import torch

from mmfuse import _core
from mmfuse.ops import _alloc, _backend, reference
from mmfuse.ops._checks import check_float, check_same_device, dtype_code, num_threads, ptr
from mmfuse.ops._eager import FusedOp


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float(op, "gate", gate)
    check_float(op, "up", up)
    check_same_device(op, gate=gate, up=up)
    if gate.dim() < 1:
        raise ValueError(f"{op}: gate must have at least 1 dimension, got a scalar")
    if up.shape != gate.shape:
        raise ValueError(f"{op}: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{op}: up dtype {up.dtype} must equal gate dtype {gate.dtype}")


def _check_packed(op: str, x: torch.Tensor) -> None:
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension, got a scalar")
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: x's last dim holds [gate | up] halves and must be even, got shape {tuple(x.shape)}")


def _check_dout(op: str, dout: torch.Tensor, shape: torch.Size, like: torch.Tensor) -> None:
    check_float(op, "dout", dout)
    check_same_device(op, dout=dout, input=like)
    if dout.shape != shape:
        raise ValueError(f"{op}: dout must have the output's shape {tuple(shape)}, got {tuple(dout.shape)}")


def _half_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as [rows, cols] with unit column stride: a view when one exists, else a contiguous copy."""
    try:
        v = t.view(-1, cols)
    except RuntimeError:  # leading dims that do not collapse into one row stride
        v = None
    if v is None or (v.stride(1) != 1 and cols > 1):
        v = t.contiguous().view(-1, cols)
    return v


# ---- C++ path ----------------------------------------------------------------------------------
# Pointers and row strides (in elements) go to the kernel; the packed halves are the same rows at
# column offsets 0 and N.

def _cpp_fwd(gate_RN, gs, up_ptr, us, out_shape, like):
    C = _core.require()
    rows, N = gate_RN.shape
    out = _alloc.empty(out_shape, like.dtype)
    C.swiglu_fwd(ptr(gate_RN), gs, up_ptr, us, ptr(out), N, rows, N, dtype_code(like), num_threads())
    return out


def _swiglu_cpp(gate, up):
    g = _rows(gate, gate.shape[-1])
    u = _rows(up, up.shape[-1])
    return _cpp_fwd(g, g.stride(0), ptr(u), u.stride(0), gate.shape, gate)


def _swiglu_packed_cpp(x):
    N = x.shape[-1] // 2
    x_R2N = _rows(x, 2 * N)
    s = x_R2N.stride(0)
    return _cpp_fwd(x_R2N[:, :N], s, ptr(x_R2N) + N * x.element_size(), s, _half_shape(x), x)


def _cpp_bwd(dout, gate_RN, gs, up_ptr, us, dgate_ptr, dup_ptr, ds):
    C = _core.require()
    rows, N = gate_RN.shape
    d = _rows(dout.to(gate_RN.dtype), N)
    C.swiglu_bwd(ptr(d), d.stride(0), ptr(gate_RN), gs, up_ptr, us, dgate_ptr, ds, dup_ptr, ds, rows, N,
                 dtype_code(gate_RN), num_threads())


def _swiglu_backward_cpp(dout, gate, up):
    N = gate.shape[-1]
    g, u = _rows(gate, N), _rows(up, N)
    dgate, dup = _alloc.empty(gate.shape, gate.dtype), _alloc.empty(up.shape, up.dtype)
    _cpp_bwd(dout, g, g.stride(0), ptr(u), u.stride(0), ptr(dgate), ptr(dup), N)
    return dgate, dup


def _swiglu_packed_backward_cpp(dout, x):
    N = x.shape[-1] // 2
    x_R2N = _rows(x, 2 * N)
    s = x_R2N.stride(0)
    dx = _alloc.empty(x.shape, x.dtype)
    off = N * x.element_size()
    _cpp_bwd(dout, x_R2N[:, :N], s, ptr(x_R2N) + off, s, ptr(dx), ptr(dx) + off, 2 * N)
    return dx


# ---- swiglu ------------------------------------------------------------------------------------

@FusedOp.define("mmfuse::swiglu")
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check("swiglu", gate, up)
    backend = _backend.select("swiglu", gate, up)
    if backend == "triton":
        return _backend.triton_kernels("swiglu").forward(gate, up)
    if backend == "cpp":
        if gate.numel() == 0:
            return torch.empty(gate.shape, dtype=gate.dtype)
        return _swiglu_cpp(gate, up)
    return reference.swiglu(gate, up)


@_swiglu.register_fake
def _(gate, up):
    _check("swiglu", gate, up)
    return gate.new_empty(gate.shape)


@FusedOp.define("mmfuse::swiglu_backward")
def _swiglu_backward(dout: torch.Tensor, gate: torch.Tensor,
                     up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check("swiglu_backward", gate, up)
    _check_dout("swiglu_backward", dout, gate.shape, gate)
    backend = _backend.select("swiglu_backward", dout, gate, up)
    if backend == "triton":
        return _backend.triton_kernels("swiglu").backward(dout, gate, up)
    if backend == "cpp":
        if gate.numel() == 0:
            return torch.empty(gate.shape, dtype=gate.dtype), torch.empty(up.shape, dtype=up.dtype)
        return _swiglu_backward_cpp(dout, gate, up)
    return reference.swiglu_backward(dout, gate, up)


@_swiglu_backward.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_backward(dout, gate, up)


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# ---- swiglu_packed -----------------------------------------------------------------------------

@FusedOp.define("mmfuse::swiglu_packed")
def _swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    _check_packed("swiglu_packed", x)
    backend = _backend.select("swiglu_packed", x)
    if backend == "triton":
        return _backend.triton_kernels("swiglu").packed_forward(x)
    if backend == "cpp":
        if x.numel() == 0:
            return torch.empty(_half_shape(x), dtype=x.dtype)
        return _swiglu_packed_cpp(x)
    return reference.swiglu_packed(x)


@_swiglu_packed.register_fake
def _(x):
    _check_packed("swiglu_packed", x)
    return x.new_empty(_half_shape(x))


@FusedOp.define("mmfuse::swiglu_packed_backward")
def _swiglu_packed_backward(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _check_packed("swiglu_packed_backward", x)
    _check_dout("swiglu_packed_backward", dout, torch.Size(_half_shape(x)), x)
    backend = _backend.select("swiglu_packed_backward", dout, x)
    if backend == "triton":
        return _backend.triton_kernels("swiglu").packed_backward(dout, x)
    if backend == "cpp":
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=x.dtype)
        return _swiglu_packed_backward_cpp(dout, x)
    return reference.swiglu_packed_backward(dout, x)


@_swiglu_packed_backward.register_fake
def _(dout, x):
    return x.new_empty(x.shape)


def _swiglu_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_packed_grad(ctx, dout):
    (x,) = ctx.saved_tensors
    return _swiglu_packed_backward(dout, x)


_swiglu_packed.register_autograd(_swiglu_packed_grad, setup_context=_swiglu_packed_setup)


# ---- public API --------------------------------------------------------------------------------

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32 math, one rounding; gate and up [..., N] of one float dtype."""
    return _swiglu(gate, up)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """swiglu(x[..., :N], x[..., N:]) for x [..., 2N] (the fused gate/up projection's output)."""
    return _swiglu_packed(x)
