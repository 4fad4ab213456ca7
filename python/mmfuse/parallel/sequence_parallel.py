"""Sequence parallelism as a stage transform (the protocol of models/<family>/pipeline.py): between
the tensor-parallel regions of the decoder (norms, residuals) each TP rank holds T/tp tokens.

  pad_batch        append one padding sample so the packed length splits evenly (over cp, then tp)
  local_inputs     identity: attention runs inside the TP region, on every token
  shard_hidden     this rank's T/tp slice of the embeddings (which the vocab-parallel embedding all-reduced)
  gather_for_head  all-gather before the final norm and the vocab-parallel loss (backward reduce-scatters)

and the same for the vision tower, whose window-ordered patch stream is split between the blocks'
TP regions (norms, residuals, MLP input) the same way:

  pad_vision       append one all-zero image so the patch rows split evenly over cp·tp (context
                   parallel shards the rows first; vision_padding.py: its merged tokens are dropped
                   after the merger, and the real images' outputs and gradients are those without it)
  local_vision_inputs  identity: the vision attention runs inside the TP region, on every row
  shard_vision     this rank's T/tp slice of the patch embeddings
  gather_vision    all-gather before the merger, which runs whole on every rank (backward keeps this
                   rank's slice: every TP rank computes the same loss, so the merger's input gradient
                   is already complete on every rank)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmfuse.parallel.collectives import gather_from_group, gather_sequence, group_size, scatter_to_group
from mmfuse.parallel.vision_padding import pad_with_image


def padded_length(t: int, tp: int, cp: int = 1) -> int:
    """The smallest length >= t with (length / cp) % tp == 0 whose padding is a multiple of 2·cp when
    cp > 1 (context parallelism splits every sample, padding included, into 2·cp chunks, and pads
    each sample to a multiple of 2·cp before this runs)."""
    unit = tp * cp if cp == 1 else math.lcm(tp * cp, 2 * cp)
    if cp > 1 and t % (2 * cp):
        raise ValueError(f"packed length {t} is not a multiple of 2·cp = {2 * cp}: pad samples for context "
                         "parallelism before sequence parallelism (transform order cp, then sp)")
    return -(-t // unit) * unit


def pad_with_sample(batch: dict[str, Any], length: int) -> dict[str, Any]:
    """The batch with one text-only sample (token 0, no labels) appended so input_ids has `length` tokens."""
    ids = batch["input_ids"]
    t = ids.shape[0]
    pad = length - t
    if pad == 0:
        return batch
    if ids.dim() != 1:
        raise ValueError("sequence parallelism needs a packed [T] stream with cu_seqlens")
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_zeros(pad)])
    if batch.get("labels") is not None:
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((pad,), -100)])
    cu = batch.get("cu_seqlens")
    cu = torch.tensor([0, t], dtype=torch.int32) if cu is None else cu
    out["cu_seqlens"] = torch.cat([cu, cu.new_tensor([length])])
    if batch.get("position_ids") is not None:   # a text sample's three M-RoPE streams are all 0..pad-1
        pos = batch["position_ids"].reshape(3, -1)
        out["position_ids"] = torch.cat([pos, torch.arange(pad, dtype=pos.dtype).expand(3, pad)], dim=1)
    return out


class SequenceParallelTransforms:
    """Stage transforms for sequence parallelism over `tp_group` (compose after context parallel with
    ChainTransforms([cp, sp]); cp_size tells the padding what the CP transform needs)."""

    def __init__(self, tp_group, cp_size: int = 1):
        self.group, self.cp_size = tp_group, cp_size

    @property
    def tp(self) -> int:
        return group_size(self.group)

    def pad_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        t = batch["input_ids"].shape[0]
        return pad_with_sample(batch, padded_length(t, self.tp, self.cp_size))

    def local_inputs(self, inp):
        return inp

    def shard_hidden(self, hidden_TD: torch.Tensor, inp) -> torch.Tensor:
        return scatter_to_group(hidden_TD, self.group)

    def gather_for_head(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return gather_sequence(hidden_TD, self.group)

    def pad_vision(self, pixels_TP: torch.Tensor, grid_thw: torch.Tensor, merge: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        # Over cp·tp: context parallel (before this in the chain) splits the rows over cp, then we
        # split each rank's rows over tp; its own padding (to cp) may leave rows this one must add to.
        return pad_with_image(pixels_TP, grid_thw, merge, self.tp * self.cp_size)

    def local_vision_inputs(self, ctx):
        return ctx

    def shard_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        return scatter_to_group(x_TD, self.group)

    def gather_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        return gather_from_group(x_TD, self.group)

