"""Context parallelism for the vision tower: each CP rank runs the ViT blocks on a contiguous 1/cp of
the (window-ordered) patch rows, and every block's attention is a Ulysses all-to-all over heads.

  pad_vision           one all-zero image appended so the rows split evenly over cp (vision_padding.py)
  shard_vision         this rank's contiguous rows of the patch embeddings
  local_vision_inputs  the rotary cos/sin of those rows (the windows keep describing the whole
                       stream: the attention sees every row, after its all-to-all)
  gather_vision        all-gather before the merger, which runs whole on every rank

The vision attention uses Ulysses for both cp kinds: it is non-causal (no load imbalance to balance,
so contiguous shards, not zigzag), windowed and short (64-patch windows, one frame for the full-
attention blocks), so a ring would pass K/V blocks that mostly meet no query of their window, while
the all-to-all gives each rank every row of H/cp heads and the windows stay whole.

Gradients: each CP rank's loss covers only its own tokens (the caller sums gradients over dp·cp),
so the merger's input gradient is partial on every rank and the gather's backward must sum it over
cp (reduce-scatter, `gather_sequence`), not keep the local slice as sequence parallel does (there
every TP rank computes the same, whole loss). For the same reason the shard's backward puts this
rank's rows' gradient in place with zeros elsewhere (a slice): the patch embedding runs whole on
every CP rank, and its weight gradient is then a partial sum like every other one.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmfuse import ops
from mmfuse.parallel.collectives import all_to_all, gather_sequence, group_size


def check_vision_heads(num_heads: int, cp: int, where: str = "") -> None:
    if num_heads % cp:
        raise ValueError(f"context parallelism splits the vision attention's heads over cp ranks (an all-to-all, "
                         f"for both cp kinds): cp = {cp} must divide the vision heads{where} ({num_heads})")


def local_rows(rows: int, cp: int, rank: int) -> slice:
    """Rank `rank`'s contiguous share of `rows` patch rows (pad_vision makes cp divide them)."""
    if rows % cp:
        raise ValueError(f"context parallel vision tower: {rows} patch rows do not split over cp = {cp} "
                         "(pad them with the transforms' pad_vision first)")
    n = rows // cp
    return slice(rank * n, (rank + 1) * n)


def shard_rows(x_TD: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's rows; backward: their gradient in place, zeros elsewhere (see the module docstring)."""
    return x_TD[local_rows(x_TD.shape[0], cp, rank)]


def local_vision_inputs(ctx, cp: int, rank: int):
    """VisionInputs with the per-row rotary cos/sin cut to this rank's rows. Copies, not views: the
    blocks keep them for backward, and a view would keep the whole tables alive."""
    rows = local_rows(ctx.cos.shape[0], cp, rank)
    return dataclasses.replace(ctx, cos=ctx.cos[rows].clone(), sin=ctx.sin[rows].clone())


def gather_rows(x_TD: torch.Tensor, cp_group) -> torch.Tensor:
    """Every rank's rows, in rank order (the natural order: shards are contiguous); backward sums the
    partial gradients over cp and keeps this rank's rows."""
    return gather_sequence(x_TD, cp_group)


class VisionUlyssesAttention(nn.Module):
    """Drop-in for the vision blocks' CoreAttention(causal=False) on this rank's rows q/k/v [T/cp, H, d]
    with the whole stream's (window or frame) cu_seqlens: all-to-all to [T, H/cp, d], attention, and
    back. No reordering: rank-major order of contiguous shards is the stream's order.

    Communication per block: four all-to-alls forward (q, k, v, out) and four backward, each sending
    (cp-1)/cp of a local [T/cp, H, d] tensor."""

    causal = False

    def __init__(self, cp_group):
        super().__init__()
        self.group = cp_group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        cp = group_size(self.group)
        if cp > 1:
            check_vision_heads(q.shape[1], cp, " on this rank")
            q, k, v = (all_to_all(x, self.group, 1, 0) for x in (q, k, v))
        out_THd = ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return all_to_all(out_THd, self.group, 0, 1)

    def extra_repr(self) -> str:
        return f"cp={group_size(self.group)}"
