"""Ulysses (DeepSpeed) attention over zigzag-sharded packed samples: an all-to-all turns this
rank's T/cp tokens of all heads into all T tokens of H/cp heads, attention runs on whole samples,
and the inverse all-to-all brings the result back. This is the text decoder's; the vision blocks
use cp_vision.VisionUlyssesAttention for both cp kinds (contiguous row shards, no zigzag: their
attention is non-causal, windowed and short).

Shape legend: T tokens of the padded stream, H / Hk query / kv heads, d head dim.

Communication per layer: four all-to-alls in forward (q, k, v, out) and four in backward (their
gradients); each moves (cp-1)/cp of a local [T/cp, heads, d] tensor (k/v after repetition), so the
volume per rank falls as 1/cp (the ring moves (cp-1)/cp·T tokens of K/V per rank). Attention memory is that of T
tokens over H/cp heads.

cp must divide the query heads; when it does not divide the kv heads, each kv head is repeated so
every rank gets whole heads (query head h still reads kv head h // (H/Hk)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmfuse import ops
from mmfuse.parallel.collectives import all_to_all, group_size
from mmfuse.parallel.cp_sharding import zigzag_index


def check_heads(num_heads: int, cp: int) -> None:
    if num_heads % cp:
        raise ValueError(f"Ulysses context parallelism splits attention heads over cp ranks: cp = {cp} must divide "
                         f"the query heads ({num_heads}); use ring attention or another cp")


def kv_repeats(num_heads: int, num_kv_heads: int, cp: int) -> int:
    """How often to repeat each kv head so cp divides them; it always divides the GQA group size
    H/Hk when cp divides H, so the grouping stays valid."""
    return cp // math.gcd(num_kv_heads, cp)


def _gathered_order(cu_local: torch.Tensor, cp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global cu_seqlens, to_natural, to_gathered): after the all-to-all, row i holds the token at
    stream position gathered[i] (rank-major, zigzag within each rank)."""
    cu = cu_local.to(torch.int64) * cp
    gathered = torch.cat([zigzag_index(cu, cp, rank) for rank in range(cp)])
    return cu.to(torch.int32), torch.argsort(gathered), gathered


class UlyssesAttention(nn.Module):
    """Drop-in for CoreAttention on zigzag-local q [T/cp, H, d], k/v [T/cp, Hk, d] and the local
    cu_seqlens (every sample holds L/cp tokens per rank, so the global ones are cp times them)."""

    def __init__(self, cp_group, causal: bool = True):
        super().__init__()
        self.group, self.causal = cp_group, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        cp = group_size(self.group)
        if cp == 1:
            return ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal)
        check_heads(q.shape[1], cp)
        rep = kv_repeats(q.shape[1], k.shape[1], cp)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        cu, to_natural, to_gathered = _gathered_order(cu_seqlens, cp)
        q_THd, k_THd, v_THd = (all_to_all(x, self.group, 1, 0).index_select(0, to_natural) for x in (q, k, v))
        out_THd = ops.attention(q_THd, k_THd, v_THd, cu, cu, max_seqlen * cp, max_seqlen * cp, causal=self.causal)
        return all_to_all(out_THd.index_select(0, to_gathered), self.group, 0, 1)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, cp={group_size(self.group)}"

