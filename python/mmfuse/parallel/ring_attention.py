"""Ring attention over zigzag-sharded packed samples (cp_sharding.py): each rank keeps its queries
and passes its keys/values around the ring; partial results are combined by their LSE
(ops.attention_merge). Only the text decoder uses it: the vision blocks use an all-to-all (cp_vision.py).

Step s (0 ≤ s < cp) on rank r works on the K/V of rank j = (r - s) mod cp. With rank r holding
chunks r and 2cp-1-r of every sample (chunk size c = L/(2cp)):

  j == r   causal attention of the local queries over the local keys;
  j <  r   all local queries over the first half (chunk j) of each remote sample, non-causal
           (chunk 2cp-1-j lies after both local chunks);
  j >  r   the second half of the local queries (chunk 2cp-1-r) over all remote keys, non-causal
           (chunk r lies before both remote chunks).

Every step after the first costs half a full block of attention on every rank, so ranks stay balanced.

Backward is written by hand (flash-attention's ring backward): the K/V go around the ring again,
each with a dK/dV accumulator that travels with it, and each block's gradients come from
attention_backward with the FINAL out and lse (P_block = exp(S - lse) is then the block's share of
the full softmax, and rowsum(dO·O) is the full one), so nothing per step is saved.

Memory per rank and layer (T tokens in the stream, H / Hk query / kv heads, d head dim): autograd
keeps q, k, v, out [T/cp, ·, d] and lse [H, T/cp], i.e. O(T/cp); while a layer runs, two K/V blocks
(2·2·T/cp·Hk·d: the one in use and the one arriving) and in backward two fp32 dK/dV accumulators
more. The score matrix is never materialised (flash-style kernel).

Communication per layer: forward sends K/V (2·T/cp·Hk·d elements) to the next rank cp-1 times;
backward sends K/V cp-1 times and the dK/dV accumulators (fp32, same element count) cp times, all in
the same direction. Each K/V transfer is posted before the current block's attention and waited for
after it, so it overlaps compute (forward and backward); a dK/dV transfer overlaps the next block's
wait only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmfuse import ops
from mmfuse.parallel.collectives import group_rank, group_size

_KV_TAG, _DKV_TAG = 0, 1      # two transfers may be in flight at once in backward


@dataclass
class _Transfer:
    """A ring shift in flight: x sent to the next rank, `buffer` filling from the previous one."""
    buffer: torch.Tensor
    works: list
    sent: torch.Tensor           # kept alive until the send completes

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.buffer


def _shift(x: torch.Tensor, group, tag: int) -> _Transfer:
    n, r = group_size(group), group_rank(group)
    nxt, prev = dist.get_global_rank(group, (r + 1) % n), dist.get_global_rank(group, (r - 1) % n)
    x = x.contiguous()
    buffer = torch.empty_like(x)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group, tag),
                                    dist.P2POp(dist.irecv, buffer, prev, group, tag)])
    return _Transfer(buffer, works, x)


@dataclass
class _Halves:
    """Index tensors of the two local chunks of every sample (built once per forward)."""
    first: torch.Tensor          # int64 local positions of chunk r of each sample
    second: torch.Tensor         # int64 local positions of chunk 2cp-1-r of each sample
    cu: torch.Tensor             # int32 cu_seqlens of either half (c per sample)
    max_len: int

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
        return cls(first_t, second_t, cu, max_len)


@dataclass
class _Block:
    """What one step attends: query rows (None = all local) against key rows (None = all received)."""
    q_rows: torch.Tensor | None
    k_rows: torch.Tensor | None
    cu_q: torch.Tensor
    max_q: int
    cu_k: torch.Tensor
    max_k: int
    causal: bool


def _block(j: int, rank: int, causal: bool, cu: torch.Tensor, max_seqlen: int, halves: _Halves | None) -> _Block:
    if not causal:
        return _Block(None, None, cu, max_seqlen, cu, max_seqlen, False)
    if j == rank:
        return _Block(None, None, cu, max_seqlen, cu, max_seqlen, True)
    if j < rank:
        return _Block(None, halves.first, cu, max_seqlen, halves.cu, halves.max_len, False)
    return _Block(halves.second, None, halves.cu, halves.max_len, cu, max_seqlen, False)


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, rows: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    return x if rows is None else x.index_select(dim, rows)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen: int, causal: bool, group):
        cp, rank = group_size(group), group_rank(group)
        halves = _Halves.of(cu) if causal else None
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = _acc_dtype(q)                            # partial outputs merged in fp32, rounded once
        kv = torch.stack([k, v])                       # one transfer per step for K and V
        out = lse = pending = None
        for step in range(cp):
            if step:
                kv = pending.wait()
            if step + 1 < cp:
                pending = _shift(kv, group, _KV_TAG)   # in flight while this block runs
            b = _block((rank - step) % cp, rank, causal, cu, max_seqlen, halves)
            o, l = ops.attention(_rows(q, b.q_rows), _rows(kv[0], b.k_rows), _rows(kv[1], b.k_rows), b.cu_q,
                                 b.cu_k, b.max_q, b.max_k, causal=b.causal, softmax_scale=scale, return_lse=True)
            o = o.to(acc)
            if out is None:
                out, lse = o, l
            elif b.q_rows is None:
                out, lse = ops.attention_merge(out, lse, o, l)
            else:
                o, l = ops.attention_merge(_rows(out, b.q_rows), _rows(lse, b.q_rows, 1), o, l)
                out, lse = out.index_copy(0, b.q_rows, o), lse.index_copy(1, b.q_rows, l)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.args = (max_seqlen, causal, group, halves, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        max_seqlen, causal, group, halves, scale = ctx.args
        cp, rank = group_size(group), group_rank(group)
        acc = _acc_dtype(q)                            # gradients summed over cp blocks
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)    # travels with the K/V it belongs to
        kv_pending = dkv_pending = None
        for step in range(cp):
            if step:
                kv, dkv = kv_pending.wait(), dkv_pending.wait()
            if step + 1 < cp:
                kv_pending = _shift(kv, group, _KV_TAG)
            b = _block((rank - step) % cp, rank, causal, cu, max_seqlen, halves)
            dq_b, dk_b, dv_b = torch.ops.mmfuse.attention_backward(
                _rows(dout, b.q_rows), None, _rows(q, b.q_rows), _rows(kv[0], b.k_rows), _rows(kv[1], b.k_rows),
                _rows(out, b.q_rows), _rows(lse, b.q_rows, 1), b.cu_q, b.cu_k, b.causal, scale, -1, -1)
            if b.q_rows is None:
                dq += dq_b
            else:
                dq.index_add_(0, b.q_rows, dq_b.to(acc))
            if b.k_rows is None:
                dkv[0] += dk_b
                dkv[1] += dv_b
            else:
                dkv[0].index_add_(0, b.k_rows, dk_b.to(acc))
                dkv[1].index_add_(0, b.k_rows, dv_b.to(acc))
            # After cp shifts each accumulator is back with the rank that owns its K/V.
            dkv_pending = _shift(dkv, group, _DKV_TAG)
        dkv = dkv_pending.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


class RingAttention(nn.Module):
    """Drop-in for CoreAttention (same forward signature) on zigzag-local q [T/cp, H, d] and
    k/v [T/cp, Hk, d] with local cu_seqlens. causal=False gives all K/V to all queries (no zigzag
    rules needed: any sharding works)."""

    def __init__(self, cp_group, causal: bool = True):
        super().__init__()
        self.group, self.causal = cp_group, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        if group_size(self.group) == 1:
            return ops.attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal)
        return _RingAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), self.causal, self.group)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, cp={group_size(self.group)}"
