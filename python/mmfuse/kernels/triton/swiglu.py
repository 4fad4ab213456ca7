"""SwiGLU, silu(gate) * up, in Triton (the contract: `mmfuse.ops.reference.swiglu`).

fp32 math, one rounding per output. The backward recomputes s = sigmoid(gate) from the gate it
reads anyway (no activation is saved): dgate = dout * up * s * (1 + gate * (1 - s)),
dup = dout * gate * s. The packed form reads gate and up as the two halves of each [gate | up] row
and writes its gradient in the same layout, so neither direction splits or concatenates.

Rows are addressed through a row stride and unit column stride, so a packed tensor's halves, a
slice of the last dim or a row-broadcast gradient are read in place. A program owns ROWS rows x
BLOCK_N columns and loops over tiles.

Shape legend: M rows (all leading dims), N columns (the intermediate size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.kernels.triton._common import grid, next_pow2, num_warps, rows_2d, to_dtype

# Columns per tile: 2048 bf16 columns are 4 KiB per tensor, enough per program to stream at full
# bandwidth; narrower rows are grouped so a tile still holds ~2048 elements.
_BLOCK_N = 2048


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_fwd_kernel(G, U, O, n_rows, N, stride_g, stride_u, stride_o,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(n_rows, ROWS) * col_tiles
    for tile in range(pid, n_tiles, nprog):
        rows = (tile // col_tiles) * ROWS + tl.arange(0, ROWS)
        cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        tl.store(O + rows64 * stride_o + cols[None, :], to_dtype(g * s * u, O.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_bwd_kernel(DO, G, U, DG, DU, n_rows, N, stride_do, stride_g, stride_u, stride_dg, stride_du,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(n_rows, ROWS) * col_tiles
    for tile in range(pid, n_tiles, nprog):
        rows = (tile // col_tiles) * ROWS + tl.arange(0, ROWS)
        cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        d = tl.load(DO + rows64 * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        ds = d * s
        tl.store(DG + rows64 * stride_dg + cols[None, :], to_dtype(ds * u * (1.0 + g * (1.0 - s)), DG.dtype.element_ty),
                 mask=mask)
        tl.store(DU + rows64 * stride_du + cols[None, :], to_dtype(ds * g, DU.dtype.element_ty), mask=mask)


def _tiling(N: int) -> tuple[int, int]:
    block = min(next_pow2(max(N, 1)), _BLOCK_N)
    return max(1, min(16, _BLOCK_N // block)), block


def _launch_fwd(g_MN, u_MN, out_MN):
    M, N = g_MN.shape
    rows, block = _tiling(N)
    tiles = triton.cdiv(M, rows) * triton.cdiv(N, block)
    _swiglu_fwd_kernel[(grid(tiles),)](g_MN, u_MN, out_MN, M, N, g_MN.stride(0), u_MN.stride(0), out_MN.stride(0),
                                       ROWS=rows, BLOCK_N=block, num_warps=num_warps(rows * block))


def _launch_bwd(d_MN, g_MN, u_MN, dg_MN, du_MN):
    M, N = g_MN.shape
    rows, block = _tiling(N)
    tiles = triton.cdiv(M, rows) * triton.cdiv(N, block)
    _swiglu_bwd_kernel[(grid(tiles),)](d_MN, g_MN, u_MN, dg_MN, du_MN, M, N, d_MN.stride(0), g_MN.stride(0),
                                       u_MN.stride(0), dg_MN.stride(0), du_MN.stride(0),
                                       ROWS=rows, BLOCK_N=block, num_warps=num_warps(rows * block))


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel():
        N = gate.shape[-1]
        _launch_fwd(rows_2d(gate, N), rows_2d(up, N), out.view(-1, N))
    return out


def backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel():
        N = gate.shape[-1]
        _launch_bwd(rows_2d(dout.to(gate.dtype), N), rows_2d(gate, N), rows_2d(up, N), dgate.view(-1, N),
                    dup.view(-1, N))
    return dgate, dup


def packed_forward(x: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if out.numel():
        x_M2N = rows_2d(x, 2 * N)
        _launch_fwd(x_M2N[:, :N], x_M2N[:, N:], out.view(-1, N))
    return out


def packed_backward(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        x_M2N = rows_2d(x, 2 * N)
        dx_M2N = dx.view(-1, 2 * N)
        _launch_bwd(rows_2d(dout.to(x.dtype), N), x_M2N[:, :N], x_M2N[:, N:], dx_M2N[:, :N], dx_M2N[:, N:])
    return dx
