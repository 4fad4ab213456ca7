"""Tensor-parallel layers (Megatron's ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
built from the plain modules of a model, and the bookkeeping that turns sharded parameters back into
the full tensors a checkpoint holds.

  column  y_TO/tp = x_TD @ W_r^T            input: copy_to_group (SP: gather_sequence, x is T/tp tokens)
  row     y_TD    = sum_r x_TI/tp @ W_r^T   output: reduce_from_group (SP: reduce_scatter_sequence), then + b
  vocab   e_TD    = sum_r embed_r(ids)      rows outside this rank's vocabulary give 0; always all-reduced,
                                            so the output has every token (vision features are placed there)

Every parameter carries `tp_shard`: a TPShard (how it is split) or None (replicated). Parameters
that are replicated but, under sequence parallelism, see only this rank's tokens (or, after the
vocab-parallel loss, only this rank's share of the gradient) carry `sequence_parallel = True`: their
gradients are partial sums and `sync_sequence_parallel_grads` all-reduces them over TP.
Legend: T tokens, D input width, O output width, I row-parallel input width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmfuse.parallel.collectives import (copy_to_group, gather_sequence, group_rank, group_size,
                                         reduce_from_group, reduce_scatter_sequence)
from mmfuse.parallel.tp_overlap import gather_linear, linear_reduce_scatter


@dataclass(frozen=True)
class TPShard:
    """How a parameter is split over the TP ranks."""
    dim: int          # the split dimension
    blocks: int = 1   # the dimension is `blocks` equal parts, each split over the ranks on its own (fused
                      # [q; k; v] with blocks=3: rank r holds [q_r; k_r; v_r], so its heads stay whole)


def shard_of(full: torch.Tensor, spec: TPShard, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of a full tensor."""
    parts = full.unflatten(spec.dim, (spec.blocks, -1))
    if parts.shape[spec.dim + 1] % tp:
        raise ValueError(f"cannot split {full.shape[spec.dim] // spec.blocks} rows (dim {spec.dim}, "
                         f"{spec.blocks} blocks) over {tp} tensor-parallel ranks")
    return parts.chunk(tp, spec.dim + 1)[rank].flatten(spec.dim, spec.dim + 1).contiguous()


def gather_shards(local: torch.Tensor, spec: TPShard, group) -> torch.Tensor:
    """The full tensor from every rank's part (inverse of shard_of; a collective over `group`)."""
    tp = group_size(group)
    if tp == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    parts = [p.unflatten(spec.dim, (spec.blocks, -1)) for p in parts]
    return torch.cat(parts, spec.dim + 1).flatten(spec.dim, spec.dim + 1)


def _param(t: torch.Tensor | None, spec: TPShard | None, tp: int, rank: int) -> nn.Parameter | None:
    if t is None:
        return None
    p = nn.Parameter(shard_of(t.detach(), spec, tp, rank) if spec else t.detach().clone(), requires_grad=t.requires_grad)
    p.tp_shard = spec
    return p


class ColumnParallelLinear(nn.Module):
    """A Linear whose output features are split: this rank computes O/tp of them for every token."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, sequence_parallel: bool,
                 overlap_chunks: int = 0):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel = group, sequence_parallel
        # > 1: under SP, all-gather the tokens in this many chunks, overlapping each with the previous GEMM.
        self.overlap_chunks = overlap_chunks

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, sequence_parallel: bool, partition: int | None = None,
                    overlap_chunks: int = 0) -> "ColumnParallelLinear":
        """partition: the output rows are `partition` equal blocks split separately (3 for a fused qkv)."""
        tp, rank = group_size(group), group_rank(group)
        spec = TPShard(0, partition or 1)
        return cls(_param(linear.weight, spec, tp, rank), _param(linear.bias, spec, tp, rank), group,
                   sequence_parallel, overlap_chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.overlap_chunks > 1 and group_size(self.group) > 1:
            return gather_linear(x, self.weight, self.bias, self.group, self.overlap_chunks)
        x = gather_sequence(x, self.group) if self.sequence_parallel else copy_to_group(x, self.group)
        return F.linear(x, self.weight, self.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """The full output width (as nn.Linear's), not this rank's share."""
        return self.weight.shape[0] * group_size(self.group)

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out_local={self.weight.shape[0]}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split: each rank's partial product is summed over the group,
    and the bias (replicated) is added once, after the sum."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, sequence_parallel: bool,
                 overlap_chunks: int = 0):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel = group, sequence_parallel
        self.overlap_chunks = overlap_chunks  # > 1: under SP, reduce-scatter chunk i while computing chunk i+1
        if bias is not None and sequence_parallel:
            bias.sequence_parallel = True   # added to this rank's tokens only: its gradient is partial

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, sequence_parallel: bool, partition: int | None = None,
                    overlap_chunks: int = 0) -> "RowParallelLinear":
        tp, rank = group_size(group), group_rank(group)
        return cls(_param(linear.weight, TPShard(1, partition or 1), tp, rank), _param(linear.bias, None, tp, rank),
                   group, sequence_parallel, overlap_chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.overlap_chunks > 1 and group_size(self.group) > 1:
            y = linear_reduce_scatter(x, self.weight, self.group, self.overlap_chunks)
        else:
            y = F.linear(x, self.weight)
            y = reduce_scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_group(y, self.group)
        return y if self.bias is None else y + self.bias

    @property
    def in_features(self) -> int:
        """The full input width (as nn.Linear's), not this rank's share."""
        return self.weight.shape[1] * group_size(self.group)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"in_local={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An Embedding whose rows (vocabulary) are split; ids of other ranks' rows look up 0 here and
    the sum over the group gives every token its row."""

    def __init__(self, weight: nn.Parameter, group):
        super().__init__()
        self.weight, self.group = weight, group
        self.vocab_start = group_rank(group) * weight.shape[0]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group) -> "VocabParallelEmbedding":
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding supports plain embeddings (no padding_idx / max_norm)")
        return cls(_param(embedding.weight, TPShard(0), group_size(group), group_rank(group)), group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        e = F.embedding(local.masked_fill(outside, 0), self.weight)
        e = e.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(e, self.group)

    def extra_repr(self) -> str:
        return f"vocab_local={self.weight.shape[0]}, vocab_start={self.vocab_start}, dim={self.weight.shape[1]}"


# ---- checkpoints and gradients ----------------------------------------------------------------------


def _params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict(keep_vars=True)


def full_state_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every entry of model.state_dict() as the unsharded model would hold it (same names, full
    shapes). A collective: every TP rank must call it; all get the same result."""
    out = {}
    for name, t in _params_by_name(model).items():
        spec = getattr(t, "tp_shard", None)
        out[name] = gather_shards(t, spec, tp_group) if spec else t.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor], tp_group) -> None:
    """Copy a full (unsharded) state dict into a tensor-parallel model: each rank takes its slice."""
    tp, rank = group_size(tp_group), group_rank(tp_group)
    own = _params_by_name(model)
    missing = sorted(set(own) - set(full_sd))
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} entries, e.g. {missing[:3]}")
    for name, t in own.items():
        spec = getattr(t, "tp_shard", None)
        src = shard_of(full_sd[name], spec, tp, rank) if spec else full_sd[name]
        if src.shape != t.shape:
            raise ValueError(f"{name}: slice {tuple(src.shape)} does not fit the parameter {tuple(t.shape)}")
        t.copy_(src)


def full_grads(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Gradients as the unsharded model would hold them (a collective; for checks and tools)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            spec = getattr(p, "tp_shard", None)
            out[name] = gather_shards(p.grad, spec, tp_group) if spec else p.grad.clone()
    return out


def sync_sequence_parallel_grads(model: nn.Module, tp_group) -> None:
    """All-reduce over TP the gradients of parameters marked `sequence_parallel` (each rank holds the
    part from its own tokens). One flat all-reduce for all of them; call after backward, before the
    optimizer (and before gradient clipping)."""
    if group_size(tp_group) == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
