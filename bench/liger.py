"""Liger-Kernel as a baseline: its ops called on the tensors mmfuse's GPU benchmarks use, and where
it comes from.

The GPU machine has no network and no Liger-Kernel, so its wheel is carried in bench/wheels/ (pure
Python; see bench/wheels/README.md) and bench/gpu_check.sh / gpu_model_check.sh install it into a
temporary directory on PYTHONPATH. Nothing here imports liger_kernel until a function is called, so
the benchmarks run (with Liger recorded as skipped, and why) where it is missing.

Each op function takes the layouts of bench/gpu_bandwidth.py's cases and calls the autograd
Function Liger's own modules call (what `apply_liger_kernel_to_*` puts into a Hugging Face model):
  rms_norm      LigerRMSNormFunction, casting_mode "llama" (HF's Qwen2RMSNorm order), as LigerRMSNorm
  add_rms_norm  LigerFusedAddRMSNormFunction (returns the normed sum and the sum, as hf_add_rms_norm)
  swiglu        LigerSiLUMulFunction, as LigerSwiGLUMLP
  rotary        liger_rotary_pos_emb (Liger's dispatcher: its Triton kernel unless CuTe DSL is installed)
  apply_mrope   liger_multimodal_rotary_pos_emb (LigerQwen2VLMRopeFunction), Qwen2-VL's M-RoPE
Liger has no op taking the fused gate/up projection (swiglu_packed) nor a varlen attention.

Layouts: mmfuse's q/k are [T, H, D]; Liger's RoPE kernels take HF's [B, H, T, D] *views* of
[B, T, H, D] storage (they transpose back and read the storage), so `q[None].transpose(1, 2)` costs
no copy, and the outputs are transposed back the same way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

WHEEL_DIR = Path(__file__).resolve().parent / "wheels"
# Where `import liger_kernel` works, these are the names the benchmarks call (checked by the tests).
NAMES = {
    "liger_kernel.ops": ("LigerRMSNormFunction", "LigerFusedAddRMSNormFunction", "LigerSiLUMulFunction",
                         "LigerQwen2VLMRopeFunction"),
    "liger_kernel.transformers.rope": ("liger_rotary_pos_emb",),
    "liger_kernel.transformers.qwen2vl_mrope": ("liger_multimodal_rotary_pos_emb",),
    "liger_kernel.transformers": ("apply_liger_kernel_to_qwen2_5_vl", "LigerRMSNorm", "LigerSwiGLUMLP"),
}


def wheel() -> Path:
    """The carried liger_kernel wheel (exactly one in bench/wheels/)."""
    found = sorted(WHEEL_DIR.glob("liger_kernel-*-py3-none-any.whl"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one liger_kernel wheel in {WHEEL_DIR}, found {[p.name for p in found]}")
    return found[0]


def install(target: Path) -> Path:
    """pip-install the carried wheel into `target` offline (no index, no dependencies); returns target,
    to be put on sys.path / PYTHONPATH. What gpu_check.sh does, for tests."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
                    "-q", "--target", str(target), str(wheel())], check=True)
    return target


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when liger_kernel imports with every name in NAMES, else why not (recorded by the benchmarks)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return f"liger_kernel not importable (bench/gpu_check.sh puts bench/wheels/{wheel().name} on PYTHONPATH)"
    try:
        for module, names in NAMES.items():
            mod = importlib.import_module(module)
            missing = [n for n in names if not hasattr(mod, n)]
            if missing:
                return f"{module} has no {missing} (liger_kernel {version()})"
    except Exception as exc:  # noqa: BLE001 - e.g. a triton it cannot use: recorded, not fatal
        return f"importing liger_kernel failed: {type(exc).__name__}: {exc}"[:300]
    return None


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("liger_kernel")
    except Exception:  # noqa: BLE001 - no metadata (e.g. a source tree on PYTHONPATH)
        return None


# ---- ops in the layouts of bench/gpu_bandwidth.py ------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.ops import LigerRMSNormFunction

    # in_place=False: LigerRMSNorm's default (True) writes dX over the incoming gradient; the benchmark
    # reuses one gradient tensor for every rep. The difference is only where dX goes (a cached
    # allocation, no extra memory traffic).
    return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False, None)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float):
    from liger_kernel.ops import LigerFusedAddRMSNormFunction

    return LigerFusedAddRMSNormFunction.apply(x, r, w, eps, 0.0, "llama", False)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def _hf_view(t_THD: torch.Tensor) -> torch.Tensor:
    return t_THD.unsqueeze(0).transpose(1, 2)          # [1, H, T, D] view of [1, T, H, D] storage


def _from_hf_view(t_1HTD: torch.Tensor) -> torch.Tensor:
    return t_1HTD.transpose(1, 2).squeeze(0)           # back to [T, H, D]


def rotary(q: torch.Tensor, k: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor):
    """HF's apply_rotary_pos_emb: cos/sin [T, D] (the angles repeated over both halves)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    q_out, k_out = liger_rotary_pos_emb(_hf_view(q), _hf_view(k), cos_TD.unsqueeze(0), sin_TD.unsqueeze(0))
    return _from_hf_view(q_out), _from_hf_view(k_out)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, cos_3TD: torch.Tensor, sin_3TD: torch.Tensor,
                mrope_section: list[int]):
    """Qwen2-VL's apply_multimodal_rotary_pos_emb: cos/sin [3, T, D] per (t, h, w) stream, mrope_section
    the half-dim split ([16, 24, 24] at D 128), as transformers 4.x passed it."""
    from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb

    q_out, k_out = liger_multimodal_rotary_pos_emb(_hf_view(q), _hf_view(k), cos_3TD.unsqueeze(1),
                                                   sin_3TD.unsqueeze(1), mrope_section)
    return _from_hf_view(q_out), _from_hf_view(k_out)
