"""The CPU demo run: a tiny Qwen2.5-VL learns to answer questions about generated images of
coloured shapes. `make_demo_run` writes everything a run needs (data, held-out data, tokenizer,
random-init checkpoint, train.yaml); `mmfuse demo` trains on it and reports loss and held-out
answer accuracy before and after."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mmfuse.data.demo_data import QUESTIONS, make_demo_dataset

TRAIN_YAML = "train.yaml"

# Chance accuracy of each demo question for a model that cannot see: 4 colours, 3 shapes, 12 pairs.
CHANCE = {"What colour is the shape?": 1 / 4, "What shape is this?": 1 / 3, "Describe the image.": 1 / 12}
assert set(CHANCE) == {q for q, _ in QUESTIONS.values()}


@dataclass
class DemoRun:
    """What make_demo_run wrote."""
    root: str            # the demo folder
    train_yaml: str      # run config for `mmfuse train`
    model_dir: str       # random-init tiny checkpoint + tokenizer + preprocessor config
    eval_dir: str        # held-out samples (different images, same questions)
    save_dir: str        # where the run writes checkpoints and metrics


def make_demo_run(root: str | os.PathLike, n_train: int = 512, n_eval: int = 96, seed: int = 0,
                  steps: int = 300, force: bool = False) -> DemoRun:
    """Write the demo data, a held-out split, a random-init tiny checkpoint and train.yaml under root."""
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig

    r = Path(root)
    data = make_demo_dataset(r / "data", n_samples=n_train, seed=seed, force=force)
    held_out = make_demo_dataset(r / "eval", n_samples=n_eval, seed=seed + 10_000, force=force)
    torch.manual_seed(seed)
    Qwen2_5_VL(Qwen2_5_VLConfig.preset("tiny")).save_pretrained(data.model_dir)
    config = {
        "model": {"pretrained": "data/model"},
        "data": {"dataset": ["data/mllm_data.json"], "dataset_dir": "data", "cutoff_len": 256},
        "training": {"max_steps": steps, "seq_length": 512, "seed": seed},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_schedule": "cosine", "warmup_steps": 20, "grad_clip": 1.0},
        "checkpoint": {"save_dir": "run", "save_interval": 100, "keep_last": 2},
        "logging": {"log_interval": 25},
    }
    (r / TRAIN_YAML).write_text("# Tiny Qwen2.5-VL fine-tune on generated images (mmfuse demo).\n"
                                + yaml.safe_dump(config, sort_keys=False))
    return DemoRun(root=str(r), train_yaml=str(r / TRAIN_YAML), model_dir=data.model_dir,
                   eval_dir=held_out.root, save_dir=str(r / "run"))


def held_out_samples(run: DemoRun):
    """The processed held-out samples and their chance accuracy."""
    from mmfuse.data.config import DataConfig
    from mmfuse.data.dataset import MLLMDataset

    cfg = DataConfig(dataset=[str(Path(run.eval_dir) / "mllm_data.json")], dataset_dir=run.eval_dir,
                     model_name_or_path=run.model_dir, cutoff_len=256)
    dataset = MLLMDataset(cfg)
    samples = [s for s in dataset if s is not None]
    questions = [next(q for q in CHANCE if q in m.content) for s in dataset.samples for m in s.messages
                 if m.role == "user"]
    chance = sum(CHANCE[q] for q in questions) / max(len(questions), 1)
    return samples, chance
