"""Activation recompute (gradient checkpointing) with MindSpeed-MM's policy semantics, applied
from outside the model: blocks read a flag or are run through `run_layers`, so model code is the
same with recompute on or off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class RecomputeConfig:
    """Which activations to drop in forward and recompute in backward, per module (ViT or LLM)."""
    granularity: str | None = None   # None (keep all), "full" (whole layers) or "selective" (core attention only)
    method: str = "uniform"          # full only: "uniform" (chunks of num_layers) or "block" (first num_layers)
    num_layers: int = 1              # full only: chunk size (uniform) or how many leading layers (block)

    def validate(self, where: str = "recompute") -> None:
        if self.granularity not in (None, "full", "selective"):
            raise ValueError(f"{where}.granularity must be null, 'full' or 'selective', got {self.granularity!r}")
        if self.method not in ("uniform", "block"):
            raise ValueError(f"{where}.method must be 'uniform' or 'block', got {self.method!r}")
        if self.granularity == "full" and self.num_layers < 1:
            raise ValueError(f"{where}.num_layers must be >= 1 with granularity 'full', got {self.num_layers}")


def maybe_recompute(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), storing only args for backward and re-running fn there when `enabled` and autograd
    is recording (non-reentrant checkpoint: works with custom ops and closures, RNG state kept)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def set_selective(layers: Sequence[nn.Module], policy: RecomputeConfig) -> None:
    """Switch core-attention recompute on the attention modules under `layers` (flag
    `recompute_core_attention`) according to the policy."""
    on = policy.granularity == "selective"
    for layer in layers:
        for module in layer.modules():
            if hasattr(module, "recompute_core_attention"):
                module.recompute_core_attention = on


def run_layers(layers: Sequence[nn.Module], x: torch.Tensor, policy: RecomputeConfig | None,
               call: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x through `call(layer, x)` for each layer, checkpointing as the 'full' policy says:
    uniform keeps only the input of each chunk of num_layers layers; block checkpoints the first
    num_layers layers one by one and keeps the activations of the rest."""
    full = policy is not None and policy.granularity == "full" and torch.is_grad_enabled()
    if not full:
        for layer in layers:
            x = call(layer, x)
        return x
    k = policy.num_layers
    if policy.method == "block":
        for i, layer in enumerate(layers):
            x = maybe_recompute(i < k, call, layer, x)
        return x

    def chunk_fn(chunk):
        def run(h):
            for layer in chunk:
                h = call(layer, h)
            return h
        return run

    for start in range(0, len(layers), k):
        x = maybe_recompute(True, chunk_fn(layers[start:start + k]), x)
    return x
