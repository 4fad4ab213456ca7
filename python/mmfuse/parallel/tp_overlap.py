"""Sequence-parallel linears with their collectives overlapped by the GEMMs (the idea of Megatron's
tp-comm-overlap / torchtitan's async TP, with plain async collectives): tokens go in k chunks, and
while chunk i is multiplied, chunk i+1 is being all-gathered (column) or chunk i-1 reduce-scattered
(row). Backward overlaps the conjugate collective the same way. Results equal the unchunked layers:
every row's GEMM and every collective's sum see the same operands.

Chunks are taken within each rank's T/tp tokens, so chunk i of the full sequence is rows
[r·t + off_i, r·t + off_i + c_i) of every rank r: seen as [tp, t, C], it is x[:, off_i:off_i + c_i].
Legend: t = T/tp tokens per rank, D input width, O output width (this rank's share for column), C any.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmfuse.parallel.collectives import group_size

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _bounds(t: int, k: int) -> list[tuple[int, int]]:
    edges = [round(i * t / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _gather_async(x_cC: torch.Tensor, tp: int, group):
    out = x_cC.new_empty((tp * x_cC.shape[0],) + tuple(x_cC.shape[1:]))   # gloo wants the flat form
    work = _all_gather(out, x_cC.contiguous(), group=group, async_op=True)
    return out.view((tp,) + tuple(x_cC.shape)), work


def _scatter_async(y_tpcC: torch.Tensor, group):
    out = y_tpcC.new_empty(tuple(y_tpcC.shape[1:]))
    return out, _reduce_scatter(out, y_tpcC.contiguous().flatten(0, 1), group=group, async_op=True)


def _gather_apply(x_tC: torch.Tensor, tp: int, group, k: int, fn) -> torch.Tensor:
    """fn applied to every rank's rows of each chunk ([tp, c, C] -> [tp, c, C']), gathering chunk i+1
    while fn runs on chunk i; the results as [tp, t, C']."""
    bounds = _bounds(x_tC.shape[0], k)
    pending = _gather_async(x_tC[bounds[0][0]:bounds[0][1]], tp, group)
    outs = []
    for i in range(len(bounds)):
        buf, work = pending
        if i + 1 < len(bounds):
            a, b = bounds[i + 1]
            pending = _gather_async(x_tC[a:b], tp, group)
        work.wait()
        outs.append(fn(buf, bounds[i]))
    return torch.cat(outs, dim=1)


def _apply_scatter(t: int, group, k: int, fn) -> torch.Tensor:
    """fn(bounds) -> [tp, c, C] partial sums per chunk, reduce-scattered while the next chunk is
    computed; the summed rows of this rank as [t, C]."""
    works, outs = [], []
    for bounds in _bounds(t, k):
        out, work = _scatter_async(fn(bounds), group)
        works.append(work)
        outs.append(out)
    for work in works:
        work.wait()
    return torch.cat(outs)


class _GatherLinear(torch.autograd.Function):
    """y [T, O] = all_gather(x [t, D]) @ W^T + b."""

    @staticmethod
    def forward(ctx, x_tD, weight_OD, bias_O, group, k):
        tp = group_size(group)
        kept = []

        def gemm(buf_tpcD, _):
            kept.append(buf_tpcD)
            return F.linear(buf_tpcD, weight_OD, bias_O)

        y_tptO = _gather_apply(x_tD, tp, group, k, gemm)
        ctx.save_for_backward(torch.cat(kept, dim=1), weight_OD)   # the gathered input, as unchunked would keep
        ctx.group, ctx.k, ctx.has_bias = group, k, bias_O is not None
        return y_tptO.flatten(0, 1)

    @staticmethod
    def backward(ctx, dy_TO):
        x_tptD, weight_OD = ctx.saved_tensors
        tp, t = x_tptD.shape[0], x_tptD.shape[1]
        dy_TO = dy_TO.contiguous()
        dy_tptO = dy_TO.view(tp, t, -1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _apply_scatter(t, ctx.group, ctx.k, lambda ab: dy_tptO[:, ab[0]:ab[1]] @ weight_OD)
        dw = dy_TO.t() @ x_tptD.flatten(0, 1) if ctx.needs_input_grad[1] else None
        db = dy_TO.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


class _LinearReduceScatter(torch.autograd.Function):
    """y [t, O] = reduce_scatter(x [T, I] @ W^T)."""

    @staticmethod
    def forward(ctx, x_TI, weight_OI, group, k):
        tp = group_size(group)
        x_tptI = x_TI.reshape(tp, -1, x_TI.shape[-1])
        ctx.save_for_backward(x_TI, weight_OI)
        ctx.group, ctx.k = group, k
        return _apply_scatter(x_tptI.shape[1], group, k, lambda ab: x_tptI[:, ab[0]:ab[1]] @ weight_OI.t())

    @staticmethod
    def backward(ctx, dy_tO):
        x_TI, weight_OI = ctx.saved_tensors
        tp = group_size(ctx.group)
        dy_chunks = []

        def dgrad(buf_tpcO, _):
            dy_chunks.append(buf_tpcO)
            return buf_tpcO @ weight_OI

        dx_tptI = _gather_apply(dy_tO, tp, ctx.group, ctx.k, dgrad)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = torch.cat(dy_chunks, dim=1).flatten(0, 1).t() @ x_TI
        return dx_tptI.flatten(0, 1), dw, None, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group, k: int) -> torch.Tensor:
    """ColumnParallelLinear under SP with the all-gather in k overlapped chunks (backward: reduce-scatter)."""
    return _GatherLinear.apply(x, weight, bias, group, k)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group, k: int) -> torch.Tensor:
    """RowParallelLinear under SP (no bias) with the reduce-scatter in k overlapped chunks (backward: all-gather)."""
    return _LinearReduceScatter.apply(x, weight, group, k)
