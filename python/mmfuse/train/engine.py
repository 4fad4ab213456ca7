"""What one optimizer step does to the model, in one process (LocalEngine) or across ranks
(ParallelEngine in train/parallel_engine.py): forward and backward of the step's micro-batches,
gradient clipping, the optimizer step; and saving/loading the model and optimizer in the one
checkpoint layout every engine reads and writes.

The loss of a step is the mean over all its label tokens: each micro-batch contributes
loss_sum / label_tokens_in_step, so accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmfuse.models.common.lora import LoRAConfig
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.model import shift_labels
from mmfuse.train import checkpoint as ckpt
from mmfuse.train.metrics import flop_params, step_flops


@dataclass
class StepResult:
    loss_sum: float        # summed next-token loss over the step's label tokens (all ranks)
    label_tokens: int      # tokens that carried a label (all data-parallel ranks)
    tokens: int            # real tokens (all data-parallel ranks)
    grad_norm: float       # global gradient norm before clipping
    flops: float           # model FLOPs of the step (all ranks)


def label_tokens_of(batch: dict[str, Any]) -> int:
    return int((shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).sum())


class LocalEngine:
    """The whole model in this process."""

    is_logging_rank = True
    world_size = 1

    def __init__(self, model: Qwen2_5_VL, optimizer: torch.optim.Optimizer, bf16: bool):
        self.model, self.optimizer = model, optimizer
        device = next(model.parameters()).device
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self._flop_params = flop_params(model)

    def step(self, micro: list[dict[str, Any]], grad_clip: float) -> StepResult:
        label_tokens = sum(label_tokens_of(b) for b in micro)
        loss_sum = 0.0
        for b in micro:
            with self.autocast():
                out = self.model(**b)
            (out.loss_sum / max(label_tokens, 1)).backward()
            loss_sum += float(out.loss_sum.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, label_tokens, sum(int(b["input_ids"].numel()) for b in micro), grad_norm,
                          step_flops(self.model, micro, self._flop_params))

    def save(self, save_dir: Path, step: int, state: dict[str, Any], lora: LoRAConfig | None,
             save_optimizer: bool, save_rng: bool, keep_last: int, assets: Path | None = None) -> Path:
        return ckpt.save_checkpoint(save_dir, step, self.model, self.optimizer, state, lora=lora,
                                    save_optimizer=save_optimizer, save_rng=save_rng, keep_last=keep_last,
                                    assets=assets)

    def load(self, path: Path, load_optimizer: bool, load_rng: bool) -> ckpt.Restored:
        return ckpt.load_checkpoint(path, self.model, self.optimizer, load_optimizer, load_rng)

    def export(self, final: Path, lora: LoRAConfig | None, assets: Path | None = None) -> None:
        if lora is not None:
            ckpt.save_adapters(self.model, final / "adapters", lora)
        else:
            self.model.save_pretrained(final)
            ckpt.copy_model_assets(assets, final)
