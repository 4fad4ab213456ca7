"""The training loop: a readable path from the run config to the fused kernels.

One optimizer step = grad_accum packed micro-batches per data-parallel rank; what a step does to the
model is the engine's (train/engine.py: one process, or train/parallel_engine.py across ranks).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from mmfuse.models.common.lora import apply_lora
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.freeze import freeze
from mmfuse.train import checkpoint as ckpt
from mmfuse.train.config import RunConfig, assets_dir, dump_run_config, weights_dir
from mmfuse.train.engine import LocalEngine
from mmfuse.train.metrics import device_peak_tflops, peak_memory_bytes
from mmfuse.train.optim import build_optimizer, lr_at, set_lr

BATCH_KEYS = ("input_ids", "labels", "cu_seqlens", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "second_per_grid_ts")


class BatchSource(Protocol):
    """Endless packed micro-batches (dicts with BATCH_KEYS) whose position can be saved."""
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepMetrics:
    """One optimizer step as logged."""
    step: int                  # 1-based step just finished
    loss: float                # mean next-token loss over the step's label tokens
    lr: float                  # base learning rate used
    grad_norm: float           # global grad norm before clipping
    tokens: int                # real (unpadded) tokens in the step
    label_tokens: int          # tokens that carried a label
    tokens_per_s: float        # tokens / step time
    mfu: float | None          # model FLOPs utilisation (None without a known device peak)
    mem_peak_bytes: int        # peak device memory (max RSS on CPU)
    step_s: float              # wall time of the step
    elapsed_s: float           # wall time since the run (or resume) started


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_model(cfg: RunConfig) -> Qwen2_5_VL:
    """Weights from model.path, then freezing, LoRA and recompute as configured."""
    m = cfg.model
    model = Qwen2_5_VL.from_pretrained(weights_dir(m.pretrained), dtype=getattr(torch, m.dtype),
                                       device=cfg.training.device)
    if m.freeze:
        freeze(model, m.freeze)
    if m.lora is not None:
        apply_lora(model, m.lora)
    model.set_recompute(vision=m.recompute_vision, text=m.recompute_text)
    return model


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k in BATCH_KEYS:
        v = batch.get(k)
        if torch.is_tensor(v):
            v = v.to(device, dtype=dtype if v.is_floating_point() and k.startswith("pixel") else None)
        out[k] = v
    return out


def build_engine(cfg: RunConfig, state: Any = None):
    """LocalEngine in one process; ParallelEngine when the run spans ranks."""
    if state is not None and state.world_size > 1:
        from mmfuse.train.parallel_engine import ParallelEngine
        return ParallelEngine(cfg, state)
    model = build_model(cfg)
    model.train()
    return LocalEngine(model, build_optimizer(model, cfg.optimizer), cfg.training.bf16)


def train(cfg: RunConfig, batches: BatchSource, log: Callable[[str], None] = print,
          on_step_end: Callable[[torch.nn.Module, StepMetrics], str | None] | None = None,
          state: Any = None) -> list[StepMetrics]:
    """Run (or resume) training as cfg says, feeding from `batches` (this data-parallel rank's
    micro-batches); returns the step metrics. `state` is the ParallelState of a multi-rank run
    (None: one process). `on_step_end(model, metrics)` runs after each step (e.g. an evaluation);
    a string it returns is logged."""
    t, c = cfg.training, cfg.checkpoint
    seed_everything(t.seed)
    engine = build_engine(cfg, state)
    model = engine.model
    main = engine.is_logging_rank
    if not main:
        log = _quiet
    save_dir = Path(c.save_dir)
    if main:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "run_config.yaml").write_text(dump_run_config(cfg))

    start = 0
    tokens_seen = 0
    if c.resume:
        latest = ckpt.latest_checkpoint(save_dir)
        if latest is None:
            log(f"resume: no checkpoint in {save_dir}; starting from step 0")
        else:
            restored = engine.load(latest, c.load_optimizer, c.load_rng)
            start = restored.step
            tokens_seen = int(restored.state.get("tokens_seen", 0))
            _restore_data_position(batches, restored.state, state, log)
            log(f"resumed from {latest} at step {start}")

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    where = "" if engine.world_size == 1 else f" on rank 0 of {engine.world_size} ({engine.describe()})"
    log(f"model: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable{where}; steps {start} -> "
        f"{t.max_steps}, grad_accum {t.grad_accum}")

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stream = iter(batches)
    history: list[StepMetrics] = []
    metrics_path = Path(cfg.logging.log_jsonl) if cfg.logging.log_jsonl else save_dir / "metrics.jsonl"
    peak = device_peak_tflops(device, t.peak_tflops) * 1e12
    run_began = time.perf_counter()
    bar = _progress(cfg, start) if main else None
    board = _tensorboard(cfg, save_dir) if main else None

    def save(step: int) -> None:
        state_ = {"tokens_seen": tokens_seen, "data": batches.state_dict()}
        path = engine.save(save_dir, step, state_, cfg.model.lora, c.save_optimizer, c.save_rng, c.keep_last,
                           assets_dir(cfg))
        log(f"saved {path}")

    for step in range(start, t.max_steps):
        began = time.perf_counter()
        lr = lr_at(step, cfg.optimizer, t.max_steps)
        set_lr(engine.optimizer, lr)
        micro = [_to_device(next(stream), device, dtype) for _ in range(t.grad_accum)]
        r = engine.step(micro, cfg.optimizer.grad_clip)
        tokens_seen += r.tokens
        now = time.perf_counter()
        seconds = now - began
        per_device = peak * engine.world_size
        m = StepMetrics(step=step + 1, loss=r.loss_sum / max(r.label_tokens, 1), lr=lr, grad_norm=r.grad_norm,
                        tokens=r.tokens, label_tokens=r.label_tokens,
                        tokens_per_s=r.tokens / seconds / engine.world_size if seconds > 0 else 0.0,
                        mfu=r.flops / (seconds * per_device) if per_device > 0 and seconds > 0 else None,
                        mem_peak_bytes=peak_memory_bytes(device), step_s=seconds, elapsed_s=now - run_began)
        history.append(m)
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(asdict(m)) + "\n")
        if board is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_peak_bytes"):
                board.add_scalar(f"train/{key}", getattr(m, key), m.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {m.loss:.4f}, {m.tokens_per_s:,.0f} tok/s")   # tqdm adds step and ETA
        if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == t.max_steps:
            line = (f"step {m.step}/{t.max_steps} | loss {m.loss:.4f} | lr {m.lr:.2e} | grad {m.grad_norm:.3f}")
            if cfg.logging.log_tps:
                line += f" | {m.tokens_per_s:,.0f} tok/s" + ("/device" if engine.world_size > 1 else "") + \
                        f" | {m.step_s:.2f} s/step"
                if m.mfu is not None:
                    line += f" | MFU {100 * m.mfu:.1f}%"
            (bar.write if bar is not None else log)(line)
        if on_step_end is not None:
            note = on_step_end(model, m)
            if note:
                (bar.write if bar is not None else log)(note)
        if c.save_interval and (step + 1) % c.save_interval == 0 and step + 1 != t.max_steps:
            save(step + 1)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    if start < t.max_steps:
        save(t.max_steps)
    if c.export_hf:
        final = save_dir / "final"
        engine.export(final, cfg.model.lora, assets_dir(cfg))
        log(f"exported {final}")
    return history


def _restore_data_position(batches: BatchSource, saved: dict[str, Any], state: Any, log) -> None:
    """Continue each data-parallel rank's sampler where it stopped. A checkpoint from another
    data-parallel size cannot continue the same sample order: the data then starts afresh (said so)."""
    per_rank = saved.get("data_ranks") or [saved.get("data")]
    dp, dp_rank = (state.dp, state.dp_rank) if state is not None else (1, 0)
    if per_rank[0] is None:
        return
    if len(per_rank) != dp:
        log(f"resume: the checkpoint was written with {len(per_rank)} data-parallel ranks, this run has {dp}; "
            f"the data order starts afresh (weights, optimizer and step continue)")
        return
    batches.load_state_dict(per_rank[dp_rank])


def _quiet(_: str) -> None:
    """Log sink of the ranks that do not print (one rank speaks for the run)."""


def _tensorboard(cfg: RunConfig, save_dir: Path):
    """A SummaryWriter when TensorBoard is installed and wanted (it is an optional extra)."""
    if not cfg.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(save_dir / "tensorboard"))


def _progress(cfg: RunConfig, start: int):
    if not cfg.logging.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.training.max_steps, initial=start, unit="step", dynamic_ncols=True)
