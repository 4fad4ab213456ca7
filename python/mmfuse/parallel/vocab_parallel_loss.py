"""Summed next-token loss against a vocabulary split over tensor-parallel ranks, never holding the
N x V/tp logits: rows go in chunks, and per chunk the ranks all-reduce the row max, then the sum of
exp and the target's logit (the rank owning the target contributes it, the others 0). Gradients are
computed in the same pass (as ops.linear_cross_entropy does), so backward only scales them.

The gradient wrt hidden is this rank's share (its vocabulary's softmax terms). The sum over ranks
happens upstream: without sequence parallelism the module wraps hidden in copy_to_group; with it,
hidden comes from gather_sequence, whose backward reduce-scatter already sums.

Legend: N rows, D hidden, V vocab, Vr = V/tp this rank's vocabulary, C chunk rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmfuse.parallel.collectives import copy_to_group, group_rank, group_size

# 2048 rows x 75968 fp32 (7B vocab over tp2) = 594 MiB of logits: about what the full-vocab op
# holds at its default chunk, and enough rows for full-speed GEMMs.
DEFAULT_CHUNK_ROWS = 2048


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VrD, target_N, ignore_index: int, group, chunk_rows: int):
        vocab_start = group_rank(group) * weight_VrD.shape[0]
        vr = weight_VrD.shape[0]
        keep = (target_N != ignore_index).nonzero().squeeze(1)   # the same on every rank: targets are global
        h_nD, y_n = hidden_ND[keep], target_N[keep]
        n = keep.numel()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_nD = torch.empty_like(h_nD) if need_h else None
        dw_VrD = torch.zeros(weight_VrD.shape, dtype=torch.float32, device=weight_VrD.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        for s in range(0, n, chunk_rows):
            h_CD, y_C = h_nD[s:s + chunk_rows], y_n[s:s + chunk_rows]
            logits_CVr = (h_CD @ weight_VrD.t()).float()
            row_max = _all_reduce(logits_CVr.max(dim=1).values, group, dist.ReduceOp.MAX)
            local_y = y_C - vocab_start
            mine = (local_y >= 0) & (local_y < vr)
            rows = torch.arange(y_C.shape[0], device=y_C.device)
            tgt = torch.zeros_like(row_max)                         # target logit - max; 0 off this rank
            tgt[mine] = logits_CVr[rows[mine], local_y[mine]] - row_max[mine]
            logits_CVr.sub_(row_max.unsqueeze(1)).exp_()            # the buffer now holds exp(logit - max)
            sums = _all_reduce(torch.stack([logits_CVr.sum(dim=1), tgt]), group)   # one all-reduce for both
            sum_exp, tgt_shifted = sums[0], sums[1]
            total += (sum_exp.log() - tgt_shifted).sum()
            if need_h or need_w:
                grad_CVr = logits_CVr.div_(sum_exp.unsqueeze(1))  # softmax, in place
                grad_CVr[rows[mine], local_y[mine]] -= 1.0
                g = grad_CVr.to(weight_VrD.dtype)
                if need_h:
                    torch.mm(g, weight_VrD, out=dh_nD[s:s + chunk_rows])
                if need_w:
                    dw_VrD.addmm_(grad_CVr.t(), h_CD.float())
        dh_ND = None
        if need_h:
            dh_ND = torch.zeros_like(hidden_ND)
            dh_ND[keep] = dh_nD
        ctx.save_for_backward(dh_ND, None if dw_VrD is None else dw_VrD.to(weight_VrD.dtype))
        return total.to(hidden_ND.dtype)

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * dloss, None if dw is None else dw * dloss, None, None, None, None)


class VocabParallelLinearCrossEntropy(nn.Module):
    """Drop-in for LinearCrossEntropyLoss with the LM head split over vocabulary: hidden [N, D] (every
    rank the same rows), this rank's weight rows [V/tp, D], global targets [N]. Returns the summed
    loss, identical on every rank."""

    def __init__(self, group, sequence_parallel: bool, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        super().__init__()
        self.group, self.sequence_parallel, self.chunk_rows = group, sequence_parallel, chunk_rows

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                ignore_index: int = -100) -> torch.Tensor:
        if not self.sequence_parallel:
            hidden = copy_to_group(hidden, self.group)   # backward: sum the ranks' shares of dhidden
        return _VocabParallelLCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                       ignore_index, self.group, self.chunk_rows)

    def extra_repr(self) -> str:
        return f"sequence_parallel={self.sequence_parallel}, chunk_rows={self.chunk_rows}"
