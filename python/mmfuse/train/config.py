"""The typed run configuration of `mmfuse train` (one YAML file), validated once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfuse.models.common.lora import LoRAConfig
from mmfuse.models.common.recompute import RecomputeConfig
from mmfuse.models.qwen2_5_vl.freeze import MODULE_GROUPS
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.train.optim import OptimizerConfig
from mmfuse.utils.typed_config import build, to_dict

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSection:
    """Which weights to start from and how to adapt them."""
    pretrained: str = ""                             # HF Qwen2.5-VL directory, or an mmfuse checkpoint (step-N/)
    dtype: str = "float32"                           # parameter dtype: float32 | bfloat16 | float16
    freeze: list[str] = field(default_factory=list)  # module groups: vision_encoder, projector, text_decoder
    lora: LoRAConfig | None = None                   # low-rank adapters (base weights frozen)
    recompute_vision: RecomputeConfig | None = None  # activation recompute of the ViT blocks
    recompute_text: RecomputeConfig | None = None    # activation recompute of the decoder layers


@dataclass
class TrainingSection:
    """Steps, batch and precision."""
    max_steps: int = 100                  # optimizer steps
    grad_accum: int = 1                   # micro-batches per optimizer step
    seq_length: int = 2048                # tokens per packed micro-batch (samples are never split)
    seed: int = 1234                      # RNG seed (data order, dropout, LoRA init)
    peak_tflops: float = 0.0              # device peak for MFU (0: look up known GPUs; none on CPU)
    bf16: bool = False                    # bf16 autocast for matmuls (parameters stay in model.dtype)
    device: str = "cpu"                   # cpu | cuda | cuda:N | npu


@dataclass
class CheckpointSection:
    """Where and how often to save, and what to restore on resume."""
    save_dir: str = ""                    # run folder: checkpoints, metrics.jsonl, run_config.yaml
    save_interval: int = 0                # save every N steps (0: only at the end)
    keep_last: int = 2                    # checkpoints kept (0 keeps all)
    save_optimizer: bool = True           # store AdamW state (needed for an exact resume)
    save_rng: bool = True                 # store RNG states (needed for an exact resume)
    resume: bool = False                  # continue from the latest checkpoint in save_dir
    load_optimizer: bool = True           # on resume, restore AdamW state
    load_rng: bool = True                 # on resume, restore RNG states
    export_hf: bool = True                # write save_dir/final as a Hugging Face directory at the end


@dataclass
class LoggingSection:
    """What the run prints and records."""
    log_interval: int = 1                 # print a metrics line every N steps
    log_tps: bool = True                  # include tokens per second (real, unpadded tokens)
    log_jsonl: str = ""                   # metrics file, one JSON object per step (default save_dir/metrics.jsonl)
    progress: bool = True                 # show a progress bar on a terminal
    tensorboard: bool = True              # also write TensorBoard scalars to save_dir/tensorboard when installed


@dataclass
class RunConfig:
    """Everything one `mmfuse train` run needs."""
    model: ModelSection = field(default_factory=ModelSection)
    data: dict[str, Any] = field(default_factory=dict)   # the data section (mmfuse.data's DataConfig fields)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)  # tp/pp/vpp/cp sizes and options

    def validate(self) -> None:
        """Every check that can fail before any work starts; errors name the field."""
        m, t, c = self.model, self.training, self.checkpoint
        if not m.pretrained:
            raise ValueError("model.pretrained: required (a Hugging Face Qwen2.5-VL directory or an mmfuse checkpoint)")
        if weights_dir(m.pretrained) is None:
            raise ValueError(f"model.pretrained: {m.pretrained} holds no config.json (expected a Hugging Face "
                             f"model directory or an mmfuse checkpoint folder step-N/)")
        if m.dtype not in DTYPES:
            raise ValueError(f"model.dtype: must be one of {list(DTYPES)}, got {m.dtype!r}")
        bad = [g for g in m.freeze if g not in MODULE_GROUPS]
        if bad:
            raise ValueError(f"model.freeze: unknown groups {bad}; choose from {sorted(MODULE_GROUPS)}")
        if m.lora is not None:
            m.lora.validate()
        for name in ("recompute_vision", "recompute_text"):
            if getattr(m, name) is not None:
                getattr(m, name).validate(f"model.{name}")
        if t.max_steps < 1 or t.grad_accum < 1 or t.seq_length < 1:
            raise ValueError(f"training: max_steps, grad_accum and seq_length must be >= 1, got {t.max_steps}, "
                             f"{t.grad_accum}, {t.seq_length}")
        self.optimizer.validate("optimizer")
        if not c.save_dir:
            raise ValueError("checkpoint.save_dir: required (where checkpoints and metrics go)")
        if c.save_interval < 0 or c.keep_last < 0:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        self.parallel.validate(world_size())
        if self.logging.log_interval < 1:
            raise ValueError("logging.log_interval must be >= 1")


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted-key overrides ({'training.max_steps': 5}), resolve
    relative paths against the YAML's folder, and validate."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: run config not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    try:
        return _from_raw(raw, _paths_from_cwd(overrides), p.parent)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


PATH_FIELDS = ("model.pretrained", "checkpoint.save_dir", "logging.log_jsonl", "data.dataset_dir", "data.cache_dir",
               "data.tokenizer_dir", "data.model_name_or_path", "data.dataset")


def _paths_from_cwd(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """Paths given on the command line (--save-dir, --set checkpoint.save_dir=...) are relative to the
    working directory, as a shell user expects; only the YAML's own paths are relative to its folder."""
    if not overrides:
        return overrides
    out = dict(overrides)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = _resolve(Path.cwd(), value)
        elif isinstance(value, list):
            out[key] = [_resolve(Path.cwd(), v) if isinstance(v, str) else v for v in value]
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], base: str | Path | None = None) -> RunConfig:
    """A copy of `cfg` with dotted-key overrides applied (relative paths against `base`, default the
    working directory), validated."""
    return _from_raw(to_dict(cfg), overrides, Path(base) if base is not None else Path.cwd())


def _from_raw(raw: dict[str, Any], overrides: dict[str, Any] | None, base: Path) -> RunConfig:
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = build(RunConfig, raw)
    cfg.model.pretrained = _resolve(base, cfg.model.pretrained)
    cfg.checkpoint.save_dir = _resolve(base, cfg.checkpoint.save_dir)
    cfg.logging.log_jsonl = _resolve(base, cfg.logging.log_jsonl)
    cfg.data = dict(cfg.data)
    for key in ("dataset_dir", "cache_dir", "tokenizer_dir", "model_name_or_path"):
        if isinstance(cfg.data.get(key), str):
            cfg.data[key] = _resolve(base, cfg.data[key])
    if isinstance(cfg.data.get("dataset"), list):
        cfg.data["dataset"] = [_resolve(base, d) for d in cfg.data["dataset"]]
    elif isinstance(cfg.data.get("dataset"), str):
        cfg.data["dataset"] = _resolve(base, cfg.data["dataset"])
    cfg.validate()
    return cfg


def weights_dir(pretrained: str) -> Path | None:
    """The HF directory inside `pretrained`: itself, or the model/ folder of an mmfuse checkpoint."""
    p = Path(pretrained)
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def assets_dir(cfg: RunConfig) -> Path | None:
    """The folder the run's tokenizer and preprocessor_config.json come from: data.tokenizer_dir,
    data.model_name_or_path, else the weights' folder (train/batches.py reads them from there)."""
    src = cfg.data.get("tokenizer_dir") or cfg.data.get("model_name_or_path") or weights_dir(cfg.model.pretrained)
    return Path(src) if src else None


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())
