"""Hugging Face checkpoint directories ↔ mmfuse's Qwen2.5-VL, without transformers.

Reads config.json + safetensors (one file or sharded with model.safetensors.index.json), with
either the released key names (`visual.*`, `model.*`, `lm_head.*`) or transformers 5's nested
ones (`model.visual.*`, `model.language_model.*`). Writes the released names, which every
transformers version since Qwen2.5-VL's release loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig

PATCH_EMBED = "visual.patch_embed.proj.weight"
_MAX_LISTED = 20


def read_config(hf_dir: str | os.PathLike) -> Qwen2_5_VLConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return Qwen2_5_VLConfig.from_hf_dict(raw)


def canonical_name(key: str) -> str:
    """Released-layout name of a checkpoint key (maps transformers 5's nested names)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory (the index's shards, or the single file)."""
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {d}: {missing}")
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in d.glob("*.bin"))
        hint = (f" (found {bins}: pickle-based .bin weights are not loaded for safety; convert them to "
                f"safetensors)") if bins else ""
        raise FileNotFoundError(f"{d}: no *.safetensors weights{hint}")
    return files


def load_state_dict(model: torch.nn.Module, hf_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
    """Fill `model` (possibly on the meta device) from the directory's safetensors. Missing,
    unexpected or mis-shaped tensors raise one ValueError that lists them."""
    cfg: Qwen2_5_VLConfig = model.cfg
    expected = {k: v for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    unexpected, misshaped, misshaped_names = [], [], set()
    for path in weight_files(hf_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = canonical_name(key)
                if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
                    continue                          # tied checkpoints may carry a copy; HF ignores it too
                if name not in expected:
                    unexpected.append(f"{key} ({path.name})")
                    continue
                t = f.get_tensor(key)
                if name == PATCH_EMBED:
                    t = t.reshape(t.shape[0], -1)
                if tuple(t.shape) != tuple(expected[name].shape):
                    misshaped.append(f"{key}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}")
                    misshaped_names.add(name)
                    continue
                loaded[name] = t.to(dtype=dtype or expected[name].dtype, device=device)
    missing = sorted(set(expected) - set(loaded) - misshaped_names)
    problems = [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
                (f"{len(misshaped)} with the wrong shape", misshaped)]
    lines = [f"  {title}: " + ", ".join(items[:_MAX_LISTED]) + (" ..." if len(items) > _MAX_LISTED else "")
             for title, items in problems if items]
    if lines:
        raise ValueError(f"{hf_dir}: checkpoint does not match the Qwen2.5-VL config in config.json:\n"
                         + "\n".join(lines))
    # assign only when the model has no storage yet (meta): a materialised model keeps its Parameter
    # objects, so an optimizer built on them stays attached.
    model.load_state_dict(loaded, strict=True, assign=any(p.is_meta for p in model.parameters()))


def read_weights(hf_dir: str | os.PathLike, names: set[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Only the named tensors (mmfuse names, full shapes) from a directory's safetensors, read lazily:
    a pipeline or tensor-parallel rank loads what it holds, not the whole model. Missing names raise."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(hf_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = canonical_name(key)
                if name in names and name not in out:
                    t = f.get_tensor(key)
                    out[name] = (t.reshape(t.shape[0], -1) if name == PATCH_EMBED else t).to(dtype or t.dtype)
    missing = sorted(names - set(out))
    if missing:
        raise ValueError(f"{hf_dir}: {len(missing)} tensors missing, e.g. {missing[:_MAX_LISTED]}")
    return out


def hf_tensor(cfg: Qwen2_5_VLConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """One tensor under its released HF shape (the patch embed back to Conv3d; others unchanged)."""
    if name == PATCH_EMBED:
        v = cfg.vision
        t = t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return t.detach().contiguous()


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under released HF names and shapes (patch embed back to Conv3d)."""
    return {name: hf_tensor(model.cfg, name, t) for name, t in model.state_dict().items()}


def shard_file_name(i: int, n: int, stem: str = "model") -> str:
    """Hugging Face's name for shard i (0-based) of n: model-00001-of-00004.safetensors."""
    return f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The text of a `<stem>.safetensors.index.json` (tensor name → shard file)."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      indent=2)


def write_config(cfg: Qwen2_5_VLConfig, dtype: torch.dtype, out_dir: str | os.PathLike) -> None:
    """config.json (released layout) for weights stored in `dtype`."""
    config = cfg.to_hf_dict()
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    _atomic(Path(out_dir) / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded above max_shard_bytes, with an index) into
    out_dir. Each file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under a final name."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: t.cpu() for k, t in hf_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic(d / "model.safetensors", lambda p: save_file(shards[0], str(p), metadata=meta))
        stale = d / "model.safetensors.index.json"
        if stale.exists():
            stale.unlink()
    else:
        names = [shard_file_name(i, len(shards)) for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            _atomic(d / name, lambda p, s=shard: save_file(s, str(p), metadata=meta))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        _atomic(d / "model.safetensors.index.json", lambda p: p.write_text(index_json(weight_map, total)))
    write_config(model.cfg, next(iter(sd.values())).dtype, d)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
