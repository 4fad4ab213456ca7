"""Training checkpoints that a crash cannot corrupt and that resume bit for bit.

Layout under save_dir:
    step-00000050/model/            HF directory (config.json + safetensors) — or adapters/ for LoRA runs
    step-00000050/optimizer.safetensors   AdamW state by parameter name (`name::exp_avg`, ...)
    step-00000050/rng.safetensors         torch RNG states
    step-00000050/trainer_state.json      step, data position, Python/NumPy RNG, run config
    latest                                name of the newest complete checkpoint

A multi-rank run (parallel/shard_writer.py) writes the same tensors as shards, each rank its own:
model/model-0000i-of-0000N.safetensors + model/model.safetensors.index.json (a standard Hugging Face
sharded folder) and optimizer-0000i-of-0000M.safetensors + optimizer.safetensors.index.json. The
readers here and in hf_adapter take either form.

A checkpoint is written into a hidden temporary folder (begin_checkpoint), fsynced and renamed into
place when complete, and `latest` is replaced atomically afterwards (finish_checkpoint). An
interrupted save leaves the previous checkpoint and `latest` untouched (the stale temporary folder
is removed by the next save). No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmfuse.data.atomic import fsync_dir, fsync_file, write_text_atomic
from mmfuse.models.common.lora import LoRAConfig, load_adapters, lora_modules, save_adapters

STEP_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.safetensors"                # one process: AdamW state in one file
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"    # several ranks: optimizer-0000i-of-0000N shards
# Files of a Hugging Face model folder besides config.json and the weights: copied into each
# checkpoint's model/ and into final/, so either is a folder a new run (or transformers) starts from.
MODEL_ASSETS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json")


@dataclass
class Restored:
    """What `load_checkpoint` hands back to the loop."""
    step: int
    state: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in save_dir (from `latest`, else the highest step folder)."""
    d = Path(save_dir)
    pointer = d / "latest"
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    steps = sorted(p for p in d.glob(f"{STEP_PREFIX}*") if (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


def save_checkpoint(save_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], lora: LoRAConfig | None = None, save_optimizer: bool = True,
                    save_rng: bool = True, keep_last: int = 0, assets: str | os.PathLike | None = None) -> Path:
    """Write checkpoint `step` atomically; keep only the newest keep_last (0 keeps all). `assets`: the
    model folder whose tokenizer/processor files (MODEL_ASSETS) go into model/ too."""
    tensors = optimizer_tensors(model, optimizer) if save_optimizer else None
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return write_checkpoint(save_dir, step, model, tensors, groups, state, lora, save_rng, keep_last, assets)


def write_checkpoint(save_dir: str | os.PathLike, step: int, model: nn.Module,
                     optimizer_state: dict[str, torch.Tensor] | None, param_groups: list[dict[str, Any]],
                     state: dict[str, Any], lora: LoRAConfig | None = None, save_rng: bool = True,
                     keep_last: int = 0, assets: str | os.PathLike | None = None) -> Path:
    """save_checkpoint from parts: the whole model, optimizer tensors by `name::key` (None: not saved)
    and the param groups' settings. (A multi-rank run writes its shards with parallel/shard_writer.py
    between begin_checkpoint and finish_checkpoint instead.)"""
    tmp = begin_checkpoint(save_dir, step)
    if lora is not None and lora_modules(model):
        save_adapters(model, tmp / "adapters", lora)
    else:
        model.save_pretrained(tmp / "model")
        copy_model_assets(assets, tmp / "model")
    if optimizer_state is not None:
        save_file(optimizer_state, str(tmp / OPTIMIZER_FILE))
    return finish_checkpoint(save_dir, tmp, step, state, param_groups, save_rng, keep_last)


def begin_checkpoint(save_dir: str | os.PathLike, step: int) -> Path:
    """The empty hidden folder checkpoint `step` is written into (stale ones of interrupted saves are
    removed first). Nothing a reader looks at changes until finish_checkpoint."""
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(f".{STEP_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoint_tmp_dir(d, step)
    tmp.mkdir()
    return tmp


def checkpoint_tmp_dir(save_dir: str | os.PathLike, step: int) -> Path:
    """The hidden folder checkpoint `step` is written into before it is renamed into place."""
    return Path(save_dir) / f".{step_dir_name(step)}.tmp"


def finish_checkpoint(save_dir: str | os.PathLike, tmp: Path, step: int, state: dict[str, Any],
                      param_groups: list[dict[str, Any]], save_rng: bool = True, keep_last: int = 0) -> Path:
    """Add trainer_state.json (and RNG states) to a fully written `tmp`, fsync everything in it, rename
    it into place and only then point `latest` at it (atomically); prune to keep_last. In a multi-rank
    save one rank calls this after every rank has reported its files written (shard_writer.settle)."""
    d = Path(save_dir)
    final = d / step_dir_name(step)
    full_state = dict(state, step=step, param_groups=param_groups)
    if save_rng:
        save_file(_torch_rng(), str(tmp / "rng.safetensors"))
        full_state["python_rng"] = _py_rng_state()
        full_state["numpy_rng"] = _np_rng_state()
    (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=_jsonable))
    for root, _, files in os.walk(tmp):
        for f in files:
            fsync_file(Path(root) / f)
        fsync_dir(root)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(d)
    write_text_atomic(d / "latest", final.name + "\n")
    fsync_dir(d)
    if keep_last > 0:
        done = sorted(p for p in d.glob(f"{STEP_PREFIX}*") if (p / "trainer_state.json").is_file())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def copy_model_assets(src: str | os.PathLike | None, dst: str | os.PathLike) -> None:
    """Copy the MODEL_ASSETS that `src` has (and `dst` lacks) into `dst`."""
    if src is None:
        return
    for name in MODEL_ASSETS:
        f, to = Path(src) / name, Path(dst) / name
        if f.is_file() and not to.exists():
            shutil.copy2(f, to)


def load_checkpoint(ckpt: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    load_optimizer: bool = True, load_rng: bool = True) -> Restored:
    """Restore model (and optionally optimizer and RNG) from a checkpoint folder."""
    c = Path(ckpt)
    state_path = c / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{c}: not a complete checkpoint (no trainer_state.json)")
    state = json.loads(state_path.read_text())
    if (c / "adapters").is_dir():
        load_adapters(model, c / "adapters")
    else:
        from mmfuse.models.qwen2_5_vl import hf_adapter
        ref = next(model.parameters())
        hf_adapter.load_state_dict(model, c / "model", dtype=ref.dtype, device=ref.device)
    if load_optimizer and optimizer is not None:
        _load_optimizer(model, optimizer, read_optimizer_state(c), c)
        restore_lr(optimizer, state)
    if load_rng and (c / "rng.safetensors").is_file():
        set_rng(c, state)
    return Restored(step=int(state["step"]), state=state)


def restore_lr(optimizer, state: dict[str, Any]) -> None:
    for g, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        g.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})


def per_param_state(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer `name::key` tensors grouped by parameter name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition("::")
        out.setdefault(name, {})[k] = t
    return out


def read_optimizer_state(ckpt: str | os.PathLike, names: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state by parameter name from a checkpoint folder, in either layout: one
    optimizer.safetensors, or shards listed by optimizer.safetensors.index.json (a multi-rank save).
    `names`: only these parameters' state, read lazily (a pipeline stage reads its own)."""
    c = Path(ckpt)
    index, single = c / OPTIMIZER_INDEX, c / OPTIMIZER_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e!r}); the checkpoint is damaged") from None
        by_file: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            if names is None or key.rpartition("::")[0] in names:
                by_file.setdefault(file, []).append(key)
        missing = sorted(f for f in by_file if not (c / f).is_file())
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {c}: {missing}")
        files = [(c / f, keys) for f, keys in sorted(by_file.items())]
    elif single.is_file():
        files = [(single, None)]
    else:
        raise FileNotFoundError(f"{c}: neither {OPTIMIZER_FILE} nor {OPTIMIZER_INDEX}; resume with "
                                "--no-load-optimizer to start the optimizer afresh")
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys if keys is not None else f.keys():
                if names is None or key.rpartition("::")[0] in names:
                    tensors[key] = f.get_tensor(key)
    return per_param_state(tensors)


def set_rng(c: Path, state: dict[str, Any]) -> None:
    if (c / "rng.safetensors").is_file():
        _set_torch_rng(load_file(str(c / "rng.safetensors")))
    if "python_rng" in state:
        random.setstate(_py_rng_from(state["python_rng"]))
    if "numpy_rng" in state:
        np.random.set_state(_np_rng_from(state["numpy_rng"]))


# ---- optimizer state by parameter name ---------------------------------------------------------

def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors named `param_name::key` (the file's layout)."""
    names = _param_names(model)
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                out[f"{names[id(p)]}::{k}"] = t.detach().cpu().contiguous()
    return out


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                    per_param: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    by_name = dict(model.named_parameters())
    trained = {p for g in optimizer.param_groups for p in g["params"]}
    unknown = sorted(n for n in per_param if n not in by_name or by_name[n] not in trained)
    if unknown:
        raise ValueError(f"{path}: optimizer state for parameters this run does not train: {unknown[:10]} "
                         f"(did the freeze/LoRA settings change? resume with --no-load-optimizer)")
    for name, st in per_param.items():
        p = by_name[name]
        optimizer.state[p] = {k: (v.to(p.device) if v.dim() else v.clone()) for k, v in st.items()}


# ---- RNG states (JSON / safetensors, never pickle) ---------------------------------------------

def _torch_rng() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_torch_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _py_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_rng_from(s: list):
    return (s[0], tuple(s[1]), s[2])


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_rng_from(s: list):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in trainer_state.json")
