"""Loss (and throughput) curves from a metrics JSONL file, drawn with Pillow so plotting needs no
extra dependency."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 360, 64


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The step records of a metrics JSONL file; bad lines raise ValueError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: metrics file not found")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not a JSON object ({e})") from None
    if not rows:
        raise ValueError(f"{p}: no records")
    # A resumed run appends steps it re-ran; keep the latest record of each step.
    by_step = {int(r["step"]): r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-12:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xs: list[float], ys: list[float],
           title: str, colour: tuple[int, int, int], smooth: int = 0) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text((x0, y0 - 18), title, fill=(20, 20, 20))
    if not xs:
        return
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x, y):
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0))

    for t in _nice_ticks(lo, hi):
        _, yy = px(xmin, t)
        draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
        draw.text((x0 - 52, yy - 6), f"{t:.3g}", fill=(60, 60, 60))
    for t in _nice_ticks(xmin, xmax):
        xx, _ = px(t, lo)
        draw.text((xx - 10, y1 + 6), f"{int(t)}", fill=(60, 60, 60))
    pts = [px(x, y) for x, y in zip(xs, ys)]
    draw.line(pts, fill=tuple(min(255, c + 120) for c in colour) if smooth else colour, width=1)
    if smooth and len(ys) > smooth:
        half = smooth // 2                     # centred window, so the mean does not lag the raw curve
        avg = [sum(ys[max(0, i - half):i + half + 1]) / len(ys[max(0, i - half):i + half + 1])
               for i in range(len(ys))]
        draw.line([px(x, y) for x, y in zip(xs, avg)], fill=colour, width=2)


def plot_metrics(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a PNG with the loss curve (raw and a moving average) and tokens/s per step; returns its path."""
    rows = read_metrics(path)
    steps = [float(r["step"]) for r in rows]
    out_path = Path(out) if out else Path(path).with_suffix(".png")
    img = Image.new("RGB", (WIDTH, 2 * HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    smooth = max(1, len(rows) // 20)
    _panel(draw, (MARGIN, 40, WIDTH - 24, HEIGHT - 40), steps, [float(r["loss"]) for r in rows],
           f"loss per step (thin) and its centred {smooth}-step mean: {Path(path).name}", (31, 119, 180), smooth)
    tps_key = "tokens_per_s" if "tokens_per_s" in rows[0] else None
    if tps_key:
        _panel(draw, (MARGIN, HEIGHT + 40, WIDTH - 24, 2 * HEIGHT - 40), steps, [float(r[tps_key]) for r in rows],
               "tokens per second", (214, 39, 40))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    img.save(tmp)
    os.replace(tmp, out_path)
    return out_path
