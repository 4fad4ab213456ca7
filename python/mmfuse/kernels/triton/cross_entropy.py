"""Softmax cross-entropy in Triton (the contract: `mmfuse.ops.reference.cross_entropy`).

Forward, one sweep over each row in BLOCK_V chunks (a 151936-wide row is never held whole): an
online max / sum-of-exp in fp32 gives lse = max + log(sum exp(x - max)); the loss is lse - x[label],
0 for rows labelled ignore_index. With WRITE_GRAD the same program then sweeps the row once more
and writes d(loss)/d(logits) = (exp(x - lse) - onehot(label)) * scale (* row_scale[row]), 0 on
ignored rows, over the logits in place or into a separate buffer: Liger-Kernel's trick, which
`linear_cross_entropy` uses on each chunk of logits so that its gradients come out of the forward.

The backward kernel writes the same gradient from a saved lse (one sweep: exp(x - lse) needs no
max/sum pass); `cross_entropy` uses it, as its C++ path does (see `mmfuse.ops.cross_entropy`).

A program owns one row at a time and loops over rows (grid <= 65535). Loads of bf16/fp16 logits
are widened to fp32; the gradient is rounded once, to its buffer's dtype (`to_dtype`).

Shape legend: R rows, V classes (the vocabulary).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import MAX_TILE, grid, next_pow2, num_warps, to_dtype

# Columns per chunk: 4096 fp32 values (16 KiB) per program per step; a Qwen row (151936) is 38 steps.
_BLOCK_V = 4096


@triton.jit
def _grad_row(X, G, row64, V, stride_x, stride_g, label, lse, factor, BLOCK_V: tl.constexpr):
    """G[row, :] = (exp(x - lse) - onehot(label)) * factor, rounded to G's dtype (G may be X)."""
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(G + row64 * stride_g + cols, to_dtype(g * factor, G.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "ignore_index", "scale"])
def _cross_entropy_fwd_kernel(X, Y, LOSS, LSE, G, ROW_SCALE, n_rows, V, stride_x, stride_g, ignore_index, scale,
                              WRITE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in range(pid, n_rows, nprog):
        row64 = tl.cast(row, tl.int64)  # (a Python int under the interpreter)
        label64 = tl.load(Y + row64)
        valid = label64 != ignore_index
        label = tl.where(valid, label64, -1).to(tl.int32)  # -1 matches no column
        m = -float("inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(X + row64 * stride_x + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every logit so far is -inf (a masked vocabulary), shift by 0: exp(-inf) = 0, not NaN.
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(X + row64 * stride_x + tl.maximum(label, 0)).to(tl.float32)
        tl.store(LOSS + row64, tl.where(valid, lse - target, 0.0))
        tl.store(LSE + row64, lse)
        if WRITE_GRAD:
            factor = tl.where(valid, scale, 0.0)
            if HAS_ROW_SCALE:
                factor = factor * tl.load(ROW_SCALE + row64)
            _grad_row(X, G, row64, V, stride_x, stride_g, label, lse, factor, BLOCK_V)


@triton.jit(do_not_specialize=["n_rows", "ignore_index", "scale"])
def _cross_entropy_bwd_kernel(X, Y, LSE, G, ROW_SCALE, n_rows, V, stride_x, stride_g, ignore_index, scale,
                              HAS_ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in range(pid, n_rows, nprog):
        row64 = tl.cast(row, tl.int64)  # (a Python int under the interpreter)
        label64 = tl.load(Y + row64)
        valid = label64 != ignore_index
        label = tl.where(valid, label64, -1).to(tl.int32)
        factor = tl.where(valid, scale, 0.0)
        if HAS_ROW_SCALE:
            factor = factor * tl.load(ROW_SCALE + row64)
        _grad_row(X, G, row64, V, stride_x, stride_g, label, tl.load(LSE + row64), factor, BLOCK_V)


def _block(V: int) -> int:
    return min(next_pow2(max(V, 1)), _BLOCK_V, MAX_TILE)


def _row_scale(row_scale: torch.Tensor | None, R: int, x: torch.Tensor) -> torch.Tensor:
    # Unused pointer when absent (HAS_ROW_SCALE=False): any fp32 tensor on the device.
    if row_scale is None:
        return torch.empty(1, dtype=torch.float32, device=x.device)
    return row_scale.reshape(R).to(device=x.device, dtype=torch.float32).contiguous()


def forward(x_RV: torch.Tensor, labels_R: torch.Tensor, ignore_index: int, *, grad: torch.Tensor | None = None,
            scale: float = 1.0, row_scale: torch.Tensor | None = None, loss: torch.Tensor | None = None):
    """(loss [R], lse [R]) in fp32 of logits x_RV (unit column stride; rows may be strided) against
    int64 labels. With `grad` [R, V] (unit column stride; may be x_RV itself, overwritten in place),
    also the gradient of sum_r(loss_r * scale * row_scale[r]) in grad's dtype. `loss` may be given
    (a contiguous fp32 [R] view to fill)."""
    R, V = x_RV.shape
    if loss is None:
        loss = torch.empty(R, dtype=torch.float32, device=x_RV.device)
    lse = torch.empty(R, dtype=torch.float32, device=x_RV.device)
    if R == 0:
        return loss, lse
    if V == 0:  # every label is ignore_index (checked by the op): no class, nothing to learn
        loss.zero_()
        lse.fill_(-float("inf"))
        return loss, lse
    assert x_RV.stride(1) == 1 and (grad is None or grad.stride(1) == 1)
    y = labels_R.contiguous()
    g = grad if grad is not None else x_RV
    block = _block(V)
    _cross_entropy_fwd_kernel[(grid(R),)](
        x_RV, y, loss, lse, g, _row_scale(row_scale, R, x_RV), R, V, x_RV.stride(0), g.stride(0), int(ignore_index),
        float(scale), WRITE_GRAD=grad is not None, HAS_ROW_SCALE=row_scale is not None, BLOCK_V=block,
        num_warps=num_warps(block))
    return loss, lse


def backward(x_RV: torch.Tensor, labels_R: torch.Tensor, lse_R: torch.Tensor, ignore_index: int, scale: float,
             row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """d(loss)/d(logits) [R, V] in x's dtype: (softmax - onehot) * scale (* row_scale[r]), 0 on ignored rows."""
    R, V = x_RV.shape
    dx = torch.empty((R, V), dtype=x_RV.dtype, device=x_RV.device)
    if dx.numel() == 0:
        return dx
    assert x_RV.stride(1) == 1
    block = _block(V)
    _cross_entropy_bwd_kernel[(grid(R),)](
        x_RV, labels_R.contiguous(), lse_R.to(torch.float32).contiguous(), dx, _row_scale(row_scale, R, x_RV), R, V,
        x_RV.stride(0), dx.stride(0), int(ignore_index), float(scale), HAS_ROW_SCALE=row_scale is not None,
        BLOCK_V=block, num_warps=num_warps(block))
    return dx
