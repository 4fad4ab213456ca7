"""Training checkpoints that a crash cannot corrupt and that resume bit for bit.

Layout under save_dir:
    step-00000050/model/            HF directory (config.json + safetensors) — or adapters/ for LoRA runs
    step-00000050/optimizer.safetensors   AdamW state by parameter name
    step-00000050/rng.safetensors         torch RNG states
    step-00000050/trainer_state.json      step, data position, Python/NumPy RNG, run config
    latest                                name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place when complete;
`latest` is replaced atomically afterwards. An interrupted save leaves the previous checkpoint and
`latest` untouched (the stale temporary folder is removed by the next save). No pickle anywhere.
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
from safetensors.torch import load_file, save_file
from torch import nn

from mmfuse.models.common.lora import LoRAConfig, load_adapters, lora_modules, save_adapters

STEP_PREFIX = "step-"
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
    and the param groups' settings. A multi-rank run gathers these on one rank and calls this."""
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(f".{STEP_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final = d / step_dir_name(step)
    tmp = d / f".{final.name}.tmp"
    tmp.mkdir()
    if lora is not None and lora_modules(model):
        save_adapters(model, tmp / "adapters", lora)
    else:
        model.save_pretrained(tmp / "model")
        copy_model_assets(assets, tmp / "model")
    if optimizer_state is not None:
        save_file(optimizer_state, str(tmp / "optimizer.safetensors"))
    full_state = dict(state, step=step, param_groups=param_groups)
    if save_rng:
        save_file(_torch_rng(), str(tmp / "rng.safetensors"))
        full_state["python_rng"] = _py_rng_state()
        full_state["numpy_rng"] = _np_rng_state()
    (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=_jsonable))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = d / ".latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, d / "latest")
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
        opt_path = c / "optimizer.safetensors"
        if not opt_path.is_file():
            raise FileNotFoundError(f"{opt_path}: missing; resume with --no-load-optimizer to start the optimizer afresh")
        _load_optimizer(model, optimizer, load_file(str(opt_path)), opt_path)
        restore_lr(optimizer, state)
    if load_rng and (c / "rng.safetensors").is_file():
        set_rng(c, state)
    return Restored(step=int(state["step"]), state=state)


def restore_lr(optimizer, state: dict[str, Any]) -> None:
    for g, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        g.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})


def per_param_state(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """optimizer.safetensors' `name::key` tensors grouped by parameter name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition("::")
        out.setdefault(name, {})[k] = t
    return out


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


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    path: Path) -> None:
    by_name = dict(model.named_parameters())
    trained = {p for g in optimizer.param_groups for p in g["params"]}
    per_param = per_param_state(tensors)
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
