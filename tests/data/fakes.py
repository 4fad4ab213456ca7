"""A stand-in for the Qwen2-VL image processor with the same call interface: grids from the image
size (14-px patches, even counts), one patch row per grid cell filled with the image's mean value."""

import numpy as np
import torch


def _even(n):
    return max(2, n - n % 2)


class FakeProcessor:
    merge_size = 2
    temporal_patch_size = 2
    patch_size = 14
    dim = 3 * 2 * 14 * 14

    def _grid_rows(self, frames):
        h, w = _even(frames[0].height // 14), _even(frames[0].width // 14)
        t = max(1, len(frames) // 2)
        mean = float(np.mean([np.asarray(f, dtype=np.float32).mean() for f in frames]))
        return (t, h, w), torch.full((t * h * w, self.dim), mean)

    def __call__(self, images=None, videos=None):
        out = {}
        if images:
            grids, rows = zip(*[self._grid_rows([im]) for im in images])
            out["pixel_values"], out["image_grid_thw"] = torch.cat(rows), torch.tensor(grids)
        if videos:
            grids, rows = zip(*[self._grid_rows(frames) for frames in videos])
            out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(rows), torch.tensor(grids)
        return out


class FakeAV:
    """Stands in for the `av` (PyAV) module: `open(path)` gives a container with one video stream of
    `frames` frames over `seconds`, frame i filled with grey level 10·i; a file whose bytes are not
    b"video" raises as PyAV does on a corrupt file."""

    class _Frame:
        def __init__(self, i):
            self.i = i

        def to_image(self):
            from PIL import Image
            return Image.new("RGB", (56, 56), (10 * self.i,) * 3)

    class _Stream:
        type = "video"

        def __init__(self, frames, seconds):
            from fractions import Fraction
            self.frames, self.time_base, self.duration = frames, Fraction(1, 1000), int(seconds * 1000)

    class _Container:
        def __init__(self, stream):
            self.streams = [stream]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, stream):
            return (FakeAV._Frame(i) for i in range(stream.frames))

    def __init__(self, frames=20, seconds=10.0):
        self.n, self.seconds = frames, seconds

    def open(self, path, mode="r"):
        with open(path, "rb") as f:
            if f.read() != b"video":
                raise ValueError("Invalid data found when processing input")
        return self._Container(self._Stream(self.n, self.seconds))
