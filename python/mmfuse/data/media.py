"""Reading images and videos the way MindSpeed-MM (LLaMA-Factory's Qwen2VLPlugin) does before its
image processor runs: scale into [min_pixels, max_pixels] with NEAREST, RGB, at least 28 px per
side, aspect ratio at most 200; videos sampled at `fps` up to `maxlen` frames, an even count."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mmfuse.data.report import SampleError

_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DECODER_MISSING = "video_decoder_missing"   # skip reason of a video file when PyAV is not installed


def regularize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Apply the pixel bounds and Qwen2-VL's size fixes to a loaded image."""
    nearest = Image.Resampling.NEAREST
    if image.width * image.height > max_pixels:
        factor = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)), resample=nearest)
    if image.width * image.height < min_pixels:
        factor = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)), resample=nearest)
    if image.mode != "RGB":
        image = image.convert("RGB")
    # The processor needs two 14-px patches per side; extreme aspect ratios are clamped to 180:1.
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)), resample=nearest)
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height), resample=nearest)
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180), resample=nearest)
    return image


def load_image(path: str | os.PathLike, min_pixels: int, max_pixels: int) -> Image.Image:
    """Open and regularize an image; SampleError("unreadable_image") naming the file on failure."""
    try:
        with Image.open(path) as im:
            im.load()
            return regularize_image(im, min_pixels, max_pixels)
    except Exception as exc:   # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise SampleError("unreadable_image", f"{path}: {type(exc).__name__}: {exc}") from exc


def sample_indices(total_frames: int, duration_s: float | None, fps: float, maxlen: int) -> np.ndarray:
    """LLaMA-Factory's frame choice: `fps` frames per second of video, at most `maxlen`, evenly spread."""
    n = total_frames if duration_s is None else max(1, math.floor(duration_s * fps))
    n = min(total_frames, maxlen, n)
    return np.linspace(0, total_frames - 1, n).astype(np.int32)


def load_video(path: str | os.PathLike, min_pixels: int, max_pixels: int, fps: float, maxlen: int
               ) -> tuple[list[Image.Image], float]:
    """(frames, sampled frames per second) of a video: a folder of frame images (sorted by name,
    taken as already sampled at `fps`, at most `maxlen` evenly spread) or a video file decoded with
    PyAV when it is installed. An odd frame count is made even by repeating the last frame
    (temporal patches are 2 frames)."""
    path = Path(path)
    rate = fps
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
        if not files:
            raise SampleError("unreadable_video", f"{path}: folder has no frame images ({', '.join(_FRAME_SUFFIXES)})")
        frames = [load_image(files[i], min_pixels, max_pixels)
                  for i in sample_indices(len(files), None, fps, maxlen)]
    else:
        decoded, duration = _decode(path, fps, maxlen)
        frames = [regularize_image(f, min_pixels, max_pixels) for f in decoded]
        if duration:
            rate = len(frames) / duration
    if not frames:
        raise SampleError("unreadable_video", f"{path}: no frames decoded")
    if len(frames) % 2:
        frames.append(frames[-1])
    return frames, rate


def _decode(path: Path, fps: float, maxlen: int) -> tuple[list[Image.Image], float | None]:
    try:
        import av
    except ImportError:
        # Its own reason, not "unreadable_video": the file may be fine, and the summary should say
        # what to install. dataset.fetch_sample does not cache it (installing PyAV must take effect).
        raise SampleError(DECODER_MISSING, f"{path}: decoding video files needs PyAV (pip install av), "
                                           f"or give the video as a folder of frame images") from None
    try:
        with av.open(str(path), "r") as container:
            stream = next(s for s in container.streams if s.type == "video")
            duration = float(stream.duration * stream.time_base) if stream.duration else None
            total = stream.frames or 0
            if total == 0:
                decoded = [f.to_image() for f in container.decode(stream)]
                keep = set(sample_indices(len(decoded), duration, fps, maxlen).tolist()) if decoded else set()
                return [f for i, f in enumerate(decoded) if i in keep], duration
            keep = set(sample_indices(total, duration, fps, maxlen).tolist())
            return [f.to_image() for i, f in enumerate(container.decode(stream)) if i in keep], duration
    except SampleError:
        raise
    except Exception as exc:   # PyAV raises its own error types for corrupt files
        raise SampleError("unreadable_video", f"{path}: {exc}") from exc
