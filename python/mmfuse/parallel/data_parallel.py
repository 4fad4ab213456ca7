"""Data-parallel gradient reduction in buckets, overlapped with backward (the design of PyTorch DDP
and Megatron's DistributedDataParallel, without wrapping the model):

    reducer = GradReducer(model.named_parameters(), state.dp_group, bucket_mb=25, overlap=True)
    for i, micro in enumerate(micro_batches):
        with reducer.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            (model(**micro).loss_sum / global_label_tokens).backward()
    reducer.finish()            # every p.grad now holds the sum over the group
    clip, optimizer.step(), optimizer.zero_grad()

Trainable parameters are laid out in REVERSE registration order and cut into buckets of about
`bucket_mb`: backward produces the last layers' gradients first, so the first buckets fill early
and their collective runs while backward computes the rest. A post-accumulate-grad hook marks a
parameter ready; buckets are launched strictly in index order (bucket i once it and every bucket
before it are ready), so all ranks issue the same collectives in the same order even when one
rank's micro-batch leaves parameters without a gradient (a text-only batch gives the vision tower
none): such buckets wait for `finish()`, which launches whatever is left with zeros for missing
gradients. A collective that one rank issues and another never does would hang both.

Reduction is a SUM by default: the training loss is each rank's loss_sum divided by the label-token
count of the whole step over all ranks, so the summed gradient is the gradient of the global mean.
`average=True` divides by the group size instead (for a loss normalised per rank).

`deferred` names parameters whose gradient needs another reduction first (sequence-parallel norm
weights summed over TP, a tied embedding summed over the pipeline): they get buckets of their own,
placed last and launched only by `finish(before=...)`, after the caller's reduction. The other
buckets keep overlapping backward.

With `shard=True` (ZeRO-1, see zero.py) each bucket is reduce-scattered instead: rank r receives
the summed gradient of its contiguous 1/world slice of every bucket in `bucket.shard`, and p.grad
is left as the local (unreduced) gradient.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import torch
import torch.distributed as dist
from torch import nn

from mmfuse.parallel.collectives import _reduce_scatter_single, group_rank, group_size

NamedParams = Iterable[Union[nn.Parameter, tuple[str, nn.Parameter]]]


@dataclass
class Bucket:
    """One flat gradient buffer and the parameters laid out in it (in reverse registration order)."""
    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]               # start of each parameter in `buffer`
    numel: int                       # real elements; `buffer` is padded to a multiple of the group size
    buffer: torch.Tensor             # flat gradients, reduced in place (all-reduce) or reduce-scattered
    shard: torch.Tensor | None = None  # shard mode: this rank's reduced slice of `buffer`
    ready: set[int] = field(default_factory=set)  # ids of parameters whose gradient is final

    @property
    def param_dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def views(self, flat: torch.Tensor) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """(name, parameter, its slice of `flat` shaped like the parameter) for a bucket-sized flat tensor."""
        for name, p, off in zip(self.names, self.params, self.offsets):
            yield name, p, flat[off:off + p.numel()].view_as(p)


def named_trainable(params: NamedParams) -> list[tuple[str, nn.Parameter]]:
    """(name, param) for parameters that require grad, in the given order; bare parameters are
    named by position. A parameter listed twice (tied weights) is kept once."""
    out, seen = [], set()
    for i, item in enumerate(params):
        name, p = item if isinstance(item, tuple) else (str(i), item)
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def build_buckets(named: list[tuple[str, nn.Parameter]], bucket_mb: float, world: int,
                  reduce_dtype: torch.dtype | None, deferred: frozenset[str] = frozenset()) -> list[Bucket]:
    """Buckets of at least bucket_mb (the last may be smaller), in reverse registration order, the
    deferred parameters' buckets last. A bucket holds one parameter dtype, so ZeRO can all-gather
    updated weights into it without casts."""
    cap = bucket_mb * 2 ** 20
    groups: list[list[tuple[str, nn.Parameter]]] = []
    for part in ([x for x in named if x[0] not in deferred], [x for x in named if x[0] in deferred]):
        size, start = 0.0, len(groups)
        for name, p in reversed(part):
            dtype = reduce_dtype or p.dtype
            if len(groups) == start or size >= cap or groups[-1][0][1].dtype != p.dtype:
                groups.append([])
                size = 0.0
            groups[-1].append((name, p))
            size += p.numel() * dtype.itemsize
    buckets = []
    for index, members in enumerate(groups):
        offsets, total = [], 0
        for _, p in members:
            offsets.append(total)
            total += p.numel()
        padded = -(-total // world) * world
        p0 = members[0][1]
        buffer = torch.zeros(padded, dtype=reduce_dtype or p0.dtype, device=p0.device)
        buckets.append(Bucket(index, [n for n, _ in members], [p for _, p in members], offsets, total, buffer))
    return buckets


class GradReducer:
    """Bucketed gradient reduction over `group` (all-reduce, or reduce-scatter with shard=True),
    launched from backward hooks when `overlap`, otherwise all in `finish()`. A group of None or
    size 1 reduces nothing (shard mode still fills `bucket.shard`, which is then the whole bucket)."""

    def __init__(self, params: NamedParams, group=None, bucket_mb: float = 25.0, overlap: bool = True,
                 shard: bool = False, average: bool = False, reduce_dtype: torch.dtype | None = None,
                 deferred: Iterable[str] = ()):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.group, self.overlap, self.shard, self.average = group, overlap, shard, average
        self.world = group_size(group)
        self.named = named_trainable(params)
        if not self.named:
            raise ValueError("GradReducer: no parameter requires grad")
        self.deferred = frozenset(deferred)
        self.buckets = build_buckets(self.named, bucket_mb, self.world if shard else 1, reduce_dtype, self.deferred)
        self.rank = group_rank(group)
        if shard:   # one rank: the shard is the buffer itself; otherwise a separate output tensor
            for b in self.buckets:
                b.shard = b.buffer if self.world == 1 else b.buffer.new_zeros(b.buffer.numel() // self.world)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._name_of = dict((id(p), n) for n, p in self.named)
        self._next = 0            # index of the next bucket to launch
        self._handles: list = []
        self._sync = True
        self.launches = 0         # collectives issued so far (tests count them; benchmarks read them)
        self.wait_s = 0.0         # time spent in finish() (launching leftovers + waiting), summed
        self.fresh = False        # shard mode: finish() filled the shards and no optimizer step used them yet
        self._hooks = []
        if overlap and self.world > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for n, p in self.named
                           if n not in self.deferred]

    # ---- backward side ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside this block only accumulates p.grad (earlier micro-batches of a step)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        bucket = self._bucket_of[id(p)]
        if bucket.index < self._next:
            raise RuntimeError(f"gradient of {self._name_of[id(p)]} arrived after its bucket was reduced: run "
                               "every backward but the step's last inside reducer.no_sync()")
        bucket.ready.add(id(p))
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(
                self.buckets[self._next].params):
            self._launch(self.buckets[self._next])

    def _launch(self, b: Bucket) -> None:
        with torch.no_grad():
            for _, p, view in b.views(b.buffer):
                if p.grad is None:
                    view.zero_()        # this rank's batch did not use p; the others' gradients still count
                else:
                    view.copy_(p.grad)
            if self.average and self.world > 1:
                b.buffer.div_(self.world)
        if self.world > 1:
            if self.shard:
                handle = _reduce_scatter_single(b.shard, b.buffer, group=self.group, async_op=True)
            else:
                handle = dist.all_reduce(b.buffer, group=self.group, async_op=True)
            self._handles.append(handle)
            self.launches += 1
        self._next = b.index + 1

    # ---- end of the step -------------------------------------------------------------------------

    def finish(self, before=None) -> None:
        """Launch the buckets not launched yet, wait for all, and (all-reduce mode) make every p.grad
        the reduced gradient: a view of its bucket (no copy) when dtypes match, else a copy.
        `before()` runs first (after backward): the extra reductions of the deferred parameters."""
        if before is not None:
            before()
        if self.world == 1 and not self.shard:
            return
        began = time.perf_counter()
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for handle in self._handles:
            handle.wait()
        self.wait_s += time.perf_counter() - began
        self._handles.clear()
        self._next = 0
        self.fresh = True
        for b in self.buckets:
            b.ready.clear()
            if self.shard:
                continue
            for _, p, view in b.views(b.buffer):
                if view.dtype == p.dtype:
                    p.grad = view
                elif p.grad is None:
                    p.grad = view.to(p.dtype)
                else:
                    p.grad.copy_(view)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
