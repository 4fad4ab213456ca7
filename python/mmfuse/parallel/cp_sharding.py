"""Zigzag (load-balanced) sharding of a packed token stream over context-parallel ranks.

Each sample of length L (padded to a multiple of 2·cp) is cut into 2·cp chunks of L/(2cp) tokens;
rank r keeps chunks r and 2cp-1-r, in that order. Under a causal mask an early chunk attends to few
keys and a late one to many, so pairing chunk r with its mirror gives every rank the same work
(Megatron's and MindSpeed's load-balanced CP). The vision tower's patch rows are split too, in
contiguous shards (cp_vision.py); the merged features are gathered whole on every rank, and each
rank places those that land on its tokens.

Padding is exact: pads go at the end of each sample, causal attention never lets a real token see a
later one, and the pads' labels are ignore_index, so the loss and every gradient are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mmfuse.parallel import cp_vision
from mmfuse.parallel.collectives import group_rank, group_size
from mmfuse.parallel.layout import CP_KINDS
from mmfuse.parallel.vision_padding import pad_with_image

PAD_TOKEN_ID = 0
IGNORE_INDEX = -100


def check_kind(kind: str) -> str:
    if kind not in CP_KINDS:
        raise ValueError(f"context parallel kind must be one of {', '.join(CP_KINDS)}, got {kind!r}")
    return kind


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    bounds = [int(b) for b in cu_seqlens.tolist()]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def check_padded(cu_seqlens: torch.Tensor, cp: int) -> list[int]:
    """Sample lengths, after checking each is a multiple of 2·cp (what pad_batch guarantees)."""
    lengths = _lengths(cu_seqlens)
    bad = [n for n in lengths if n % (2 * cp)]
    if bad:
        raise ValueError(f"context parallel over {cp} ranks needs every sample's length to be a multiple of "
                         f"2·cp = {2 * cp}; got lengths {bad} (run the batch through pad_batch first)")
    return lengths


def zigzag_index(cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """int64 positions (into the padded stream) of rank `rank`'s tokens, in its local order:
    for each sample, chunk `rank` then chunk 2cp-1-rank."""
    parts, start = [], 0
    for n in check_padded(cu_seqlens, cp):
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
        start += n
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return idx.to(cu_seqlens.device)


def local_cu_seqlens(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """Each sample keeps L/cp tokens on every rank."""
    return torch.div(cu_seqlens, cp, rounding_mode="floor").to(torch.int32)


def max_len(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _pad_stream(x: torch.Tensor, lengths: list[int], padded: list[int], fill) -> torch.Tensor:
    """x [..., T] with each sample extended at its end; fill(sample slice, n) gives the pad values."""
    parts, start = [], 0
    for n, p in zip(lengths, padded):
        piece = x[..., start:start + n]
        parts.append(piece)
        if p > n:
            parts.append(fill(piece, p - n))
        start += n
    return torch.cat(parts, dim=-1)


def _continue_positions(piece: torch.Tensor, n: int) -> torch.Tensor:
    """Pads continue the sample's text positions (any value is exact; this one is what rope_index gives)."""
    base = piece.max() + 1 if piece.numel() else piece.new_zeros(())
    steps = torch.arange(n, device=piece.device, dtype=piece.dtype)
    return (base + steps).expand(*piece.shape[:-1], n)


class ContextParallelTransforms:
    """pad_batch / local_inputs / shard_hidden / gather_for_head (models/<family>/pipeline.py's hook)
    for zigzag context parallelism, and pad_vision / shard_vision / local_vision_inputs /
    gather_vision for the vision tower's contiguous row shards (cp_vision.py). The loss each rank
    computes covers its own tokens: the caller sums loss_sum (and num_label_tokens) over CP ranks,
    and gradients over the dp·cp group.

    Composable with sequence parallel after it: SP may append a sample whose length is a multiple of
    2·cp; local_inputs accepts any sample lengths that are multiples of 2·cp."""

    def __init__(self, cp_group: Any, kind: str = "ring"):
        self.kind = check_kind(kind)
        self.group = cp_group
        self.cp, self.rank = group_size(cp_group), group_rank(cp_group)

    def pad_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Each sample padded at its end to a multiple of 2·cp (token 0, label ignore_index)."""
        ids = batch["input_ids"]
        cu = batch.get("cu_seqlens")
        if ids.dim() == 2:      # an unpadded [B, S] batch: CP works on the packed stream
            if cu is not None:
                raise ValueError("cu_seqlens describes a packed [T] stream; pass input_ids as [T]")
            b, s = ids.shape
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=ids.device)
        elif cu is None:
            cu = torch.tensor([0, ids.shape[0]], dtype=torch.int32, device=ids.device)
        lengths = _lengths(cu)
        unit = 2 * self.cp
        padded = [-(-n // unit) * unit for n in lengths]
        out = dict(batch)
        out["input_ids"] = _pad_stream(ids.reshape(-1), lengths, padded, lambda x, n: x.new_full((n,), PAD_TOKEN_ID))
        if batch.get("labels") is not None:
            out["labels"] = _pad_stream(batch["labels"].reshape(-1), lengths, padded,
                                        lambda x, n: x.new_full((n,), IGNORE_INDEX))
        if batch.get("position_ids") is not None:
            pos = batch["position_ids"].reshape(3, -1)
            out["position_ids"] = _pad_stream(pos, lengths, padded, _continue_positions)
        out["cu_seqlens"] = torch.tensor([0] + padded, dtype=torch.int32, device=cu.device).cumsum(0).to(torch.int32)
        return out

    def local_inputs(self, inp):
        """DecoderInputs as this rank sees them: its tokens' ids, positions and targets, and local
        cu_seqlens (every sample keeps L/cp tokens, so attention kernels see ordinary varlen input)."""
        idx = zigzag_index(inp.cu_seqlens, self.cp, self.rank)
        cu = local_cu_seqlens(inp.cu_seqlens, self.cp)
        return dataclasses.replace(
            inp, ids=inp.ids.index_select(0, idx), position_ids=inp.position_ids.index_select(1, idx),
            target=None if inp.target is None else inp.target.index_select(0, idx),
            cu_seqlens=cu, max_seqlen=max_len(cu))

    def shard_hidden(self, hidden_TD: torch.Tensor, inp) -> torch.Tensor:
        """This rank's rows of the embeddings. index_select's backward scatters the gradient into the
        full [T, D] (zeros elsewhere), so token and vision embeddings get exactly their local share."""
        return hidden_TD.index_select(0, zigzag_index(inp.cu_seqlens, self.cp, self.rank))

    def gather_for_head(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """Identity: the loss is computed on local tokens (the caller sums it over CP ranks)."""
        return hidden_TD

    def pad_vision(self, pixels_TP: torch.Tensor, grid_thw: torch.Tensor, merge: int):
        """Rows padded (one all-zero image) to whole merge groups that split evenly over cp; sequence
        parallel after this pads again for cp·tp if it must."""
        return pad_with_image(pixels_TP, grid_thw, merge, self.cp)

    def shard_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        return cp_vision.shard_rows(x_TD, self.cp, self.rank)

    def local_vision_inputs(self, ctx):
        return cp_vision.local_vision_inputs(ctx, self.cp, self.rank)

    def gather_vision(self, x_TD: torch.Tensor) -> torch.Tensor:
        return cp_vision.gather_rows(x_TD, self.group)
