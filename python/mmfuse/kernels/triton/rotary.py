"""Rotary embedding with cos/sin tables in Triton (the contract: `mmfuse.ops.reference.rotary`).

Each pair (x1, x2) of the first 2R channels becomes (x1 cos - x2 sin, x2 cos + x1 sin) in fp32,
rounded once to x's dtype; channels from 2R on are copied. Rotate-half pairs channel i with
i + R, interleaved pairs 2i with 2i + 1. The rotation is linear and orthogonal, so its gradient is
the rotation by the negative angle: the backward is this kernel with INVERSE (sin negated), and
there is no separate backward kernel.

A program handles one token at a time (looping over tokens past the grid limit): it loads that
token's cos/sin row once and applies it to every head, BLOCK_H heads per step. x is addressed by
token, head and channel strides, cos/sin by row and column strides, so transposed or sliced
inputs are read in place.

Shape legend: T tokens (B*S for 4-D x), H heads, D head dim, R rotated frequencies (<= D/2);
cos/sin have C rows (T, or S when one table serves every sequence of a batch: token t uses row t % C).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import MAX_TILE, grid, next_pow2, num_warps, to_dtype

# Channels copied per step of the pass-through tail (partial rotary).
_BLOCK_TAIL = 64


@triton.jit
def _rotate_heads(X, Y, H, R, stride_xh, stride_xd, stride_yh, c, s, r_mask,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotates the first 2R channels of every head of one token (X, Y already at the token)."""
    i = tl.arange(0, BLOCK_R)
    if INTERLEAVED:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + R
    for h0 in range(0, H, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads < H)[:, None] & r_mask[None, :]
        x_row = X + heads[:, None] * stride_xh
        x1 = tl.load(x_row + c1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + c2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c[None, :] - x2 * s[None, :]
        o2 = x2 * c[None, :] + x1 * s[None, :]
        y_row = Y + heads[:, None] * stride_yh
        tl.store(y_row + c1[None, :], to_dtype(o1, Y.dtype.element_ty), mask=mask)
        tl.store(y_row + c2[None, :], to_dtype(o2, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "table_rows"])
def _rotary_fwd_kernel(X, Y, COS, SIN, T, H, D, R, table_rows,
                       stride_xt, stride_xh, stride_xd, stride_yt, stride_yh,
                       stride_ct, stride_cr, stride_st, stride_sr,
                       INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, BLOCK_R)
    r_mask = i < R
    for t in range(pid, T, nprog):
        t64 = tl.cast(t, tl.int64)
        row = tl.cast(t % table_rows, tl.int64)
        c = tl.load(COS + row * stride_ct + i * stride_cr, mask=r_mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + row * stride_st + i * stride_sr, mask=r_mask, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        x_tok = X + t64 * stride_xt
        y_tok = Y + t64 * stride_yt
        _rotate_heads(x_tok, y_tok, H, R, stride_xh, stride_xd, stride_yh, c, s, r_mask,
                      INTERLEAVED, BLOCK_H, BLOCK_R)
        # Channels [2R, D) pass through unchanged.
        for p0 in range(2 * R, D, BLOCK_TAIL):
            p = p0 + tl.arange(0, BLOCK_TAIL)
            for h0 in range(0, H, BLOCK_H):
                heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
                mask = (heads < H)[:, None] & (p < D)[None, :]
                v = tl.load(x_tok + heads[:, None] * stride_xh + p[None, :] * stride_xd, mask=mask, other=0.0)
                tl.store(y_tok + heads[:, None] * stride_yh + p[None, :], v, mask=mask)


def head_block(H: int, block_r: int) -> int:
    """Heads per step: all of them (padded to a power of two) while the tile stays within MAX_TILE."""
    return max(1, min(next_pow2(H), MAX_TILE // block_r))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    """x [T, H, D] or [B, S, H, D] rotated by cos/sin [T, R] / [S, R] / [B, S, R]; a new tensor."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    H, D, R = x.shape[-2], x.shape[-1], cos.shape[-1]
    x_THD = x.reshape(-1, H, D)
    y_THD = y.view(-1, H, D)
    T = x_THD.shape[0]
    table_rows = math.prod(cos.shape[:-1])
    cos_CR = cos.reshape(table_rows, R)
    sin_CR = sin.reshape(table_rows, R)
    block_r = next_pow2(max(R, 1))
    block_h = head_block(H, block_r)
    _rotary_fwd_kernel[(grid(T),)](
        x_THD, y_THD, cos_CR, sin_CR, T, H, D, R, table_rows,
        x_THD.stride(0), x_THD.stride(1), x_THD.stride(2), y_THD.stride(0), y_THD.stride(1),
        cos_CR.stride(0), cos_CR.stride(1), sin_CR.stride(0), sin_CR.stride(1),
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_TAIL=_BLOCK_TAIL,
        num_warps=num_warps(block_h * block_r))
    return y
