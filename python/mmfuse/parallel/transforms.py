"""Composition of the per-stage token transforms (context parallel, then sequence parallel).

A stage (models/<family>/pipeline.py) calls, in order: pad_batch (once per micro-batch),
local_inputs (positions/targets/cu_seqlens as this rank sees them), shard_hidden (right after the
embedding) and gather_for_head (right before the loss); for the vision tower pad_vision,
shard_vision (after the patch embedding), local_vision_inputs (the blocks' per-row rotary tables
for the rows the attention sees) and gather_vision (before the merger). Chaining applies each
transform in list order, except the gathers, which run in reverse (undo the last sharding first).
"""

from __future__ import annotations

from typing import Any

import torch


class ChainTransforms:
    def __init__(self, transforms: list[Any]):
        self.transforms = [t for t in transforms if t is not None]

    def pad_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        for t in self.transforms:
            batch = t.pad_batch(batch)
        return batch

    def local_inputs(self, inp):
        for t in self.transforms:
            inp = t.local_inputs(inp)
        return inp

    def shard_hidden(self, hidden_TD: torch.Tensor, inp) -> torch.Tensor:
        for t in self.transforms:
            hidden_TD = t.shard_hidden(hidden_TD, inp)
            inp = t.local_inputs(inp)
        return hidden_TD

    def gather_for_head(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            hidden_TD = t.gather_for_head(hidden_TD)
        return hidden_TD

    def pad_vision(self, pixels_TP: torch.Tensor, grid_thw: torch.Tensor, merge: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        for t in self.transforms:
            pixels_TP, grid_thw = t.pad_vision(pixels_TP, grid_thw, merge)
        return pixels_TP, grid_thw

    def shard_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x_TD = t.shard_vision(x_TD)
        return x_TD

    def local_vision_inputs(self, ctx):
        for t in self.transforms:
            ctx = t.local_vision_inputs(ctx)
        return ctx

    def gather_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            x_TD = t.gather_vision(x_TD)
        return x_TD
