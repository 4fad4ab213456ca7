"""Packed micro-batches with images (and a video) for the parallel tests, built from the tiny config."""

from __future__ import annotations

import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from tests.models.qwen_fixtures import pixels_for, sample

# Per micro-batch: samples as parts (text lengths, ('image'|'video', grid)). Odd lengths on purpose.
LAYOUTS = [
    [[5, ("image", (1, 4, 4)), 9], [3, ("image", (1, 2, 4)), 6]],
    [[7, ("video", (2, 4, 4)), 4]],
    [[11], [2, ("image", (1, 4, 2)), 13, ("image", (1, 2, 2)), 3]],
    [[17, ("image", (1, 2, 2)), 1]],
]


def tiny_model(seed: int = 0) -> Qwen2_5_VL:
    torch.manual_seed(seed)
    return Qwen2_5_VL(Qwen2_5_VLConfig.preset("tiny"))


def micro_batch(cfg: Qwen2_5_VLConfig, samples: list, seed: int) -> dict:
    """One packed micro-batch: input_ids [T], labels (prompt half masked), cu_seqlens, pixels and grids."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels, cu = [], [], [0]
    grids = {"image": [], "video": []}
    for parts in samples:
        s = sample(cfg, parts, gen)
        lab = list(s)
        for i in range(len(lab) // 2):          # mask the first half like a prompt
            lab[i] = -100
        for i, t in enumerate(s):               # vision pads never carry labels
            if t in (cfg.image_token_id, cfg.video_token_id):
                lab[i] = -100
        ids += s
        labels += lab
        cu.append(len(ids))
        for p in parts:
            if not isinstance(p, int):
                grids[p[0]].append(p[1])
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
             "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    if grids["image"]:
        batch["pixel_values"] = pixels_for(cfg, grids["image"], gen)
        batch["image_grid_thw"] = torch.tensor(grids["image"])
    if grids["video"]:
        batch["pixel_values_videos"] = pixels_for(cfg, grids["video"], gen)
        batch["video_grid_thw"] = torch.tensor(grids["video"])
        batch["second_per_grid_ts"] = torch.ones(len(grids["video"]))
    return batch


def micro_batches(cfg: Qwen2_5_VLConfig, n: int = 4, seed: int = 0) -> list[dict]:
    return [micro_batch(cfg, LAYOUTS[i % len(LAYOUTS)], seed + i) for i in range(n)]


def label_tokens(batch: dict) -> int:
    """Tokens with a next-token target (what the loss is averaged over)."""
    from mmfuse.models.qwen2_5_vl.model import shift_labels
    return int((shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).sum())
