"""ParallelState: this rank's coordinates in the (pp, dp, cp, tp) grid and the process groups that
connect it, built from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

The layout is validated before `init_process_group`, so a bad layout costs no rendezvous. Every rank
creates every group in the same order (torch.distributed requires it) and keeps the ones it is in.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmfuse.parallel.layout import ParallelLayout


def backend_for(device: str) -> str:
    """The collective backend for a device type: nccl (CUDA), hccl (Ascend), gloo (CPU)."""
    # From the string: torch.device("npu") raises until torch_npu has registered the device type.
    kind = str(device).split(":")[0]
    return {"cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


@dataclass
class ParallelState:
    """Coordinates and groups of one rank. Groups are None in a single-process run."""
    layout: ParallelLayout
    rank: int
    world_size: int
    tp_rank: int
    cp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: Any = None
    cp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    dp_cp_group: Any = None          # gradients are averaged over data and context parallel ranks together
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's pipeline, stage order
    pp_meta_group: Any = None         # gloo group of the pipeline, for the shape headers of pipeline p2p

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp(self.world_size)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: tp, cp, dp rank 0 of the last stage (it has the loss)."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0 and self.is_last_stage

    @classmethod
    def single(cls) -> "ParallelState":
        """A one-process run (no groups)."""
        return cls(ParallelLayout(), rank=0, world_size=1, tp_rank=0, cp_rank=0, dp_rank=0, pp_rank=0)


def coordinates(rank: int, layout: ParallelLayout, world_size: int) -> tuple[int, int, int, int]:
    """(tp_rank, cp_rank, dp_rank, pp_rank) of a global rank; tp varies fastest, pp slowest."""
    tp, cp, dp = layout.tp, layout.cp, layout.dp(world_size)
    return rank % tp, rank // tp % cp, rank // (tp * cp) % dp, rank // (tp * cp * dp)


def rank_of(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, layout: ParallelLayout, world_size: int) -> int:
    tp, cp, dp = layout.tp, layout.cp, layout.dp(world_size)
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def group_ranks(layout: ParallelLayout, world_size: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (pure; the same on every rank)."""
    tp, cp, pp, dp = layout.tp, layout.cp, layout.pp, layout.dp(world_size)
    r = lambda t, c, d, p: rank_of(t, c, d, p, layout, world_size)  # noqa: E731
    return {
        "tp": [[r(t, c, d, p) for t in range(tp)] for p in range(pp) for d in range(dp) for c in range(cp)],
        "cp": [[r(t, c, d, p) for c in range(cp)] for p in range(pp) for d in range(dp) for t in range(tp)],
        "dp": [[r(t, c, d, p) for d in range(dp)] for p in range(pp) for c in range(cp) for t in range(tp)],
        "dp_cp": [[r(t, c, d, p) for d in range(dp) for c in range(cp)] for p in range(pp) for t in range(tp)],
        "pp": [[r(t, c, d, p) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)],
    }


def init_parallel(layout: ParallelLayout, device: str = "cpu", model_cfg: Any | None = None) -> ParallelState:
    """Validate the layout against WORLD_SIZE (and the model), then join the process group and build
    the groups. A single process without torchrun variables gets ParallelState.single()."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    layout.validate(world_size, model_cfg)
    if world_size == 1 and not dist.is_initialized():
        state = ParallelState.single()
        state.layout = layout
        return state
    if not dist.is_initialized():
        if backend_for(device) == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device), rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=layout.timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return build_state(layout, rank, world_size)


def build_state(layout: ParallelLayout, rank: int, world_size: int,
                own_meta_group: bool | None = None) -> ParallelState:
    """Groups for an initialised default process group. own_meta_group: give each pipeline a gloo
    group of its own for the p2p shape headers (None: when the default backend is not gloo, so a
    shape is read without waiting for the device; on gloo the pipeline group serves)."""
    tp_rank, cp_rank, dp_rank, pp_rank = coordinates(rank, layout, world_size)
    state = ParallelState(layout, rank, world_size, tp_rank, cp_rank, dp_rank, pp_rank)
    timeout = datetime.timedelta(seconds=layout.timeout_s)
    if own_meta_group is None:
        own_meta_group = dist.get_backend() != dist.Backend.GLOO
    for kind, all_ranks in group_ranks(layout, world_size).items():
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=timeout)
            meta = group
            if kind == "pp" and layout.pp > 1 and own_meta_group:
                meta = dist.new_group(ranks, timeout=timeout, backend=dist.Backend.GLOO)
            if rank in ranks:
                setattr(state, f"{kind}_group", group)
                if kind == "pp":
                    state.pp_ranks = tuple(ranks)
                    state.pp_meta_group = meta
    return state


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
