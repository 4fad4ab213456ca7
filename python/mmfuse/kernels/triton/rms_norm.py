"""RMSNorm and fused add+RMSNorm in Triton (the contract: `mmfuse.ops.reference.rms_norm`).

Forward, HF Qwen2RMSNorm rounding: h = float32(x) (or the sum x + residual rounded to x's dtype and
stored), y = weight * round_to_x_dtype(h * rsqrt(mean(h^2) + eps)), the product in fp32 and rounded
once to y's dtype. Backward recomputes rstd from the row it reads anyway (nothing but the input is
saved): dx = rstd * (g - xn * mean(g * xn)) with g = dy * w, xn = x * rstd, plus the sum's own
gradient for add_rms_norm (added in fp32 before the one rounding); dweight = sum over rows of
dy * round(xn), accumulated in fp32 per program and summed over programs afterwards (no atomics:
the result does not depend on scheduling).

A program owns ROWS rows x BLOCK_D columns at a time (several rows when the hidden size is small,
so a program still moves a useful amount of data) and loops over row tiles. Rows up to MAX_TILE
wide stay in registers between the reduction and the normalisation; wider rows are processed in
column chunks, twice (sum of squares, then normalise), the second read coming from cache.

Shape legend: N rows (all leading dims), D hidden size, P programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import (MAX_TILE, grid, next_pow2, num_warps, reduction_programs, rows_2d,
                                           to_dtype)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_fwd_kernel(X, R, W, Y, S, n_rows, D, stride_x, stride_r, stride_y, stride_s, eps,
                         HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                         SINGLE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    x_dtype = X.dtype.element_ty
    y_dtype = Y.dtype.element_ty
    for tile in range(pid, n_tiles, nprog):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)[:, None]
        if SINGLE_CHUNK:
            cols = tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
                x = to_dtype(x.to(tl.float32) + r.to(tl.float32), x_dtype)
                tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
            h = x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            normed = to_dtype(h * rstd[:, None], x_dtype).to(tl.float32)
            tl.store(Y + rows64 * stride_y + cols[None, :], to_dtype(w[None, :] * normed, y_dtype), mask=mask)
        else:
            acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (cols < D)[None, :]
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
                    x = to_dtype(x.to(tl.float32) + r.to(tl.float32), x_dtype)
                    tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
                h = x.to(tl.float32)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / D + eps)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                col_mask = cols < D
                mask = row_mask[:, None] & col_mask[None, :]
                # The sum is recomputed from x and residual rather than read back from S: another
                # thread of this program may have written that element of S.
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
                    x = to_dtype(x.to(tl.float32) + r.to(tl.float32), x_dtype)
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
                normed = to_dtype(x.to(tl.float32) * rstd[:, None], x_dtype).to(tl.float32)
                tl.store(Y + rows64 * stride_y + cols[None, :], to_dtype(w[None, :] * normed, y_dtype), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_bwd_kernel(DY, X, W, DSUM, DX, DW_PARTIAL, n_rows, D, stride_dy, stride_x, stride_ds, stride_dx,
                         eps, HAS_DSUM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                         SINGLE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    x_dtype = X.dtype.element_ty
    dw_row = DW_PARTIAL + pid.to(tl.int64) * D
    if SINGLE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for tile in range(pid, n_tiles, nprog):
            rows = tile * ROWS + tl.arange(0, ROWS)
            rows64 = rows.to(tl.int64)[:, None]
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            xn = x * rstd[:, None]
            g = dy * w[None, :]
            dot = tl.sum(g * xn, axis=1) / D
            dx = rstd[:, None] * (g - xn * dot[:, None])
            if HAS_DSUM:
                dx += tl.load(DSUM + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64 * stride_dx + cols[None, :], to_dtype(dx, x_dtype), mask=mask)
            dw += tl.sum(dy * to_dtype(xn, x_dtype).to(tl.float32), axis=0)
        tl.store(dw_row + cols, dw, mask=col_mask)
    else:
        # The partial row (zeroed by the host) is accumulated chunk by chunk in global memory.
        for tile in range(pid, n_tiles, nprog):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            rows64 = rows.to(tl.int64)[:, None]
            sq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            gx = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                col_mask = cols < D
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
                sq += x * x
                gx += dy * w[None, :] * x
            rstd = tl.rsqrt(tl.sum(sq, axis=1) / D + eps)
            # mean(g * xn) = rstd * mean(g * x)
            dot = rstd * tl.sum(gx, axis=1) / D
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                col_mask = cols < D
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
                xn = x * rstd[:, None]
                g = dy * w[None, :]
                dx = rstd[:, None] * (g - xn * dot[:, None])
                if HAS_DSUM:
                    dx += tl.load(DSUM + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + rows64 * stride_dx + cols[None, :], to_dtype(dx, x_dtype), mask=mask)
                part = tl.load(dw_row + cols, mask=col_mask, other=0.0)
                tl.store(dw_row + cols, part + tl.sum(dy * to_dtype(xn, x_dtype).to(tl.float32), axis=0), mask=col_mask)
            # Orders this tile's partial-row stores before the next tile's loads of the same row
            # by other threads of the program.
            tl.debug_barrier()


def _tiling(D: int, max_tile: int) -> tuple[int, int, bool]:
    """(ROWS, BLOCK_D, single chunk): whole rows up to max_tile elements; below 2048 columns
    several rows per program (up to 16), so each program still streams ~2048 elements."""
    block = next_pow2(max(D, 1))
    if block > max_tile:
        return 1, max_tile, False
    return max(1, min(16, 2048 // block)), block, True


def forward(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float,
            out_dtype: torch.dtype, max_tile: int = MAX_TILE):
    """(y, sum or None): y = rms_norm(x (+ residual), weight) in out_dtype, shapes of x."""
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if x.numel() == 0:
        return y, s
    x_ND = rows_2d(x, D)
    r_ND = rows_2d(residual, D) if residual is not None else x_ND
    y_ND, s_ND = y.view(-1, D), (s.view(-1, D) if s is not None else y.view(-1, D))
    w = weight.contiguous()
    N = x_ND.shape[0]
    rows, block, single = _tiling(D, max_tile)
    _rms_norm_fwd_kernel[(grid(triton.cdiv(N, rows)),)](
        x_ND, r_ND, w, y_ND, s_ND, N, D, x_ND.stride(0), r_ND.stride(0), y_ND.stride(0), s_ND.stride(0), eps,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_D=block, SINGLE_CHUNK=single,
        num_warps=num_warps(rows * block))
    return y, s


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, dsum: torch.Tensor | None,
             max_tile: int = MAX_TILE):
    """(dx, dweight) of rms_norm at x (dx also carries dsum, the gradient reaching add_rms_norm's sum)."""
    D = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight)
    x_ND = rows_2d(x, D)
    dy_ND = rows_2d(dy, D)
    ds_ND = rows_2d(dsum.to(x.dtype), D) if dsum is not None else x_ND
    dx_ND = dx.view(-1, D)
    w = weight.contiguous()
    N = x_ND.shape[0]
    rows, block, single = _tiling(D, max_tile)
    programs = reduction_programs(triton.cdiv(N, rows), x.device)
    alloc = torch.empty if single else torch.zeros
    dw_PD = alloc((programs, D), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy_ND, x_ND, w, ds_ND, dx_ND, dw_PD, N, D, dy_ND.stride(0), x_ND.stride(0), ds_ND.stride(0),
        dx_ND.stride(0), eps, HAS_DSUM=dsum is not None, ROWS=rows, BLOCK_D=block, SINGLE_CHUNK=single,
        num_warps=num_warps(rows * block))
    return dx, dw_PD.sum(0).to(weight.dtype)
