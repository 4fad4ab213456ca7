"""The index tensors of the Qwen2.5-VL vision tower's attention: the window permutation of merge
groups, its inverse, and the cumulative lengths of windows and of frames.

A merge group is the m x m patches (m = spatial_merge_size) that become one LLM token; the processor
stores them contiguously, so permuting groups keeps each group's patches together. Windows are
k x k groups (k = window_size // m // patch_size), tiled from the top-left of every frame; the last
window row / column of a frame is cut short when the frame's group grid is not a multiple of k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionWindows:
    """Everything the tower needs to run window and full attention, computed once per forward."""
    window_index: torch.Tensor       # int64 [N_groups]: window-order position -> group in processor order
    reverse_index: torch.Tensor      # int64 [N_groups]: group in processor order -> window-order position
    cu_window_seqlens: torch.Tensor  # int32 [N_windows + 1]: patch offsets of the non-empty windows
    max_window_seqlen: int           # patches in the largest window
    cu_seqlens: torch.Tensor         # int32 [N_frames + 1]: patch offsets of frames (full-attention blocks)
    max_seqlen: int                  # patches in the largest frame


def vision_windows(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int,
                   patch_size: int) -> VisionWindows:
    """Window and frame layout of the packed patches of the images / videos in grid_thw [n, 3]
    (t, h, w in patches, h and w divisible by spatial_merge_size; validated by the caller).

    `window_index` and `cu_window_seqlens` equal transformers' `get_vision_window_index` (its padded
    windows and the empty ones `unique_consecutive` drops never appear here), `reverse_index` equals
    `argsort(window_index)` and `cu_seqlens` equals `get_vision_cu_seqlens`. Frames keep their order
    under the permutation, so `cu_seqlens` also delimits frames of the permuted sequence. Vectorised
    over groups and windows; tensors are on grid_thw's device.
    """
    device = grid_thw.device
    m, unit = spatial_merge_size, spatial_merge_size ** 2
    k = window_size // spatial_merge_size // patch_size
    if k < 1:
        raise ValueError(f"vision windows: window_size {window_size} is smaller than one merge group "
                         f"({spatial_merge_size} x {patch_size} = {spatial_merge_size * patch_size} px)")
    grid = grid_thw.to(torch.int64)
    t, gh, gw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m     # group grid of each frame
    frame_groups = gh * gw

    # Per group (processor order): its image, frame, and (row, col) in the frame's group grid.
    groups = t * frame_groups
    n = int(groups.sum())
    image = torch.repeat_interleave(torch.arange(grid.shape[0], device=device), groups, output_size=n)
    start = torch.cumsum(groups, 0) - groups
    local = torch.arange(n, device=device) - start[image]
    H, W = gh[image], gw[image]
    frame, in_frame = local // frame_groups[image], local % frame_groups[image]
    row, col = in_frame // W, in_frame % W
    # Windows are laid out frame by frame, window row by window row. Window (wr, wc) has
    # hr = min(k, H - wr*k) rows; every window row before it covers k full-width rows and every
    # window left of it in its row holds hr x k groups, so its first slot is wr*k*W + hr*wc*k.
    wr, wc = row // k, col // k
    hr = torch.clamp(H - wr * k, max=k)
    wcols = torch.clamp(W - wc * k, max=k)
    slot = wr * k * W + hr * wc * k + (row % k) * wcols + col % k
    reverse_index = start[image] + frame * frame_groups[image] + slot
    window_index = torch.empty_like(reverse_index)
    window_index[reverse_index] = torch.arange(n, device=device)

    # Per window (in window order): its size in patches.
    nwh, nww = (gh + k - 1) // k, (gw + k - 1) // k
    windows = t * nwh * nww
    nwin = int(windows.sum())
    w_image = torch.repeat_interleave(torch.arange(grid.shape[0], device=device), windows, output_size=nwin)
    w_local = torch.arange(nwin, device=device) - (torch.cumsum(windows, 0) - windows)[w_image]
    in_frame_win = w_local % (nwh * nww)[w_image]
    w_row, w_col = in_frame_win // nww[w_image], in_frame_win % nww[w_image]
    sizes = (torch.clamp(gh[w_image] - w_row * k, max=k) * torch.clamp(gw[w_image] - w_col * k, max=k)) * unit
    cu_window_seqlens = _cumulative(sizes)

    frame_sizes = torch.repeat_interleave(frame_groups * unit, t)
    cu_seqlens = _cumulative(frame_sizes)
    return VisionWindows(window_index, reverse_index, cu_window_seqlens, _max(sizes), cu_seqlens, _max(frame_sizes))


def _cumulative(sizes: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(sizes, 0), (1, 0)).to(torch.int32)


def _max(sizes: torch.Tensor) -> int:
    return int(sizes.max()) if sizes.numel() else 0
