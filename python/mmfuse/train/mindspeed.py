"""A MindSpeed-MM launch (model.json + data.json + Megatron-style flags) as an mmfuse RunConfig, so
`mmfuse train --mm-model model.json --mm-data data.json --lr ... --train-iters ...` trains what
the MindSpeed-MM script would, in one process or under torchrun with its TP/PP/VPP/CP layout
(data parallel takes the rest of WORLD_SIZE, as in Megatron). Relative paths are taken from the
working directory, as MindSpeed-MM reads them; the returned config holds absolute paths."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmfuse.data.config import DataConfig
from mmfuse.models.qwen2_5_vl.hf_adapter import read_config
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.train.checkpoint import latest_checkpoint
from mmfuse.train.config import (CheckpointSection, LoggingSection, ModelSection, RunConfig, TrainingSection,
                                 weights_dir, world_size)
from mmfuse.train.mindspeed_flags import IGNORED_DEST, UNSUPPORTED, UNSUPPORTED_DEST, parse_megatron_flags
from mmfuse.train.mindspeed_model import ModelJson, check_against_checkpoint, read_model_json
from mmfuse.train.optim import OptimizerConfig
from mmfuse.utils.typed_config import to_dict

PARALLEL_FLAGS = {"tensor_model_parallel_size": "--tensor-model-parallel-size",
                  "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
                  "virtual_pipeline_model_parallel_size": "--virtual-pipeline-model-parallel-size",
                  "context_parallel_size": "--context-parallel-size"}
# MindSpeed's --context-parallel-algo values that mmfuse has (hybrid_cp_algo, adaptive_cp_algo and
# hybrid_adaptive_cp_algo it has not)
CP_ALGOS = {"megatron_cp_algo": "ring", "ulysses_cp_algo": "ulysses"}


def run_config_from_mindspeed(model_json: str | os.PathLike, data_json: str | os.PathLike,
                              args: Sequence[str] | argparse.Namespace,
                              log: Callable[[str], None] = print) -> RunConfig:
    """The validated RunConfig of a MindSpeed-MM Qwen2.5-VL fine-tune. `args` are the script's
    flags (a list of strings, or a namespace parsed with `add_megatron_arguments`). Flags and keys
    without effect here are reported through `log` (one line each for flags and JSON keys)."""
    ns = args if isinstance(args, argparse.Namespace) else parse_megatron_flags(args)
    _reject_unsupported(ns)
    model_raw, data_raw = _read_json(model_json, "--mm-model"), _read_json(data_json, "--mm-data")
    data = DataConfig.from_data_json(data_raw, where=str(data_json))
    model = read_model_json(model_raw, where=str(model_json))

    save = _required(ns, "save", "--save", "the run folder for checkpoints and metrics")
    save = str(Path(save).expanduser().resolve())
    pretrained, resume = _pretrained(_get(ns, "load"), data.model_name_or_path, save, log)
    model_cfg = read_config(weights_dir(pretrained))
    check_against_checkpoint(model_raw, model_cfg, where=str(model_json))

    seq_length = _required(ns, "seq_length", "--seq-length", "tokens per micro-batch (MindSpeed-MM's cutoff)")
    train_iters = _required(ns, "train_iters", "--train-iters", "the number of optimizer steps")
    bf16 = bool(_get(ns, "bf16"))
    ignored_keys = list(model.ignored) + list(data.ignored)
    parallel = _parallel(ns, model, ignored_keys)
    try:
        # here, before DP divides the global batch; the checkpoint's config gives the layer counts
        # that pipeline_num_layers must add up to
        parallel.validate(world_size(), model_cfg)
    except ValueError as e:
        raise ValueError(f"MindSpeed parallel layout (the parallel-size flags and model.json's "
                         f"pipeline_num_layers): {e}") from None
    if model.bf16_blocks and not bf16:
        ignored_keys.append(f"bf16/params_dtype of {model.bf16_blocks} (precision follows --bf16 for the "
                            f"whole model)")
    cfg = RunConfig(
        model=ModelSection(pretrained=pretrained, dtype="float32", freeze=model.freeze,
                           recompute_vision=model.recompute_vision, recompute_text=model.recompute_text),
        data=_data_section(data, seq_length),
        training=TrainingSection(max_steps=train_iters, grad_accum=_grad_accum(ns, parallel),
                                 seq_length=seq_length, seed=_get(ns, "seed", 1234), bf16=bf16,
                                 device="cuda" if torch.cuda.is_available() else "cpu"),
        optimizer=_optimizer(ns, train_iters),
        # Megatron never deletes checkpoints, hence keep_last 0 (keep all)
        checkpoint=CheckpointSection(save_dir=save, save_interval=_get(ns, "save_interval", 0), keep_last=0,
                                     save_optimizer=not _get(ns, "no_save_optim"),
                                     save_rng=not _get(ns, "no_save_rng"), resume=resume,
                                     load_optimizer=not _get(ns, "no_load_optim"),
                                     load_rng=not _get(ns, "no_load_rng")),
        logging=LoggingSection(log_interval=_get(ns, "log_interval", 100)),
        parallel=parallel,
    )
    ignored_flags = list(getattr(ns, IGNORED_DEST, None) or [])
    algo = _get(ns, "context_parallel_algo")
    if algo is not None and algo not in CP_ALGOS:      # with cp > 1 _reject_unsupported has raised
        ignored_flags.append(f"--context-parallel-algo {algo} (no effect with --context-parallel-size 1)")
    if ignored_flags:
        log(f"MindSpeed flags ignored (no effect on results in mmfuse): {', '.join(dict.fromkeys(ignored_flags))}")
    if ignored_keys:
        log(f"model.json/data.json keys ignored: {'; '.join(ignored_keys)}")
    cfg.validate()
    return cfg


def _get(ns: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(ns, name, None)
    return default if value is None else value


def _required(ns: argparse.Namespace, name: str, flag: str, what: str) -> Any:
    value = _get(ns, name)
    if value is None:
        raise ValueError(f"{flag}: required ({what})")
    return value


def _read_json(path: str | os.PathLike, flag: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: file not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{flag} {p}: expected a JSON object at the top level")
    return raw


def _reject_unsupported(ns: argparse.Namespace) -> None:
    problems = [f"{f}: {UNSUPPORTED[f][1]}" for f in dict.fromkeys(getattr(ns, UNSUPPORTED_DEST, None) or [])]
    for name, flag in PARALLEL_FLAGS.items():
        size = _get(ns, name, 1)
        if size < 1:
            problems.append(f"{flag} {size}: must be >= 1")
    algo = _get(ns, "context_parallel_algo")
    if algo is not None and algo not in CP_ALGOS and _get(ns, "context_parallel_size", 1) > 1:
        problems.append(f"--context-parallel-algo {algo}: mmfuse has "
                        f"{', '.join(f'{a} ({k})' for a, k in CP_ALGOS.items())}; choose one of them")
    mbs = _get(ns, "micro_batch_size", 1)
    if mbs != 1:
        problems.append(f"--micro-batch-size {mbs}: must be 1; mmfuse packs each micro-batch with whole samples "
                        f"up to --seq-length tokens, so raise --seq-length to put more samples in one")
    if _get(ns, "lr_warmup_fraction") is not None and _get(ns, "lr_warmup_iters") is not None:
        problems.append("--lr-warmup-fraction and --lr-warmup-iters: give only one (as Megatron requires)")
    decay_iters = _get(ns, "lr_decay_iters")
    if decay_iters is not None and decay_iters != _get(ns, "train_iters"):
        problems.append(f"--lr-decay-iters {decay_iters}: the decay always ends at --train-iters here; drop the "
                        f"flag or make it equal")
    if problems:
        raise ValueError("MindSpeed flags not supported:\n  " + "\n  ".join(problems))


def _pretrained(load: str | None, model_name_or_path: str | None, save: str,
                log: Callable[[str], None]) -> tuple[str, bool]:
    """(model.pretrained, checkpoint.resume) from --load, else data.json's model_name_or_path."""
    if load is None:
        if not model_name_or_path:
            raise ValueError("--load: not given and data.json has no preprocess_parameters.model_name_or_path; "
                             "pass --load with the Hugging Face Qwen2.5-VL directory")
        load = model_name_or_path
    path = Path(load).expanduser().resolve()
    if weights_dir(str(path)) is not None:          # an HF directory or an mmfuse step-N/ folder
        return str(path), False
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:                          # an mmfuse run folder
        if str(path) == save:
            return str(latest), True                # Megatron's resume: --load and --save the same folder
        log(f"--load {path}: starting from the weights of {latest} (steps restart at 0; to resume a run, "
            f"give the same folder to --load and --save)")
        return str(latest), False
    raise ValueError(
        f"--load {load}: no config.json there. MindSpeed-MM's --load is the checkpoint mm-convert writes from "
        f"the Hugging Face weights; mmfuse reads the Hugging Face weights directly and needs no conversion. "
        f"Point --load at the Hugging Face Qwen2.5-VL directory (the one data.json's model_name_or_path "
        f"names), or leave it out to use model_name_or_path")


def _parallel(ns: argparse.Namespace, model: ModelJson, ignored_keys: list[str]) -> ParallelLayout:
    """The layout of the parallel flags and model.json's pipeline_num_layers. Switches are off without
    the flag, as in Megatron; without --context-parallel-algo CP is ring (MindSpeed's default differs
    between its versions). Notes on model.json keys without effect go to `ignored_keys`."""
    pp = _get(ns, "pipeline_model_parallel_size", 1)
    vit, llm = model.vit_pp_layers, model.llm_pp_layers
    if pp == 1:
        # MindSpeed-MM reads pipeline_num_layers only with pipeline parallelism
        ignored_keys += [f"{name}.pipeline_num_layers (read only with pipeline parallelism)"
                         for name, v in (("image_encoder.vision_encoder", vit), ("text_decoder", llm))
                         if v is not None]
        vit = llm = None
    minutes = _get(ns, "distributed_timeout_minutes", 10)   # Megatron's default
    return ParallelLayout(
        tp=_get(ns, "tensor_model_parallel_size", 1), pp=pp, vpp=_vpp(ns, vit, llm),
        cp=_get(ns, "context_parallel_size", 1),
        cp_kind=CP_ALGOS.get(_get(ns, "context_parallel_algo"), "ring"),
        sequence_parallel=bool(_get(ns, "sequence_parallel")),
        vit_pp_layers=_flat(vit), llm_pp_layers=_flat(llm), zero1=bool(_get(ns, "use_distributed_optimizer")),
        overlap_grad_reduce=bool(_get(ns, "overlap_grad_reduce")),
        overlap_p2p_comm=bool(_get(ns, "overlap_p2p_communication")), timeout_s=60.0 * minutes)


def _vpp(ns: argparse.Namespace, *lists: list | None) -> int:
    """--virtual-pipeline-model-parallel-size, else the chunk count of nested pipeline_num_layers."""
    chunks = {len(v) for v in lists if v and isinstance(v[0], list)}
    flag = _get(ns, "virtual_pipeline_model_parallel_size")
    if len(chunks) > 1 or (flag is not None and chunks and chunks != {flag}):
        raise ValueError(f"model.json pipeline_num_layers: nested lists of {sorted(chunks)} chunks, but "
                         f"--virtual-pipeline-model-parallel-size is {flag if flag is not None else 'not given'}; "
                         f"give one list per chunk in both vision_encoder and text_decoder, as many as the flag")
    return flag if flag is not None else (chunks.pop() if chunks else 1)


def _flat(layers: list | None) -> list[int]:
    """Nested [chunk][stage] counts in virtual-stage order (chunk·pp + stage), the run config's form."""
    return [n for x in layers or [] for n in (x if isinstance(x, list) else [x])]


def _grad_accum(ns: argparse.Namespace, layout: ParallelLayout) -> int:
    """Micro-batches per step on each data-parallel rank: GBS / (MBS · DP), Megatron's rule."""
    mbs = _get(ns, "micro_batch_size", 1)
    world = world_size()
    dp = layout.dp(world)
    gbs = _get(ns, "global_batch_size", mbs * dp)    # Megatron's default: one micro-batch per data-parallel rank
    if gbs < 1 or gbs % (mbs * dp):
        raise ValueError(f"--global-batch-size {gbs}: must be a positive multiple of --micro-batch-size {mbs} x "
                         f"data-parallel size {dp} = {mbs * dp} (DP = WORLD_SIZE {world} / (TP {layout.tp} x "
                         f"PP {layout.pp} x CP {layout.cp})); choose a multiple of {mbs * dp} or change the layout")
    return gbs // (mbs * dp)


def _optimizer(ns: argparse.Namespace, train_iters: int) -> OptimizerConfig:
    style = _get(ns, "lr_decay_style", "linear")
    if style not in ("cosine", "linear", "constant"):
        raise ValueError(f"--lr-decay-style {style}: mmfuse has cosine, linear and constant")
    fraction, iters = _get(ns, "lr_warmup_fraction"), _get(ns, "lr_warmup_iters", 0)
    # Megatron warms up while step <= fraction * decay steps, i.e. int(fraction * train_iters) steps
    warmup = int(fraction * train_iters) if fraction is not None else iters
    return OptimizerConfig(
        lr=_required(ns, "lr", "--lr", "the peak learning rate"), min_lr=_get(ns, "min_lr", 0.0),
        lr_schedule=style, warmup_steps=warmup,
        weight_decay=_get(ns, "weight_decay", 0.01), adam_beta1=_get(ns, "adam_beta1", 0.9),
        adam_beta2=_get(ns, "adam_beta2", 0.999), adam_eps=_get(ns, "adam_eps", 1e-8),
        grad_clip=_get(ns, "clip_grad", 1.0))   # --clip-grad 0.0 is "no clipping" in both


def _data_section(data: DataConfig, seq_length: int) -> dict[str, Any]:
    """DataConfig fields as a dict with absolute paths; --seq-length is the per-sample cutoff, as in
    MindSpeed-MM, unless data.json sets cutoff_len."""
    d = to_dict(data)
    d.pop("ignored")
    if d["cutoff_len"] is None:
        d["cutoff_len"] = seq_length
    for key in ("dataset_dir", "model_name_or_path", "tokenizer_dir", "cache_dir"):
        if d.get(key):
            d[key] = str(Path(d[key]).expanduser().resolve())
    # a relative dataset file is read as written, else inside dataset_dir (DataConfig.dataset_files)
    d["dataset"] = [str(f.expanduser().resolve()) for f in data.dataset_files()]
    return d
