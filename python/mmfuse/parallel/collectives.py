"""Collectives as autograd functions, each with its conjugate in backward (Megatron's mappings):

  copy_to_group        forward identity        backward all-reduce
  reduce_from_group    forward all-reduce      backward identity
  gather_from_group    forward all-gather      backward split (keep own slice)      (dim 0)
  scatter_to_group     forward split           backward all-gather                  (dim 0)
  gather_sequence      forward all-gather      backward reduce-scatter              (dim 0; SP)
  reduce_scatter_seq   forward reduce-scatter  backward all-gather                  (dim 0; SP)
  all_to_all           forward all-to-all      backward the inverse all-to-all

A group of None (or of size 1) makes every function the identity, so code that calls them runs
unchanged in one process. All tensors are split along dim 0 in equal parts (callers pad).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


# torch 2.13 renamed the single-tensor collectives (the old names warn); 2.11 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather0(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter0(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if x.shape[0] % n:
        raise ValueError(f"reduce-scatter over {n} ranks needs dim 0 ({x.shape[0]}) divisible by {n}")
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _split0(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if x.shape[0] % n:
        raise ValueError(f"splitting dim 0 ({x.shape[0]}) over {n} ranks needs it divisible by {n}")
    return x.chunk(n)[group_rank(group)].contiguous()


def _conjugate(name: str, forward_fn, backward_fn) -> type[torch.autograd.Function]:
    """An autograd function applying forward_fn(x, group) and, to the gradient, backward_fn(g, group)."""
    def forward(ctx, x, group):
        ctx.group = group
        return forward_fn(x, group)

    def backward(ctx, g):
        return backward_fn(g, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


_CopyToGroup = _conjugate("_CopyToGroup", _identity, _sum)
_ReduceFromGroup = _conjugate("_ReduceFromGroup", _sum, _identity)
_GatherFromGroup = _conjugate("_GatherFromGroup", _all_gather0, _split0)
_ScatterToGroup = _conjugate("_ScatterToGroup", _split0, _all_gather0)
_GatherSequence = _conjugate("_GatherSequence", _all_gather0, _reduce_scatter0)
_ReduceScatterSequence = _conjugate("_ReduceScatterSequence", _reduce_scatter0, _all_gather0)


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = group_size(group)
    inputs = [t.contiguous() for t in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(t) for t in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(g, ctx.group, gather_dim, scatter_dim), None, None, None


def _identity_if_single(fn):
    def wrapped(x: torch.Tensor, group, *args):
        if group_size(group) == 1:
            return x
        return fn(x, group, *args)
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_identity_if_single
def copy_to_group(x, group):
    """Identity forward; gradients summed over the group (input of a column-parallel linear)."""
    return _CopyToGroup.apply(x, group)


@_identity_if_single
def reduce_from_group(x, group):
    """Sum over the group (output of a row-parallel linear without sequence parallel)."""
    return _ReduceFromGroup.apply(x, group)


@_identity_if_single
def gather_from_group(x, group):
    """Concatenate every rank's x along dim 0; backward keeps this rank's slice."""
    return _GatherFromGroup.apply(x, group)


@_identity_if_single
def scatter_to_group(x, group):
    """This rank's equal slice of dim 0; backward all-gathers."""
    return _ScatterToGroup.apply(x, group)


@_identity_if_single
def gather_sequence(x, group):
    """All-gather along tokens (entering a column-parallel linear under sequence parallel);
    backward reduce-scatters the gradient."""
    return _GatherSequence.apply(x, group)


@_identity_if_single
def reduce_scatter_sequence(x, group):
    """Sum over the group and keep this rank's token slice (leaving a row-parallel linear under
    sequence parallel); backward all-gathers."""
    return _ReduceScatterSequence.apply(x, group)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x along scatter_dim, exchange, concatenate along gather_dim (Ulysses); differentiable."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)
