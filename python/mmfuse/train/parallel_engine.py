"""One optimizer step across ranks: this rank's share of the model (pipeline stages, tensor-parallel
slices, context-parallel attention), the pipeline schedule over the step's micro-batches, gradient
reduction over data (and context) parallel ranks overlapped with backward, and the optimizer
(ZeRO-1 when asked). Checkpoints: every rank writes its share of one layout-free format
(parallel/shard_writer.py) and reads the tensors it holds back from any layout (parallel/checkpoint.py).

Building: the model is created on the meta device, cut to this rank's stages and tensor-parallel
slices, then materialised and filled with the tensors this rank holds, so no rank ever allocates
the whole model. LoRA adapters are wrapped in on the meta device too; their initial values are drawn
whole on every rank, as one process draws them (small: rank × width per module), and sliced like the
rest. A LoRA run saves and exports the adapters alone, in the files one process writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmfuse.models.common.lora import LoRAConfig, apply_lora, initial_adapters, is_adapter_param, read_adapters
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.freeze import freeze
from mmfuse.models.qwen2_5_vl.hf_adapter import read_config
from mmfuse.parallel import checkpoint as pckpt
from mmfuse.parallel.state import ParallelState
from mmfuse.parallel.transforms import ChainTransforms
from mmfuse.train import checkpoint as ckpt
from mmfuse.train.config import RunConfig, weights_dir
from mmfuse.train.engine import StepResult, label_tokens_of
from mmfuse.train.metrics import flop_params, step_flops
from mmfuse.train.optim import build_optimizer


class ParallelEngine:
    def __init__(self, cfg: RunConfig, state: ParallelState):
        from mmfuse.models.qwen2_5_vl.parallelize import apply_tensor_parallel
        from mmfuse.parallel.context_parallel import ContextParallelTransforms, apply_context_parallel
        from mmfuse.parallel.data_parallel import GradReducer
        from mmfuse.parallel.pipeline_schedule import build_pipeline_chunks
        from mmfuse.parallel.sequence_parallel import SequenceParallelTransforms

        layout, m = cfg.parallel, cfg.model
        if m.lora is not None and m.lora.dropout > 0 and layout.tp > 1:
            raise ValueError(f"model.lora.dropout = {m.lora.dropout} with parallel.tp = {layout.tp}: the "
                             "tensor-parallel ranks would drop different inputs of the same tokens; set "
                             "model.lora.dropout to 0 or train with tp = 1")
        self.cfg, self.state, self.world_size = cfg, state, state.world_size
        self.is_logging_rank = state.rank == 0
        hf_dir = weights_dir(m.pretrained)
        model_cfg = read_config(hf_dir)
        layout.validate(state.world_size, model_cfg)
        with torch.device("meta"):
            model = Qwen2_5_VL(model_cfg)
        self._flop_params = flop_params(model)
        if m.freeze:
            freeze(model, m.freeze)
        device = torch.device(cfg.training.device)
        dtype = getattr(torch, m.dtype)
        self.lora, adapters = m.lora, None
        if m.lora is not None:
            apply_lora(model, m.lora)
            adapters = initial_adapters(model, device, dtype)
        self.chunks = build_pipeline_chunks(model, layout, state)
        self.model = self.chunks[0][0]
        sp = layout.sequence_parallel and state.tp > 1
        for part in self._parts():
            if state.tp > 1:
                apply_tensor_parallel(part, state.tp_group, sp, overlap_chunks=layout.tp_overlap_chunks)
        for part in self._parts():
            pckpt.materialize(part, device, dtype)
            pckpt.load_weights(part, hf_dir, state, extra=adapters)
            if state.cp > 1:
                apply_context_parallel(part, state.cp_group, layout.cp_kind)
            part.set_recompute(vision=m.recompute_vision, text=m.recompute_text)
            part.train()
        self.transforms = ChainTransforms([
            ContextParallelTransforms(state.cp_group, layout.cp_kind) if state.cp > 1 else None,
            SequenceParallelTransforms(state.tp_group, cp_size=state.cp) if sp else None])
        named = [(n, p) for part in self._parts() for n, p in part.named_parameters() if p.requires_grad]
        # Gradients summed over another group before the data-parallel reduction: sequence-parallel norm
        # weights (over TP) and a tied embedding held by two pipeline stages. They are reduced last.
        self.tied = state.pp > 1 and model_cfg.text.tie_word_embeddings
        deferred = {n for n, p in named if getattr(p, "sequence_parallel", False)}
        if self.tied:
            deferred.add("model.embed_tokens.weight")
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.zero = None
        self.last_save = None            # ShardStats of this rank's part of the latest save
        if layout.zero1:
            from mmfuse.parallel.zero import ZeroAdamW
            self.zero = ZeroAdamW(named, self.optimizer.param_groups, state.dp_cp_group, layout.bucket_mb,
                                  layout.overlap_grad_reduce, deferred=deferred)
            self.optimizer, self.reducer = self.zero, self.zero.reducer
        else:
            self.reducer = GradReducer(named, state.dp_cp_group, layout.bucket_mb, layout.overlap_grad_reduce,
                                       deferred=deferred)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.training.bf16 \
            else contextlib.nullcontext

    def _parts(self) -> list[Qwen2_5_VL]:
        seen, out = set(), []
        for part, _ in self.chunks:
            if id(part) not in seen:
                seen.add(id(part))
                out.append(part)
        return out

    def describe(self) -> str:
        s, lay = self.state, self.state.layout
        extras = [f"vpp {lay.vpp}" if lay.vpp > 1 else "", f"cp {lay.cp_kind}" if s.cp > 1 else "",
                  "sp" if lay.sequence_parallel and s.tp > 1 else "", "zero1" if lay.zero1 else ""]
        return f"tp {s.tp} · pp {s.pp} · cp {s.cp} · dp {s.dp}" + "".join(f", {e}" for e in extras if e)

    # ---- one step ----------------------------------------------------------------------------------

    def step(self, micro: list[dict[str, Any]], grad_clip: float) -> StepResult:
        from mmfuse.parallel.pipeline_schedule import forward_backward, sync_tied_embedding_grads
        from mmfuse.parallel.tensor_parallel import sync_sequence_parallel_grads

        s = self.state
        counts = torch.tensor([sum(label_tokens_of(b) for b in micro), sum(int(b["input_ids"].numel()) for b in micro)],
                              dtype=torch.float64)
        _all_reduce(counts, s.dp_group)
        label_tokens, tokens = int(counts[0]), int(counts[1])

        def grad_sync(is_last_backward: bool):
            return contextlib.nullcontext() if is_last_backward else self.reducer.no_sync()

        with self.autocast():
            loss_sum, _ = forward_backward(self.chunks, micro, s, 1.0 / max(label_tokens, 1), self.transforms,
                                           grad_sync, overlap_p2p=s.layout.overlap_p2p_comm)

        def other_sums():
            for part in self._parts():
                if s.tp > 1:
                    sync_sequence_parallel_grads(part, s.tp_group)
            if self.tied:
                sync_tied_embedding_grads(self.model, s)

        self.reducer.finish(before=other_sums)
        grad_norm = self._clip(grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The loss: summed by the last stage's TP rank 0 of every (cp, dp) replica, zero elsewhere.
        speaker = s.is_last_stage and s.tp_rank == 0
        total = torch.tensor([loss_sum if speaker else 0.0], dtype=torch.float64)
        _all_reduce(total, None)
        flops = torch.tensor([step_flops(self.model, micro, self._flop_params)], dtype=torch.float64)
        _all_reduce(flops, s.dp_group)
        return StepResult(float(total), label_tokens, tokens, grad_norm, float(flops))

    def _clip(self, max_norm: float) -> float:
        """Global gradient norm over every parameter once (TP slices summed, replicas counted once),
        then clipping by it."""
        if self.zero is not None:
            return float(self.zero.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"),
                                                   counted=self._counted, over_world=True))
        s = self.state
        sq = torch.zeros((), dtype=torch.float64)
        grads = []
        for part in self._parts():
            for n, p in part.named_parameters():
                if p.grad is None:
                    continue
                grads.append(p.grad)
                if self._counted(n, p):
                    sq += p.grad.detach().double().pow(2).sum()
        if s.cp_rank or s.dp_rank:
            sq.zero_()                           # replicas of the (tp, pp) rank 0 gradients
        _all_reduce(sq, None)
        norm = float(sq.sqrt())
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        return norm

    def _counted(self, name: str, p: torch.Tensor) -> bool:
        """Whether this rank's copy of a gradient enters the global norm (each value counted once)."""
        s = self.state
        if getattr(p, "tp_shard", None) is None and s.tp_rank != 0:
            return False                         # replicated over TP: rank 0 speaks for it
        if name == "model.embed_tokens.weight" and s.pp > 1 and not any(sp.embed for _, sp in self.chunks):
            return False                         # the last stage's copy of a tied embedding
        return True

    # ---- checkpoints -------------------------------------------------------------------------------

    def _optimizer_source(self):
        """This rank's optimizer state as the shard writer reads it (ZeRO-1: the shards it holds)."""
        from mmfuse.parallel.shard_writer import ReplicatedOptimizerState, replica_of

        if self.zero is not None:
            return self.zero
        names = {id(p): n for part in self._parts() for n, p in part.named_parameters()}
        by_name = {names[id(p)]: dict(st) for p, st in self.optimizer.state.items()}
        return ReplicatedOptimizerState(by_name, replica_of(self.state.rank, self.state))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, save_dir: Path, step: int, state: dict[str, Any], lora: LoRAConfig | None,
             save_optimizer: bool, save_rng: bool, keep_last: int, assets: Path | None = None) -> Path | None:
        """Write checkpoint `step`: every rank its shards (parallel/shard_writer.py), then rank 0
        publishes it (rename, `latest`) once every rank has reported its files written and fsynced.
        A LoRA run's checkpoint holds the adapters alone, gathered to rank 0 (they are small).
        Returns the checkpoint's path on rank 0, None elsewhere."""
        from mmfuse.parallel.shard_writer import attempt, settle, write_shards

        if self._saved_names(lora) is not None:
            return self._save_adapters(save_dir, step, state, lora, save_optimizer, save_rng, keep_last)
        s, save_dir = self.state, Path(save_dir)
        data = pckpt.gather_objects_over_dp(state.get("data"), s) if s.tp_rank == 0 and s.cp_rank == 0 else None
        tmp = ckpt.checkpoint_tmp_dir(save_dir, step)
        errors: list[BaseException] = []
        if s.rank == 0:
            attempt(errors, lambda: ckpt.begin_checkpoint(save_dir, step))
        unpublished = "nothing was published; `latest` still names the previous checkpoint"
        settle(errors, f"preparing {tmp} ({unpublished})", self._device())
        stats = write_shards(self._parts(), self._optimizer_source() if save_optimizer else None, s, tmp / "model",
                             tmp if save_optimizer else None)
        errors += stats.errors
        if s.rank == 0:
            attempt(errors, lambda: ckpt.copy_model_assets(assets, tmp / "model"))
        settle(errors, f"writing checkpoint {tmp} ({unpublished})", self._device())
        self.last_save = stats
        path = None
        if s.rank == 0:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            full_state = dict(state, data_ranks=data, layout=self.describe())
            attempt(errors, lambda: ckpt.finish_checkpoint(save_dir, tmp, step, full_state, groups, save_rng,
                                                            keep_last))
            path = save_dir / ckpt.step_dir_name(step)
        settle(errors, f"publishing checkpoint {tmp}", self._device())
        return path

    def load(self, path: Path, load_optimizer: bool, load_rng: bool) -> ckpt.Restored:
        """Read the tensors this rank holds from a checkpoint of any layout (one file or shards)."""
        import json
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if (path / "adapters").is_dir():
            # a LoRA checkpoint holds the adapters; the base weights are the pretrained ones
            _, adapters = read_adapters(path / "adapters")
            for part in self._parts():
                pckpt.load_weights(part, weights_dir(self.cfg.model.pretrained), self.state, extra=adapters)
        else:
            for part in self._parts():
                pckpt.load_weights(part, path / "model", self.state)
        if load_optimizer:
            names = {n for part in self._parts() for n, _ in part.named_parameters()}
            per_param = ckpt.read_optimizer_state(path, names)
            mine = {}
            for part in self._parts():
                mine.update(pckpt.slice_optimizer_state(part, per_param, self.state))
            if self.zero is not None:
                self.zero.load_state_dict({"state": mine})
            else:
                by_name = {n: p for part in self._parts() for n, p in part.named_parameters()}
                for name, st in mine.items():
                    self.optimizer.state[by_name[name]] = st
            ckpt.restore_lr(self.optimizer, state)
        if load_rng:
            ckpt.set_rng(path, state)
        return ckpt.Restored(step=int(state["step"]), state=state)

    def export(self, final: Path, lora: LoRAConfig | None, assets: Path | None = None) -> None:
        """The trained model as a Hugging Face sharded folder, each rank writing its share."""
        from mmfuse.parallel.shard_writer import attempt, settle, write_shards

        final = Path(final)
        if self._saved_names(lora) is not None:
            self._export_adapters(final, lora)
            return
        errors: list[BaseException] = []
        if self.state.rank == 0:
            attempt(errors, lambda: _clear_weights(final))
        settle(errors, f"preparing {final}", self._device())
        errors += write_shards(self._parts(), None, self.state, final, None).errors
        if self.state.rank == 0:
            attempt(errors, lambda: ckpt.copy_model_assets(assets, final))
        settle(errors, f"exporting {final}", self._device())

    def _save_adapters(self, save_dir: Path, step: int, state: dict[str, Any], lora: LoRAConfig,
                       save_optimizer: bool, save_rng: bool, keep_last: int) -> Path | None:
        """A LoRA run's checkpoint: the adapters and their optimizer state, TP shards gathered, sent to
        rank 0, which writes them in the PEFT format."""
        s = self.state
        optimizer_state = None
        if save_optimizer:
            optimizer_state = (self.zero.state_dict()["state"] if self.zero is not None
                               else self._optimizer_source().by_name)
        weights, optim = {}, {}
        for part in self._parts():
            w, o = pckpt.full_tensors(part, optimizer_state, s, only=self._saved_names(lora))
            weights.update(w)
            optim.update(o)
        data = pckpt.gather_objects_over_dp(state.get("data"), s) if s.tp_rank == 0 and s.cp_rank == 0 else None
        gathered = pckpt.gather_to_rank0(weights, optim, s)
        path = None
        if s.rank == 0:
            full_w, full_o = gathered
            groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            path = ckpt.write_checkpoint(save_dir, step, self._whole(full_w, lora),
                                         full_o if save_optimizer else None, groups,
                                         dict(state, data_ranks=data, layout=self.describe()), lora, save_rng,
                                         keep_last)
        dist.barrier()
        return path

    def _export_adapters(self, final: Path, lora: LoRAConfig) -> None:
        """The trained adapters, gathered to rank 0, in the PEFT format under final/adapters."""
        weights = {}
        for part in self._parts():
            weights.update(pckpt.full_tensors(part, None, self.state, only=self._saved_names(lora))[0])
        gathered = pckpt.gather_to_rank0(weights, {}, self.state)
        if self.state.rank == 0:
            ckpt.save_adapters(self._whole(gathered[0], lora), final / "adapters", lora)
        dist.barrier()

    def _saved_names(self, lora: LoRAConfig | None):
        """Which state-dict entries a save gathers: the adapters alone in a LoRA run, else all."""
        return is_adapter_param if lora is not None and self.lora is not None else None

    def _whole(self, tensors: dict[str, torch.Tensor], lora: LoRAConfig | None) -> Qwen2_5_VL:
        """The whole model on the meta device holding the gathered tensors: every one of them, or, in a
        LoRA run, the adapters only (the base weights stay meta; saving writes adapter files)."""
        with torch.device("meta"):
            whole = Qwen2_5_VL(self.model.cfg)
        if self._saved_names(lora) is None:
            whole.load_state_dict(tensors, strict=True, assign=True)
            return whole
        apply_lora(whole, self.lora)      # on the meta device: draws no random numbers
        missing = sorted({n for n in whole.state_dict() if is_adapter_param(n)} - set(tensors))
        if missing:
            raise RuntimeError(f"gathered adapters lack {len(missing)} tensors, e.g. {missing[:3]}")
        whole.load_state_dict(tensors, strict=False, assign=True)
        return whole


def _all_reduce(t: torch.Tensor, group) -> None:
    if dist.is_initialized() and (group is None or dist.get_world_size(group) > 1):
        dist.all_reduce(t, group=group)


def _clear_weights(d: Path) -> None:
    """Remove the weights of an earlier export from d (a new one may have fewer shards)."""
    d.mkdir(parents=True, exist_ok=True)
    for f in [*d.glob("*.safetensors"), d / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
