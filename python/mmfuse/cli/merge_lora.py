"""`mmfuse merge-lora`: fold a LoRA adapter directory (PEFT format, as `mmfuse train` saves it under
any parallel layout) into its base model and write a plain Hugging Face Qwen2.5-VL directory that
transformers and `mmfuse train` load like any other checkpoint.

  mmfuse merge-lora --base Qwen2.5-VL-7B-Instruct --adapters runs/x/final/adapters --out merged-7b
  mmfuse merge-lora --base base --adapters adapters --out merged --dtype bfloat16

The merge runs in fp32 (W + s·B·A, rounded once to --dtype). Files of the base directory other than
its weights and config.json (tokenizer, processor and generation configs, chat template) are copied."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Written by save_pretrained from the model; never copied from the base.
_MODEL_CONFIG = "config.json"


def add_parser(sub) -> None:
    p = sub.add_parser("merge-lora", help="fold LoRA adapters into their base model (a Hugging Face directory)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR", help="the base model's Hugging Face directory")
    p.add_argument("--adapters", required=True, metavar="DIR",
                   help="adapter_config.json + adapter_model.safetensors (a run's adapters/ folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (created)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the written weights (default float32; the merge itself runs in fp32)")
    p.set_defaults(run=run)


def _base_files(base: Path) -> list[Path]:
    """Everything of the base directory that is not weights or the model config."""
    return [f for f in sorted(base.iterdir()) if f.is_file() and f.name != _MODEL_CONFIG
            and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))]


def run(args) -> int:
    from mmfuse.models.common.lora import fold_lora, load_adapters
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL

    base, adapters, out = Path(args.base), Path(args.adapters), Path(args.out)
    if not (base / "config.json").is_file():
        print(f"mmfuse merge-lora: {base}/config.json not found; --base must be a Hugging Face model directory",
              file=sys.stderr)
        return 2
    if out.resolve() in (base.resolve(), adapters.resolve()):
        print(f"mmfuse merge-lora: --out {out} must differ from --base and --adapters (it is written to)",
              file=sys.stderr)
        return 2
    model = Qwen2_5_VL.from_pretrained(base, dtype=torch.float32)
    try:
        cfg = load_adapters(model, adapters)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmfuse merge-lora: {e}", file=sys.stderr)
        return 2
    names = fold_lora(model)
    model.to(DTYPES[args.dtype])
    model.save_pretrained(out)
    copied = _base_files(base)
    for f in copied:
        shutil.copy2(f, out / f.name)
    print(f"merged {len(names)} adapters (rank {cfg.rank}, alpha {cfg.alpha:g}) into {base} -> {out} "
          f"({args.dtype}); copied {len(copied)} other files of the base")
    return 0
