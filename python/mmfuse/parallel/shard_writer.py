"""Sharded checkpoint writing for multi-rank runs: every rank writes a share of its pipeline stage's
tensors, so no rank ever holds the whole model or optimizer state.

The plan is the same on every rank; it is made from the names each stage's first rank lists:
  - a tensor held by several stages (a tied embedding) is written by the first of them;
  - a stage's tensors are dealt to all of the stage's ranks (tp × cp × dp), largest first, each to
    the rank with the fewest bytes so far, so a rank holds at most stage bytes / stage ranks + one
    tensor (the bound of greedy list scheduling);
  - weights and optimizer state are two passes; each pass's tensors are freed once its file is written.
Collecting one tensor: the replica (cp, dp) its writer belongs to assembles it (tensor-parallel slices
are all-gathered over that replica's TP group; ZeRO-1 state comes point to point from the
data-parallel ranks whose shards hold its parts), the writer keeps it and the others drop it. No
tensor goes to rank 0 unless rank 0 writes it.

Files: the writers of a pass, in global rank order, write model/model-0000i-of-0000N.safetensors
(weights under their Hugging Face names and shapes) and optimizer-0000i-of-0000M.safetensors
(`name::exp_avg`, ...), each fsynced. Rank 0 writes the two indexes and config.json from the plan.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mmfuse.data.atomic import fsync_file
from mmfuse.models.qwen2_5_vl.hf_adapter import hf_tensor, index_json, shard_file_name, write_config
from mmfuse.parallel.state import ParallelState, rank_of
from mmfuse.parallel.tensor_parallel import gather_shards

MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"


@dataclass(frozen=True)
class Item:
    """One full tensor to write."""
    key: str              # its key in the files: the parameter's name, or `name::state` for optimizer state
    name: str             # the parameter (or buffer) it belongs to
    state: str | None     # None: the weight itself; else the optimizer state's key (exp_avg, step, ...)
    nbytes: int           # size of the full (tensor-parallel gathered) tensor


class OptimizerSource(Protocol):
    """Optimizer state by parameter name, as this rank holds it (ZeroAdamW is one)."""

    def state_items(self) -> list[tuple[str, str, torch.Size, torch.dtype]]:
        """(parameter, state key, this rank's shape, dtype) of every state tensor."""

    def gather_state(self, name: str, key: str, dst: int) -> torch.Tensor | None:
        """The tensor as this rank's model holds the parameter (its TP slice) on data-parallel group
        rank `dst`, None on the others; called by every rank of the group, in the same order."""


class ReplicatedOptimizerState:
    """A torch AdamW's state by parameter name, the same on every data/context-parallel replica."""

    def __init__(self, by_name: dict[str, dict[str, torch.Tensor]], replica: int):
        self.by_name, self.replica = by_name, replica

    def state_items(self) -> list[tuple[str, str, torch.Size, torch.dtype]]:
        return [(n, k, torch.as_tensor(v).shape, torch.as_tensor(v).dtype)
                for n in sorted(self.by_name) for k, v in sorted(self.by_name[n].items())]

    def gather_state(self, name: str, key: str, dst: int) -> torch.Tensor | None:
        return torch.as_tensor(self.by_name[name][key]) if self.replica == dst else None


@dataclass
class ShardStats:
    """What one rank wrote; `peak_bytes` is the most bytes of full tensors it held at once for writing."""
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    peak_bytes: int = 0
    errors: list[BaseException] = field(default_factory=list)   # failed writes (the caller makes every rank agree)


def deal(items: list[Item], writers: list[int]) -> dict[str, int]:
    """key → writer: largest tensor first, each to the writer with the fewest bytes so far (ties: the
    first listed). No writer ends above total / len(writers) + the largest tensor."""
    heap = [(0, i) for i in range(len(writers))]
    out = {}
    for item in sorted(items, key=lambda it: (-it.nbytes, it.key)):
        load, i = heapq.heappop(heap)
        out[item.key] = writers[i]
        heapq.heappush(heap, (load + item.nbytes, i))
    return out


def plan(stage_items: list[list[Item]], stage_writers: list[list[int]]) -> tuple[list[list[Item]], dict[str, int]]:
    """Per stage, the items it writes (a key several stages hold goes to the first), and key → writer."""
    seen: set[str] = set()
    kept, owner = [], {}
    for items, writers in zip(stage_items, stage_writers):
        mine = [it for it in items if it.key not in seen]
        seen.update(it.key for it in mine)
        kept.append(mine)
        owner.update(deal(mine, writers))
    return kept, owner


def file_names(owner: dict[str, int], stem: str) -> dict[int, str]:
    """writer rank → its shard file, numbered in rank order over the ranks that write anything."""
    ranks = sorted(set(owner.values()))
    return {r: shard_file_name(i, len(ranks), stem) for i, r in enumerate(ranks)}


def stage_ranks(state: ParallelState, pp_rank: int) -> list[int]:
    """Every global rank of pipeline stage pp_rank, in rank order."""
    lay, world = state.layout, state.world_size
    return sorted(rank_of(t, c, d, pp_rank, lay, world)
                  for t in range(state.tp) for c in range(state.cp) for d in range(state.dp))


def replica_of(rank: int, state: ParallelState) -> int:
    """A rank's index in its data+context-parallel group (dp-major, as group_ranks builds dp_cp)."""
    tp, cp, dp = state.tp, state.cp, state.dp
    return rank // (tp * cp) % dp * cp + rank // tp % cp


def write_shards(parts: list[nn.Module], optimizer: OptimizerSource | None, state: ParallelState,
                 model_dir: Path, optimizer_dir: Path | None) -> ShardStats:
    """Write this rank's share of the checkpoint (see the module docstring); a collective over every
    rank. Write failures are returned in `errors`, not raised, so that every rank still takes part in
    every collective and the caller can `settle` them on all ranks before anything is published."""
    params = {n: t for part in parts for n, t in part.state_dict(keep_vars=True).items()}
    leader = state.tp_rank == 0 and state.cp_rank == 0 and state.dp_rank == 0
    mine = None
    if leader:
        opt_items = optimizer.state_items() if optimizer is not None and optimizer_dir is not None else []
        mine = (state.pp_rank,
                [Item(n, n, None, _full_bytes(t.shape, t.dtype, _spec(t), state.tp)) for n, t in params.items()],
                [Item(f"{n}::{k}", n, k, _full_bytes(shape, dtype, _spec(params.get(n)), state.tp))
                 for n, k, shape, dtype in opt_items])
    listed: list = [None] * state.world_size
    dist.all_gather_object(listed, mine)
    by_stage = {pp: (w, o) for pp, w, o in (x for x in listed if x is not None)}
    writers = [stage_ranks(state, pp) for pp in range(state.pp)]

    stats = ShardStats()
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = parts[0].cfg
    passes = [(0, model_dir, "model", MODEL_INDEX)]
    if optimizer_dir is not None:
        passes.append((1, optimizer_dir, "optimizer", OPTIMIZER_INDEX))
    for which, out_dir, stem, index_name in passes:
        kept, owner = plan([by_stage[pp][which] for pp in range(state.pp)], writers)
        names = file_names(owner, stem)
        held = _collect(kept[state.pp_rank], owner, params, optimizer, state, cfg)
        stats.peak_bytes = max(stats.peak_bytes, sum(t.numel() * t.element_size() for t in held.values()))
        stats.tensors += len(held)
        if held:
            attempt(stats.errors, lambda: _write_file(held, out_dir / names[state.rank]))
            stats.files.append(names[state.rank])
        del held
        if state.rank == 0:
            total = sum(it.nbytes for items in kept for it in items)
            weight_map = {k: names[r] for k, r in owner.items()}
            attempt(stats.errors, lambda: _write_text(out_dir / index_name, index_json(weight_map, total)))
    if state.rank == 0:
        dtype = next((t.dtype for t in params.values() if t.is_floating_point()), torch.float32)
        attempt(stats.errors, lambda: write_config(cfg, dtype, model_dir))
    return stats


def _collect(items: list[Item], owner: dict[str, int], params: dict[str, torch.Tensor],
             optimizer: OptimizerSource | None, state: ParallelState, cfg) -> dict[str, torch.Tensor]:
    """The full tensors this rank writes, assembling every item of the stage with the ranks of its
    writer's replica. Every rank of the stage walks the same items in the same order."""
    me = replica_of(state.rank, state)
    held: dict[str, torch.Tensor] = {}
    for it in items:
        writer = owner[it.key]
        dst = replica_of(writer, state)
        if it.state is None:
            local = params[it.name] if me == dst else None
        else:
            local = optimizer.gather_state(it.name, it.state, dst)
        if me != dst:
            continue
        spec = _spec(params.get(it.name))
        full = gather_shards(local, spec, state.tp_group) if spec is not None and local.dim() > 0 else local
        if state.rank == writer:
            full = hf_tensor(cfg, it.name, full) if it.state is None else full.detach().contiguous()
            held[it.key] = full.cpu()
    return held


def _spec(t: torch.Tensor | None):
    return getattr(t, "tp_shard", None)


def _full_bytes(shape: torch.Size, dtype: torch.dtype, spec, tp: int) -> int:
    numel = shape.numel() * (tp if spec is not None and len(shape) > 0 else 1)
    return numel * torch.empty((), dtype=dtype).element_size()


def attempt(errors: list[BaseException], fn) -> None:
    """Run a write, keeping its error for `settle` instead of raising: the rank must still join the
    collectives that follow, or its peers would wait for it until the timeout."""
    try:
        fn()
    except Exception as e:
        errors.append(e)


def _write_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_file(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
    fsync_file(path)


def settle(errors: list[BaseException], what: str, device: torch.device) -> None:
    """Raise on every rank unless no rank has errors (a collective: one all-reduce of a flag per
    rank). A save is published only when every shard is on disk, and a failing rank stops the others
    at once instead of leaving them waiting; on the failing rank its own error is the cause."""
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = 1 if errors else 0
    dist.all_reduce(flags)
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {failed} (see their errors)") \
            from (errors[0] if errors else None)
