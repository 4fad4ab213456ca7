"""Padding of the vision tower's patch stream so it splits evenly over ranks (sequence parallel over
tp, context parallel over cp, both over cp·tp): one all-zero image appended, whose merged tokens
the stage drops after the merger. Attention never crosses images, so the real images' outputs and
gradients are those without it."""

from __future__ import annotations

import math

import torch


def vision_padding(rows: int, parts: int, merge: int) -> int:
    """Patch rows to append so that `rows` (whole merge groups of merge² rows) splits evenly into
    `parts`. A multiple of merge², so the padding image (merge x pad/merge patches) holds whole merge
    groups; 0 for 2 and 4 parts with the usual merge 2, whose streams are multiples of 4 already."""
    unit = math.lcm(parts, merge * merge)
    return -(-rows // unit) * unit - rows


def pad_with_image(pixels_TP: torch.Tensor, grid_thw: torch.Tensor, merge: int, parts: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, grid_thw) with one all-zero image of merge x (pad / merge) patches appended, if
    `parts` does not divide the rows already."""
    pad = vision_padding(pixels_TP.shape[0], parts, merge)
    if pad == 0:
        return pixels_TP, grid_thw
    pixels_TP = torch.cat([pixels_TP, pixels_TP.new_zeros(pad, pixels_TP.shape[1])])
    grid_thw = torch.cat([grid_thw, grid_thw.new_tensor([[1, merge, pad // merge]])])
    return pixels_TP, grid_thw
