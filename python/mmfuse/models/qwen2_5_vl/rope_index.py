"""M-RoPE position ids (t, h, w streams) for a packed token stream, as transformers'
`Qwen2_5_VLModel.get_rope_index` computes them per sample (transformers 5.x semantics).

Per sample, positions restart at 0. A text run counts up on all three streams. A vision span of
grid (t, h, w) patches, merged to (t, h/m, w/m) tokens, gets t = floor(frame · interval), h = merged
row, w = merged column, each offset by the current position; the text after it continues at
current + max(h, w) / m. interval is 1 for images and tokens_per_second · second_per_grid_t for
videos (default 1 s per grid step).
"""

from __future__ import annotations

import numpy as np
import torch


def rope_position_ids(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                      second_per_grid_ts: torch.Tensor | None = None, *, image_token_id: int,
                      video_token_id: int, spatial_merge_size: int = 2, tokens_per_second: int = 2) -> torch.Tensor:
    """position_ids [3, T] int64 on input_ids' device for input_ids [T] holding samples split by
    cu_seqlens [B + 1] (None: one sample). Images and videos are consumed in stream order; each
    must appear as a run of exactly t·h·w / m² pad tokens, or ValueError says which."""
    ids = input_ids.detach().reshape(-1).cpu().numpy()
    n_tok = ids.shape[0]
    bounds = [0, n_tok] if cu_seqlens is None else [int(b) for b in cu_seqlens.cpu().tolist()]
    m = int(spatial_merge_size)
    grids = {image_token_id: _grid_list(image_grid_thw), video_token_id: _grid_list(video_grid_thw)}
    used = {image_token_id: 0, video_token_id: 0}
    seconds = [1.0] * len(grids[video_token_id]) if second_per_grid_ts is None else \
        [float(s) for s in torch.as_tensor(second_per_grid_ts).reshape(-1).tolist()]
    if len(seconds) < len(grids[video_token_id]):
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {len(grids[video_token_id])} videos")
    out = np.empty((3, n_tok), dtype=np.int64)
    is_vision = (ids == image_token_id) | (ids == video_token_id)
    vision_at = np.flatnonzero(is_vision)

    for s, e in zip(bounds[:-1], bounds[1:]):
        cur, i = 0, s
        while i < e:
            k = np.searchsorted(vision_at, i)
            nxt = int(vision_at[k]) if k < len(vision_at) and vision_at[k] < e else e
            if nxt > i:                                         # text run [i, nxt)
                out[:, i:nxt] = np.arange(nxt - i) + cur
                cur += nxt - i
                i = nxt
                continue
            tok = int(ids[i])
            kind = "image" if tok == image_token_id else "video"
            idx = used[tok]
            if idx >= len(grids[tok]):
                raise ValueError(f"token {i}: more {kind} spans in input_ids than {kind}_grid_thw rows "
                                 f"({len(grids[tok])})")
            t, h, w = grids[tok][idx]
            used[tok] += 1
            hm, wm = h // m, w // m
            n = t * hm * wm
            if i + n > e or not (ids[i:i + n] == tok).all():
                raise ValueError(f"{kind} {idx} (grid {t}x{h}x{w}) needs {n} consecutive pad tokens from "
                                 f"token {i} within its sample [{s}, {e}); the pad run there is shorter")
            interval = 1.0 if tok == image_token_id else tokens_per_second * seconds[idx]
            tt = (np.arange(t, dtype=np.float64) * interval).astype(np.int64)
            out[0, i:i + n] = np.repeat(tt, hm * wm) + cur
            out[1, i:i + n] = np.tile(np.repeat(np.arange(hm), wm), t) + cur
            out[2, i:i + n] = np.tile(np.arange(wm), t * hm) + cur
            cur += max(hm, wm)
            i += n
    for tok, kind in ((image_token_id, "image"), (video_token_id, "video")):
        if used[tok] != len(grids[tok]):
            raise ValueError(f"{kind}_grid_thw has {len(grids[tok])} rows but input_ids hold {used[tok]} {kind} spans")
    return torch.from_numpy(out).to(input_ids.device)


def _grid_list(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(v) for v in row) for row in torch.as_tensor(grid).reshape(-1, 3).tolist()]
