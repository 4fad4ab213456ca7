"""Ring attention over zigzag-sharded packed samples (cp_sharding.py): each rank keeps its queries
and passes its keys/values around the ring; partial results are combined by their LSE
(ops.attention_merge). Only the text decoder uses it: the vision tower runs whole on every CP rank.

Step s (0 ≤ s < cp) on rank r works on the K/V of rank j = (r - s) mod cp. With rank r holding
chunks r and 2cp-1-r of every sample (chunk size c = L/(2cp)):

  j == r   causal attention of the local queries over the local keys;
  j <  r   all local queries over the first half (chunk j) of each remote sample, non-causal
           (chunk 2cp-1-j lies after both local chunks);
  j >  r   the second half of the local queries (chunk 2cp-1-r) over all remote keys, non-causal
           (chunk r lies before both remote chunks).

Every step after the first costs half a full block of attention on every rank, so the ranks stay
balanced. The backward is autograd through ops.attention (whose lse is differentiable),
attention_merge and a ring shift whose backward sends the gradient the other way.

Memory per rank (T tokens in the stream, Hk kv heads, d head dim): the local q/k/v/out are T/cp
tokens. Autograd keeps, per step, the K/V block received (2·T/cp·Hk·d) plus that step's partial
out and lse (the half or whole of T/cp·H·d) for the backward, so one layer holds O(cp · T/cp) =
O(T) K/V and partial outputs at the end of its forward. That is the price of the autograd
composition; a hand-written backward that re-sends K/V around the ring (as Megatron's does)
would keep O(T/cp). The score matrix is never materialised (flash-style kernel).

Communication per layer: forward sends K/V (2·T/cp·Hk·d elements) to the next rank cp-1 times;
backward sends the dK/dV of the same size cp-1 times in the other direction. The next block's K/V
transfer is posted before the current block's attention and waited for after it, so it overlaps
the compute in forward; the backward shifts are synchronous (not overlapped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmfuse import ops
from mmfuse.parallel.collectives import group_rank, group_size


def _ring_peers(group) -> tuple[int, int]:
    """(next, previous) global ranks in the ring (p2p calls take global ranks)."""
    n, r = group_size(group), group_rank(group)
    return dist.get_global_rank(group, (r + 1) % n), dist.get_global_rank(group, (r - 1) % n)


def _exchange(send: torch.Tensor, to: int, frm: int, group) -> tuple[torch.Tensor, list]:
    """Post send → `to` and receive ← `frm` (same shape); returns the buffer and the works to wait on."""
    recv = torch.empty_like(send)
    ops_ = [dist.P2POp(dist.isend, send, to, group), dist.P2POp(dist.irecv, recv, frm, group)]
    return recv, dist.batch_isend_irecv(ops_)


@dataclass
class _Pending:
    """A ring transfer in flight: the received buffer and the works to wait for."""
    buffer: torch.Tensor
    works: list
    group: object


def start_shift(x: torch.Tensor, group) -> _Pending:
    nxt, prev = _ring_peers(group)
    buffer, works = _exchange(x.detach().contiguous(), nxt, prev, group)
    return _Pending(buffer, works, group)


class _FinishShift(torch.autograd.Function):
    """Forward: wait for the transfer `start_shift(x)` posted and return what arrived from the
    previous rank. Backward: the gradient goes the other way (to the previous rank, from the next)."""

    @staticmethod
    def forward(ctx, x, pending: _Pending):
        ctx.group = pending.group
        for w in pending.works:
            w.wait()
        return pending.buffer

    @staticmethod
    def backward(ctx, g):
        nxt, prev = _ring_peers(ctx.group)
        out, works = _exchange(g.contiguous(), prev, nxt, ctx.group)
        for w in works:
            w.wait()
        return out, None


def finish_shift(x: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return _FinishShift.apply(x, pending)


@dataclass
class _Halves:
    """Index tensors of the two local chunks of every sample (built once per forward)."""
    first: torch.Tensor          # int64 local positions of chunk r of each sample
    second: torch.Tensor         # int64 local positions of chunk 2cp-1-r of each sample
    cu: torch.Tensor             # int32 cu_seqlens of either half (c per sample)
    max_len: int
    inverse: torch.Tensor        # local order from cat(first-half rows, second-half rows)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor) -> "_Halves":
        bounds = [int(b) for b in cu_seqlens.tolist()]
        first, second, half = [], [], [0]
        for a, b in zip(bounds, bounds[1:]):
            if (b - a) % 2:
                raise ValueError(f"ring attention: a local sample has {b - a} tokens; zigzag sharding gives "
                                 "every sample an even count (two equal chunks): shard with cp_sharding first")
            c = (b - a) // 2
            first.append(torch.arange(a, a + c))
            second.append(torch.arange(a + c, b))
            half.append(half[-1] + c)
        dev = cu_seqlens.device
        first_t = torch.cat(first).to(dev) if first else torch.zeros(0, dtype=torch.int64, device=dev)
        second_t = torch.cat(second).to(dev) if second else torch.zeros(0, dtype=torch.int64, device=dev)
        cu = torch.tensor(half, dtype=torch.int32, device=dev)
        max_len = max((y - x for x, y in zip(half, half[1:])), default=0)
        return cls(first_t, second_t, cu, max_len, torch.argsort(torch.cat([first_t, second_t])))


class RingAttention(nn.Module):
    """Drop-in for CoreAttention (same forward signature) on zigzag-local q [T/cp, H, d] and
    k/v [T/cp, Hk, d] with local cu_seqlens. causal=False passes all K/V to all queries (no zigzag
    rules needed, any sharding works)."""

    def __init__(self, cp_group, causal: bool = True):
        super().__init__()
        self.group, self.causal = cp_group, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        cp, rank = group_size(self.group), group_rank(self.group)
        if cp == 1:
            return ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal)
        if not self.causal:
            return self._full(q, k, v, cu_seqlens, max_seqlen, cp)
        halves = _Halves.of(cu_seqlens)
        kv = torch.stack([k, v])                               # one transfer per step for K and V
        pending = start_shift(kv, self.group)                  # in flight while the local block runs
        out, lse = ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                 return_lse=True)
        # Results kept per half: the first half of the queries takes no part in steps j > r.
        out1, lse1 = out.index_select(0, halves.first), lse.index_select(1, halves.first)
        out2, lse2 = out.index_select(0, halves.second), lse.index_select(1, halves.second)
        q2 = q.index_select(0, halves.second)
        for step in range(1, cp):
            kv = finish_shift(kv, pending)
            pending = start_shift(kv, self.group) if step + 1 < cp else None
            j = (rank - step) % cp
            if j < rank:
                kf, vf = kv[0].index_select(0, halves.first), kv[1].index_select(0, halves.first)
                o, l = ops.attention(q, kf, vf, cu_seqlens, halves.cu, max_seqlen, halves.max_len,
                                     causal=False, return_lse=True)
                out1, lse1 = ops.attention_merge(out1, lse1, o.index_select(0, halves.first),
                                                 l.index_select(1, halves.first))
                out2, lse2 = ops.attention_merge(out2, lse2, o.index_select(0, halves.second),
                                                 l.index_select(1, halves.second))
            else:
                o, l = ops.attention(q2, kv[0], kv[1], halves.cu, cu_seqlens, halves.max_len, max_seqlen,
                                     causal=False, return_lse=True)
                out2, lse2 = ops.attention_merge(out2, lse2, o, l)
        return torch.cat([out1, out2]).index_select(0, halves.inverse)

    def _full(self, q, k, v, cu_seqlens, max_seqlen, cp):
        kv = torch.stack([k, v])
        pending = start_shift(kv, self.group)
        out, lse = ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False,
                                 return_lse=True)
        for step in range(1, cp):
            kv = finish_shift(kv, pending)
            pending = start_shift(kv, self.group) if step + 1 < cp else None
            o, l = ops.attention(q, kv[0], kv[1], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False,
                                 return_lse=True)
            out, lse = ops.attention_merge(out, lse, o, l)
        return out

    def extra_repr(self) -> str:
        return f"causal={self.causal}, cp={group_size(self.group)}"
