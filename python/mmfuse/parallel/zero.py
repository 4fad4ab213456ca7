"""ZeRO-1: AdamW whose state (fp32 master weights, exp_avg, exp_avg_sq) is sharded over the
data-parallel group, after Megatron's distributed optimizer:

    opt = ZeroAdamW.from_adamw(model, build_optimizer(model, cfg), state.dp_group, bucket_mb=25)
    ... backward (inside opt.reducer.no_sync() for all but the last micro-batch) ...
    opt.reducer.finish()               # reduce-scatter: this rank holds the summed grad of its shard
    norm = opt.clip_grad_norm_(1.0)    # global norm from the shards
    opt.step()                         # AdamW on the shard in fp32, then all-gather the weights
    opt.zero_grad()

The gradient buckets of a GradReducer(shard=True) are the unit of sharding: rank r owns the
contiguous slice [r·S, (r+1)·S) of every bucket (S = padded bucket size / world), so the
reduce-scatter that overlaps backward delivers exactly the gradients this rank updates. A
parameter may straddle two ranks; each updates its part. The update is the kernel torch.optim.AdamW
runs for the same device (fused on CPU/CUDA, foreach elsewhere: train/optim.py), with each param
group's lr and weight_decay, so `set_lr` keeps
working through `param_groups`. Memory per rank: state 12 bytes × params / world (vs 12 × params).

state_dict() is the FULL state keyed by parameter name ({"state": {name: {"step", "exp_avg",
"exp_avg_sq"}}, "param_groups": [...]}) — the layout-free format that `adamw_full_state` gives for
a plain torch AdamW — so a checkpoint written under dp2 loads under dp4 or in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmfuse.parallel.collectives import _all_gather_single
from mmfuse.parallel.data_parallel import GradReducer, NamedParams
from mmfuse.train.optim import adamw_kernel


@dataclass
class Segment:
    """The part of one parameter that lies in this rank's shard of a bucket."""
    bucket: int
    name: str
    param: nn.Parameter
    shard_lo: int        # offset in the bucket's shard
    param_lo: int        # offset in the flattened parameter
    numel: int

    def of_shard(self, shard: torch.Tensor) -> torch.Tensor:
        return shard[self.shard_lo:self.shard_lo + self.numel]

    def of_param(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1)[self.param_lo:self.param_lo + self.numel]


class ZeroAdamW:
    """AdamW with state sharded over `group`; gradients arrive through `self.reducer` (shard mode)."""

    def __init__(self, named_params: NamedParams, param_groups: list[dict[str, Any]], group=None,
                 bucket_mb: float = 25.0, overlap: bool = True, reduce_dtype: torch.dtype | None = None,
                 deferred=()):
        self.reducer = GradReducer(named_params, group, bucket_mb, overlap, shard=True, reduce_dtype=reduce_dtype,
                                   deferred=deferred)
        self.group, self.world, self.rank = group, self.reducer.world, self.reducer.rank
        self.param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
        for g in self.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("ZeroAdamW implements plain AdamW: amsgrad and maximize are not supported")
            g.setdefault("betas", (0.9, 0.999))
            g.setdefault("eps", 1e-8)
            g.setdefault("weight_decay", 0.0)
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        reduced = {id(p) for _, p in self.reducer.named}
        if set(group_of) != reduced:
            raise ValueError(f"param groups hold {len(group_of)} parameters but {len(reduced)} require grad; "
                             "they must be the same set (build the groups from the same model)")
        self.segments: list[list[Segment]] = [[] for _ in self.param_groups]
        for b in self.reducer.buckets:
            size = b.shard.numel()
            lo, hi = self.rank * size, (self.rank + 1) * size
            for name, p, off in zip(b.names, b.params, b.offsets):
                a, z = max(lo, off), min(hi, off + p.numel())
                if a < z:
                    self.segments[group_of[id(p)]].append(Segment(b.index, name, p, a - lo, a - off, z - a))
        shards = [b.shard for b in self.reducer.buckets]
        self.master = [torch.zeros_like(s, dtype=torch.float32) for s in shards]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]
        self.steps = 0
        self._where = {name: (b, off, p) for b in self.reducer.buckets
                       for name, p, off in zip(b.names, b.params, b.offsets)}
        self.reload_master()

    @classmethod
    def from_adamw(cls, model: nn.Module, optimizer: torch.optim.Optimizer, group=None, **kw) -> "ZeroAdamW":
        """Shard the param groups (lr, weight_decay, lr_multiplier, betas, eps) of a fresh AdamW, as
        `mmfuse.train.optim.build_optimizer` makes it."""
        if optimizer.state:
            raise ValueError("from_adamw takes an optimizer that has not stepped (its state would be dropped)")
        return cls(model.named_parameters(), optimizer.param_groups, group, **kw)

    def _each(self, fn) -> None:
        for segs in self.segments:
            for s in segs:
                fn(s)

    def reload_master(self) -> None:
        """Copy this rank's slice of the current weights into the fp32 master shard (after the model's
        weights were loaded from a checkpoint)."""
        with torch.no_grad():
            self._each(lambda s: s.of_shard(self.master[s.bucket]).copy_(s.of_param(s.param)))

    # ---- the step ----------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.reducer.named:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, counted=None, over_world: bool = False) -> torch.Tensor:
        """Scale the reduced shard gradients so the global L2 norm is at most max_norm; returns the norm
        before clipping (torch.nn.utils.clip_grad_norm_'s rule: coef = max_norm / (norm + 1e-6), ≤ 1).
        With tensor or pipeline parallelism the norm spans other groups too: `counted(name, param)` says
        whether this rank's copy of a parameter enters it (replicas count once) and `over_world` sums the
        squares over every rank instead of this optimizer's group."""
        if counted is None:
            sq = sum(b.shard.double().pow(2).sum() for b in self.reducer.buckets)  # padding is zero
        else:
            sq = torch.zeros((), dtype=torch.float64, device=self.reducer.buckets[0].shard.device)
            for segs in self.segments:
                for seg in segs:
                    if counted(seg.name, seg.param):
                        sq += seg.of_shard(self.reducer.buckets[seg.bucket].shard).double().pow(2).sum()
        if over_world:
            dist.all_reduce(sq)
        elif self.world > 1:
            dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for b in self.reducer.buckets:
            b.shard.mul_(coef.to(b.shard.dtype))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's shard (reduced gradients from reducer.finish()), then all-gather weights."""
        if not self.reducer.fresh:
            raise RuntimeError("ZeroAdamW.step() before reducer.finish(): the shards hold no reduced gradients")
        self.reducer.fresh = False
        self.steps += 1
        for g, segs in zip(self.param_groups, self.segments):
            if segs:
                shards = [self.reducer.buckets[s.bucket].shard for s in segs]
                update = adamw_fused if adamw_kernel(self.master[0].device.type) == "fused" else adamw_foreach
                update([s.of_shard(self.master[s.bucket]) for s in segs],
                              [s.of_shard(sh).float() for s, sh in zip(segs, shards)],
                              [s.of_shard(self.exp_avg[s.bucket]) for s in segs],
                              [s.of_shard(self.exp_avg_sq[s.bucket]) for s in segs],
                              self.steps, g["lr"], g["betas"], g["eps"], g["weight_decay"])
        self._gather_weights()

    def _gather_weights(self) -> None:
        pending = []
        for b, master in zip(self.reducer.buckets, self.master):
            if self.world == 1:
                pending.append((b, master, None))
                continue
            # The gradient buffer is free until the next backward: gather into it when dtypes match.
            full = b.buffer if b.buffer.dtype == b.param_dtype else torch.empty_like(b.buffer, dtype=b.param_dtype)
            pending.append((b, full, _all_gather_single(full, master.to(b.param_dtype), group=self.group,
                                                        async_op=True)))
        for b, full, handle in pending:
            if handle is not None:
                handle.wait()
            for _, p, view in b.views(full):
                p.copy_(view)

    # ---- checkpoints: full state by parameter name -------------------------------------------------

    def _gather_full(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.world == 1:
            return shards
        fulls = [s.new_empty(s.numel() * self.world) for s in shards]
        for full, s in zip(fulls, shards):
            _all_gather_single(full, s, group=self.group)
        return fulls

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state keyed by parameter name; a collective: every rank of the group calls it."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        if self.steps:
            exp_avg, exp_avg_sq = self._gather_full(self.exp_avg), self._gather_full(self.exp_avg_sq)
            # fp32 weights equal their master copy; lower-precision ones would lose its extra bits.
            keep_master = any(b.param_dtype != torch.float32 for b in self.reducer.buckets)
            master = self._gather_full(self.master) if keep_master else None
            step = torch.tensor(float(self.steps))       # torch AdamW keeps a float32 scalar per parameter
            for b in self.reducer.buckets:
                for name, p, off in zip(b.names, b.params, b.offsets):
                    cut = lambda flat: flat[off:off + p.numel()].view_as(p).clone()  # noqa: E731
                    state[name] = {"step": step.clone(), "exp_avg": cut(exp_avg[b.index]),
                                   "exp_avg_sq": cut(exp_avg_sq[b.index])}
                    if master is not None and b.param_dtype != torch.float32:
                        state[name]["master"] = cut(master[b.index])
        names = dict((id(p), n) for n, p in self.reducer.named)
        groups = [dict(g, params=[names[id(p)] for p in g["params"]]) for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def state_items(self) -> list[tuple[str, str, torch.Size, torch.dtype]]:
        """(parameter name, state key, shape, dtype) of every tensor state_dict() would hold, without
        gathering anything: what a sharded checkpoint writer plans with."""
        if not self.steps:
            return []
        out = []
        for b in self.reducer.buckets:
            for name, p in zip(b.names, b.params):
                keys = ["step", "exp_avg", "exp_avg_sq"] + (["master"] if b.param_dtype != torch.float32 else [])
                out += [(name, k, torch.Size() if k == "step" else p.shape, torch.float32) for k in keys]
        return out

    @torch.no_grad()
    def gather_state(self, name: str, key: str, dst: int) -> torch.Tensor | None:
        """One parameter's state tensor (as state_dict() has it) on group rank `dst`, None elsewhere.
        Only the ranks whose shards hold part of the parameter send their part to dst (point to point),
        so a checkpoint writer holds one parameter's state at a time instead of the whole gathered
        state. Every rank of the group calls it with the same arguments, in the same order."""
        if key == "step":
            return torch.tensor(float(self.steps)) if self.rank == dst else None
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"ZeroAdamW: no parameter named {name!r} in this rank's buckets")
        b, off, p = where
        flats = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "master": self.master}[key][b.index]
        size = b.shard.numel()
        out = torch.empty(p.numel(), dtype=flats.dtype, device=flats.device) if self.rank == dst else None
        for r in range(self.world):
            lo, hi = max(r * size, off), min((r + 1) * size, off + p.numel())
            if lo >= hi:
                continue
            if r == self.rank == dst:
                out[lo - off:hi - off].copy_(flats[lo - r * size:hi - r * size])
            elif r == self.rank:
                dist.send(flats[lo - r * size:hi - r * size].contiguous(), self._global(dst))
            elif self.rank == dst:
                piece = torch.empty(hi - lo, dtype=flats.dtype, device=flats.device)
                dist.recv(piece, self._global(r))
                out[lo - off:hi - off].copy_(piece)
        return out.view(p.shape) if out is not None else None

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def load_state_dict(self, full: dict[str, Any]) -> None:
        """Take this rank's slice of a full state (from any layout). Load the model's weights first: the
        fp32 master shard is re-read from them (unless the state carries master weights)."""
        state = full["state"]
        names = {n for n, _ in self.reducer.named}
        if state and set(state) != names:
            missing, unknown = sorted(names - set(state)), sorted(set(state) - names)
            raise ValueError(f"optimizer state does not match the trained parameters: missing {missing[:5]}, "
                             f"unknown {unknown[:5]} (did freeze/LoRA settings change?)")
        steps = {int(st["step"]) for st in state.values()}
        if len(steps) > 1:
            raise ValueError(f"ZeroAdamW keeps one step count; the state has several: {sorted(steps)}")
        self.steps = steps.pop() if steps else 0
        self.reload_master()
        with torch.no_grad():
            for t in self.exp_avg + self.exp_avg_sq:
                t.zero_()
            for s in (s for segs in self.segments for s in segs):
                if s.name not in state:
                    continue
                st = state[s.name]
                s.of_shard(self.exp_avg[s.bucket]).copy_(s.of_param(st["exp_avg"]))
                s.of_shard(self.exp_avg_sq[s.bucket]).copy_(s.of_param(st["exp_avg_sq"]))
                if "master" in st:
                    s.of_shard(self.master[s.bucket]).copy_(s.of_param(st["master"]))
        for g, saved in zip(self.param_groups, full.get("param_groups", [])):
            g.update({k: v for k, v in saved.items() if k != "params"})


def adamw_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], step: int, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> None:
    """One AdamW step in place, in the operation order of torch.optim.AdamW(foreach=True) so the two
    agree to the last bits on equal inputs: decoupled decay, moments, bias-corrected update."""
    beta1, beta2 = betas
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


def adamw_fused(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], step: int, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> None:
    """One AdamW step in place through the kernel torch.optim.AdamW(fused=True) calls (after it has
    counted the step)."""
    steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=betas[0],
                        beta2=betas[1], weight_decay=weight_decay, eps=eps, maximize=False)


def adamw_full_state(named_params: NamedParams, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain torch AdamW's state in ZeroAdamW.state_dict()'s format (keyed by parameter name)."""
    names = {id(p): n for n, p in named_params}
    state = {names[id(p)]: {k: (v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v)))
                            for k, v in optimizer.state[p].items()}
             for g in optimizer.param_groups for p in g["params"] if p in optimizer.state}
    groups = [dict(g, params=[names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_adamw_full_state(named_params: NamedParams, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a full state (from ZeroAdamW under any layout, or adamw_full_state) into a plain torch AdamW."""
    by_name = dict(named_params)
    for name, st in full["state"].items():
        p = by_name[name]
        optimizer.state[p] = {k: v.to(p.device).clone() for k, v in st.items() if k != "master"}
    for g, saved in zip(optimizer.param_groups, full.get("param_groups", [])):
        g.update({k: v for k, v in saved.items() if k != "params"})
