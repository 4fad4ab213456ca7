"""A small, learnable multimodal dataset for the CPU demo and for tests: one coloured shape per
image on a plain background, with questions about its colour and shape and short answers, in the
MLLM format, plus a tiny tokenizer that knows every word used. Deterministic for a given seed."""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmfuse.data.atomic import write_bytes_atomic, write_text_atomic
from mmfuse.data.template import DEFAULT_SYSTEM
from mmfuse.data.tokenizer import build_tiny_tokenizer

DATA_FILE = "mllm_data.json"
IMAGE_DIR = "images"
MODEL_DIR = "model"

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)
# Multiples of 28 px (two 14-px patches): 2x2 to 4x3 merged tokens per image.
SIZES = ((56, 56), (84, 56), (56, 84), (84, 84), (112, 84))
QUESTIONS = {
    "colour": ("What colour is the shape?", lambda c, s: f"{c.capitalize()}."),
    "shape": ("What shape is this?", lambda c, s: f"A {s}."),
    "describe": ("Describe the image.", lambda c, s: f"A {c} {s}."),
}


@dataclass
class DemoInfo:
    """What make_demo_dataset wrote."""
    root: str          # the output folder; set it as dataset_dir
    data_file: str     # the MLLM JSON file
    image_dir: str     # folder of the PNG images
    model_dir: str     # folder with tokenizer.json, tokenizer_config.json, preprocessor_config.json
    n_samples: int     # samples in data_file
    n_images: int      # images written
    vocab_size: int    # tokenizer size, special tokens last


def draw_shape(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One shape filling 45-80% of the shorter side, at a random position inside the image."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    side = rng.randint(int(0.45 * min(size)), int(0.8 * min(size)))
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return image


def tokenizer_corpus() -> list[str]:
    """Every text the demo produces, in the chat layout, so that BPE merges whole words."""
    lines = [f"system\n{DEFAULT_SYSTEM}\n", "user\n", "assistant\n"]
    for question, answer in QUESTIONS.values():
        for colour in COLOURS:
            for shape in SHAPES:
                lines.append(f"user\n{question}\nassistant\n{answer(colour, shape)}\n")
    return lines


def make_demo_dataset(out_dir: str | os.PathLike, n_samples: int = 256, seed: int = 0,
                      force: bool = False) -> DemoInfo:
    """Write `out_dir`/mllm_data.json, `out_dir`/images/*.png and `out_dir`/model/ (tokenizer and
    preprocessor config). Refuses to overwrite an existing demo unless `force`."""
    from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS, Qwen2_5_VLConfig

    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    root = Path(out_dir)
    data_file = root / DATA_FILE
    if data_file.exists() and not force:
        raise FileExistsError(f"{data_file} exists; pass force=True (--force) to overwrite the demo dataset")
    image_dir, model_dir = root / IMAGE_DIR, root / MODEL_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)

    if force:
        # A previous, larger demo would leave images no sample refers to.
        for stale in image_dir.glob("*.png"):
            if stale.stem.isdigit() and int(stale.stem) >= n_samples:
                stale.unlink()
    rng = random.Random(seed)
    records = []
    for i in range(n_samples):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        question, answer = QUESTIONS[rng.choice(sorted(QUESTIONS))]
        image = draw_shape(colour, shape, rng.choice(SIZES), rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        name = f"{IMAGE_DIR}/{i:05d}.png"
        write_bytes_atomic(root / name, buffer.getvalue())
        records.append({"images": [name], "messages": [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": answer(colour, shape)}]})
    write_text_atomic(data_file, "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")

    vocab_size = Qwen2_5_VLConfig.preset("tiny").text.vocab_size
    build_tiny_tokenizer(vocab_size, SMALL_VOCAB_SPECIAL_TOKENS, corpus=tokenizer_corpus(), out_dir=model_dir)
    write_text_atomic(model_dir / "preprocessor_config.json", json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return DemoInfo(root=str(root), data_file=str(data_file), image_dir=str(image_dir), model_dir=str(model_dir),
                    n_samples=n_samples, n_images=n_samples, vocab_size=vocab_size)


# Qwen2.5-VL's released preprocessor_config.json values (CLIP mean/std, 14-px patches, 2x2 merge).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}
