"""LoRA adapters on any nn.Linear, with merge/unmerge and adapter-only save/load in PEFT's file
layout (adapter_config.json + adapter_model.safetensors), so adapters move between tools.

`apply_lora` swaps matching Linear modules for `LoRALinear`, which subclasses nn.Linear and keeps
the same `weight`/`bias` Parameter objects under the same names: state dicts, optimisers and the
HF adapter see the base model unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """Low-rank adapters: W x + (alpha / rank) · B A dropout(x), A [rank, in], B [out, rank] (B starts at 0)."""
    rank: int = 8                                              # r
    alpha: float = 16.0                                        # scaling numerator
    dropout: float = 0.0                                       # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # last name parts or regexes of full names
    freeze_base: bool = True                                   # freeze every non-LoRA parameter

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the Linear modules to adapt (e.g. q_proj)")


@torch.no_grad()
def init_lora_A_(a: torch.Tensor) -> torch.Tensor:
    """PEFT's init of A (B starts at 0, so the update starts at exactly 0)."""
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; `merge()` folds it into weight, `unmerge()` takes it out."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias          # the same Parameters, not copies
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        init_lora_A_(self.lora_A)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def _delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self._delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self._delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}, merged={self.merged}"


def _matches(name: str, targets: list[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(t == last or re.fullmatch(t, name) for t in targets)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose last name part equals a target (or whose full name matches a
    target regex) with LoRALinear; returns the wrapped names. With freeze_base, only the adapters
    stay trainable."""
    cfg.validate()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, cfg.target_modules)]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules {cfg.target_modules} matched no nn.Linear; Linear names here: {linears}")
    if cfg.freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def fold_lora(model: nn.Module) -> list[str]:
    """Merge every adapter into its weight and put a plain nn.Linear (the same weight and bias
    Parameters) back in its place: the model is then the base architecture with the adapted
    weights, and saves as a base checkpoint. Returns the folded module names."""
    names = list(lora_modules(model))
    for name in names:
        m = model.get_submodule(name)
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return names


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without adapter tensors (what a base checkpoint holds); merge first to bake
    the adapters in."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" not in k and ".lora_B" not in k}


def is_adapter_param(name: str) -> bool:
    """Whether a state-dict name is a LoRA tensor (`<module>.lora_A` / `<module>.lora_B`)."""
    return name.endswith((".lora_A", ".lora_B"))


def initial_adapters(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole adapters of a model that `apply_lora` wrapped on the meta device, by state-dict name,
    drawn from the global RNG in the order (and so with the values) `apply_lora` draws them on a
    materialised model: a run that builds its model on the meta device and keeps slices of it starts
    from the adapters of the one-process run with the same seed."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = init_lora_A_(torch.empty(m.lora_A.shape, device=device, dtype=dtype))
        out[f"{name}.lora_B"] = torch.zeros(m.lora_B.shape, device=device, dtype=dtype)
    return out


def save_adapters(model: nn.Module, out_dir: str | os.PathLike, cfg: LoRAConfig) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT names: base_model.model.<module>.lora_A.weight)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapters: the model has no LoRA modules (call apply_lora first)")
    write_adapters({f"{name}.lora_{ab}": getattr(m, f"lora_{ab}") for name, m in mods.items() for ab in "AB"},
                   out_dir, cfg)


def write_adapters(tensors_by_name: dict[str, torch.Tensor], out_dir: str | os.PathLike, cfg: LoRAConfig) -> None:
    """save_adapters from the adapter tensors by state-dict name (`<module>.lora_A`), e.g. gathered
    from the ranks of a parallel run."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{name}.weight": t.detach().cpu().contiguous()
               for name, t in sorted(tensors_by_name.items())}
    config = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": list(cfg.target_modules), "bias": "none", "task_type": "CAUSAL_LM",
              "mmfuse": asdict(cfg)}
    tmp = d / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / "adapter_model.safetensors")
    tmp = d / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, d / "adapter_config.json")


def read_adapters(adapter_dir: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """(config, adapter tensors by state-dict name `<module>.lora_A`) of an adapter directory."""
    cfg, tensors, _ = _read_adapter_files(Path(adapter_dir))
    prefix, suffix = "base_model.model.", ".weight"
    return cfg, {k[len(prefix):-len(suffix)]: v for k, v in tensors.items()
                 if k.startswith(prefix) and k.endswith(suffix)}


def _read_adapter_files(d: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], Path]:
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; an adapter directory holds adapter_config.json and "
                                    f"adapter_model.safetensors")
    raw = json.loads(cfg_path.read_text())
    cfg = LoRAConfig(**raw["mmfuse"]) if "mmfuse" in raw else LoRAConfig(
        rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
        target_modules=list(raw["target_modules"]))
    return cfg, load_file(str(weights)), weights


def load_adapters(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Apply LoRA as adapter_config.json says and load adapter_model.safetensors into it."""
    cfg, tensors, weights = _read_adapter_files(Path(adapter_dir))
    if not lora_modules(model):
        apply_lora(model, cfg)
    mods = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights}: adapters do not match the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}")
    with torch.no_grad():
        for name, m in mods.items():
            for ab in "AB":
                src = tensors[f"base_model.model.{name}.lora_{ab}.weight"]
                dst = getattr(m, f"lora_{ab}")
                if src.shape != dst.shape:
                    raise ValueError(f"{weights}: {name}.lora_{ab} has shape {tuple(src.shape)}, model "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)
    return cfg
