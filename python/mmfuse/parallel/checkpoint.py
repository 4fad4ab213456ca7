"""Checkpoints of a multi-rank run in the one layout every run reads and writes: the model as a
Hugging Face directory and AdamW state by parameter name (train/checkpoint.py). A run saved under
tp2·pp2 therefore resumes under any other layout, in one process too, and a one-process checkpoint
starts a parallel run: loading is "read the full tensors this rank holds, keep its slice".

Saving is sharded (parallel/shard_writer.py): each pipeline stage's tensors are dealt to the stage's
ranks, each writes its own model-0000i-of-0000N.safetensors and optimizer-0000i-of-0000M.safetensors,
and rank 0 writes the indexes; no rank holds more than its share of full tensors plus one. The save
dir must be on a filesystem every rank reads and writes (on resume each rank reads what it holds).

This file holds the loading side, plus `full_tensors`/`gather_to_rank0`, which gather a whole model
on one rank: for comparing small models in tests, not for checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from mmfuse.models.qwen2_5_vl.hf_adapter import read_weights
from mmfuse.parallel.state import ParallelState
from mmfuse.parallel.tensor_parallel import gather_shards, load_full_state_dict, shard_of


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta-device model real (uninitialised) storage, keeping each parameter's attributes
    (`tp_shard`, `sequence_parallel`): Module.to_empty would create new Parameters without them."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                new = nn.Parameter(torch.empty_like(p, device=device, dtype=dtype if p.is_floating_point() else None),
                                   requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                made[id(p)] = new
            module._parameters[name] = made[id(p)]


def load_weights(model: nn.Module, hf_dir: str | Path, state: ParallelState,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Fill this rank's (materialised) parameters from a full Hugging Face directory; `extra`: full
    tensors by name that the directory does not hold (LoRA adapters), taken instead of it."""
    extra = extra or {}
    names = set(model.state_dict().keys()) - set(extra)
    dtype = next(model.parameters()).dtype
    load_full_state_dict(model, {**read_weights(hf_dir, names, dtype), **extra}, state.tp_group)


def _spec(param: torch.Tensor):
    return getattr(param, "tp_shard", None)


def full_tensors(model: nn.Module, optimizer_state: dict[str, dict[str, torch.Tensor]] | None,
                 state: ParallelState, only: Callable[[str], bool] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state dict, optimizer `name::key` tensors) of this stage with tensor-parallel shards
    gathered; `only`: the state-dict names to take (all by default). A collective over the TP group
    (every TP rank calls it with the same names)."""
    params = {n: t for n, t in model.state_dict(keep_vars=True).items() if only is None or only(n)}
    weights = {n: (gather_shards(t, _spec(t), state.tp_group) if _spec(t) else t.detach().clone()).cpu()
               for n, t in params.items()}
    optim: dict[str, torch.Tensor] = {}
    for name in sorted(optimizer_state or {}):
        spec = _spec(params[name]) if name in params else None
        for key in sorted(optimizer_state[name]):
            t = optimizer_state[name][key]
            full = gather_shards(t, spec, state.tp_group) if spec is not None and t.dim() > 0 else t.detach().clone()
            optim[f"{name}::{key}"] = full.cpu().contiguous()
    return weights, optim


def gather_to_rank0(weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
                    state: ParallelState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """The union over pipeline stages on global rank 0 (None elsewhere). Called by every rank; only
    the (tp, cp, dp) = 0 rank of each stage sends (its replicas hold the same tensors)."""
    if state.tp_rank or state.cp_rank or state.dp_rank:
        return None
    if state.pp == 1:
        return weights, optim
    parts: list[Any] = [None] * state.pp if state.pp_rank == 0 else None
    dist.gather_object((weights, optim), parts, dst=state.pp_ranks[0], group=state.pp_group)
    if state.pp_rank != 0:
        return None
    all_w, all_o = {}, {}
    for w, o in parts:
        all_w.update(w)        # a tied embedding arrives from two stages with equal values
        all_o.update(o)
    return all_w, all_o


def gather_objects_over_dp(obj: Any, state: ParallelState) -> list[Any] | None:
    """One object per data-parallel rank (e.g. sampler positions) on the dp rank 0 of the group."""
    if state.dp == 1:
        return [obj]
    out: list[Any] = [None] * state.dp if state.dp_rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(state.dp_group, 0), group=state.dp_group)
    return out


def slice_optimizer_state(model: nn.Module, per_param: dict[str, dict[str, torch.Tensor]],
                          state: ParallelState) -> dict[str, dict[str, torch.Tensor]]:
    """From full optimizer tensors by name, this rank's slices for the parameters it holds."""
    params = dict(model.named_parameters())
    out = {}
    for name, p in params.items():
        if name not in per_param:
            continue
        spec = _spec(p)
        out[name] = {k: (shard_of(t, spec, state.tp, state.tp_rank) if spec is not None and t.dim() > 0 else t)
                     .to(p.device) for k, t in per_param[name].items()}
    return out
