"""The Megatron-style shell flags of a MindSpeed-MM fine-tune script, as argparse arguments: the
ones that change results (mapped by `mmfuse.train.mindspeed`), the ones that do not (accepted and
reported as ignored) and a few that are recognised but not supported (rejected with the reason).
Flags outside these tables are an error, so a typo never silently changes nothing."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

# Flags that change results here: (flag, type or "switch", help). Defaults are None so that
# `mmfuse.train.mindspeed` can tell "not given" (Megatron's default applies) from a value.
SUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("--lr", float, "peak learning rate (optimizer.lr)"),
    ("--min-lr", float, "final learning rate (optimizer.min_lr; Megatron default 0)"),
    ("--lr-decay-style", str, "cosine | linear | constant (optimizer.lr_schedule; Megatron default linear)"),
    ("--lr-warmup-fraction", float, "warmup as a fraction of --train-iters (optimizer.warmup_steps)"),
    ("--lr-warmup-iters", int, "warmup steps (optimizer.warmup_steps)"),
    ("--lr-decay-iters", int, "accepted only when equal to --train-iters (the decay always ends there)"),
    ("--weight-decay", float, "AdamW weight decay (optimizer.weight_decay; Megatron default 0.01)"),
    ("--clip-grad", float, "max global grad norm, 0 = no clipping (optimizer.grad_clip; Megatron default 1.0)"),
    ("--adam-beta1", float, "AdamW beta1 (optimizer.adam_beta1)"),
    ("--adam-beta2", float, "AdamW beta2 (optimizer.adam_beta2)"),
    ("--adam-eps", float, "AdamW epsilon (optimizer.adam_eps)"),
    ("--train-iters", int, "optimizer steps (training.max_steps)"),
    ("--seed", int, "RNG seed (training.seed; Megatron default 1234)"),
    ("--seq-length", int, "tokens per packed micro-batch and per-sample cutoff (training.seq_length)"),
    ("--micro-batch-size", int, "must be 1: micro-batches are packed by tokens up to --seq-length"),
    ("--global-batch-size", int, "micro-batches per step over all data-parallel ranks (training.grad_accum = "
                                 "GBS / (MBS x DP), DP = WORLD_SIZE / (TP x PP x CP))"),
    ("--save", str, "run folder (checkpoint.save_dir)"),
    ("--save-interval", int, "checkpoint every N steps (checkpoint.save_interval)"),
    ("--load", str, "Hugging Face model directory to start from (model.pretrained), or the --save folder to resume"),
    ("--no-load-optim", "switch", "on resume, start AdamW afresh (checkpoint.load_optimizer: false)"),
    ("--no-load-rng", "switch", "on resume, keep fresh RNG states (checkpoint.load_rng: false)"),
    ("--no-save-optim", "switch", "do not store AdamW state (checkpoint.save_optimizer: false)"),
    ("--no-save-rng", "switch", "do not store RNG states (checkpoint.save_rng: false)"),
    ("--log-interval", int, "print a metrics line every N steps (logging.log_interval; Megatron default 100)"),
    ("--bf16", "switch", "bf16 autocast with float32 parameters (training.bf16)"),
    ("--tensor-model-parallel-size", int, "tensor parallel size (parallel.tp; default 1)"),
    ("--pipeline-model-parallel-size", int, "pipeline stages (parallel.pp; default 1); with > 1 model.json's "
                                            "pipeline_num_layers give the split"),
    ("--virtual-pipeline-model-parallel-size", int, "model chunks per pipeline rank, interleaved 1F1B (parallel.vpp; "
                                                    "default: the outer length of nested pipeline_num_layers, else 1)"),
    ("--context-parallel-size", int, "context parallel size (parallel.cp; default 1)"),
    ("--context-parallel-algo", str, "megatron_cp_algo | ulysses_cp_algo (parallel.cp_kind ring | ulysses; "
                                     "default ring)"),
    ("--sequence-parallel", "switch", "with TP > 1, norms and residuals hold T/TP tokens per rank "
                                      "(parallel.sequence_parallel; off without the flag, as in Megatron)"),
    ("--use-distributed-optimizer", "switch", "shard optimizer state over data-parallel ranks (parallel.zero1)"),
    ("--overlap-grad-reduce", "switch", "reduce gradient buckets during backward (parallel.overlap_grad_reduce; "
                                        "off without the flag, as in Megatron)"),
    ("--overlap-p2p-communication", "switch", "post pipeline receives ahead of their use (parallel.overlap_p2p_comm; "
                                              "off without the flag, as in Megatron; results are the same)"),
    ("--distributed-timeout-minutes", int, "collective timeout (parallel.timeout_s = 60 x M; Megatron default 10)"),
)

# Flags with no effect on results here, grouped by why. Switches take no value, the rest one.
IGNORED_SWITCHES = (
    # fused kernels and attention back-ends: mmfuse always runs its own fused ops
    "--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb",
    "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion",
    "--no-rope-fusion", "--use-mcore-models",
    # model structure: read from model.json (and checked against config.json), as MindSpeed-MM does
    "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--add-qkv-bias",
    "--group-query-attention", "--attention-softmax-in-fp32", "--use-rotary-position-embeddings",
    # packing already handles variable lengths; logging of tokens/s is always on
    "--variable-seq-lengths", "--log-tps", "--log-throughput",
    # speed only (mmfuse gathers ZeRO-1 weights after the step), or initialisation before loading weights
    "--overlap-param-gather", "--use-cpu-initialization", "--init-model-with-meta-device", "--no-initialization",
    # --load is a weights-only Hugging Face directory, so there is no optimizer or step to skip
    "--finetune",
)
IGNORED_WITH_VALUE = (
    "--num-workers", "--ckpt-format", "--distributed-backend", "--mm-tool",
    "--tokenizer-type", "--tokenizer-name-or-path", "--vocab-size", "--make-vocab-size-divisible-by",
    "--normalization", "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--max-position-embeddings", "--position-embedding-type", "--rotary-base",
    "--init-method-std", "--attention-dropout", "--hidden-dropout",
    "--eval-interval", "--eval-iters", "--tensorboard-dir",
)

# Recognised flags that would change results in a way mmfuse cannot follow yet: flag -> (takes a
# value, reason and fix).
UNSUPPORTED = {
    "--fp16": (False, "fp16 needs loss scaling, which mmfuse does not do; use --bf16"),
    "--train-samples": (True, "the run length is counted in steps; use --train-iters"),
    "--lr-warmup-samples": (True, "warmup is counted in steps; use --lr-warmup-iters or --lr-warmup-fraction"),
    "--lr-decay-samples": (True, "the decay always ends at --train-iters; drop the flag"),
    "--num-layers-per-virtual-pipeline-stage": (
        True, "the layers of each virtual stage come from model.json; give --virtual-pipeline-model-parallel-size "
              "and nested pipeline_num_layers (outer = chunk, inner = stage) in image_encoder.vision_encoder and "
              "text_decoder"),
}

# Flags the YAML mode of `mmfuse train` already has under the same name and meaning.
SHARED_WITH_YAML_MODE = frozenset({"--seed", "--save-interval", "--no-load-rng"})

IGNORED_DEST = "megatron_ignored"          # flags given that have no effect here
UNSUPPORTED_DEST = "megatron_unsupported"  # recognised flags that are rejected


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class _Record(argparse.Action):
    """Appends the flag's name to a list in the namespace instead of storing its value."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), option_string])


def add_megatron_arguments(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """Register every flag of the tables on `parser`; `skip` names flags the parser already has."""
    group = parser.add_argument_group(
        "MindSpeed-MM / Megatron flags (with --mm-model/--mm-data; see docs/training.md)")
    for flag, kind, help_text in SUPPORTED:
        if flag in skip:
            continue
        if kind == "switch":
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, "DIR" if flag in ("--save", "--load") else "NAME")
            group.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)
    for flag in IGNORED_SWITCHES:
        parser.add_argument(flag, action=_Record, nargs=0, dest=IGNORED_DEST, help=argparse.SUPPRESS)
    for flag in IGNORED_WITH_VALUE:
        parser.add_argument(flag, action=_Record, dest=IGNORED_DEST, help=argparse.SUPPRESS)
    for flag, (takes_value, _) in UNSUPPORTED.items():
        parser.add_argument(flag, action=_Record, nargs=None if takes_value else 0, dest=UNSUPPORTED_DEST,
                            help=argparse.SUPPRESS)
    parser.set_defaults(**{IGNORED_DEST: None, UNSUPPORTED_DEST: None})


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"MindSpeed flags: {message}")


def parse_megatron_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a MindSpeed-MM script's flags; unknown flags and bad values raise ValueError naming them."""
    parser = _RaisingParser(prog="mindspeed flags", add_help=False, allow_abbrev=False)
    add_megatron_arguments(parser)
    ns, extra = parser.parse_known_args(list(argv))
    if extra:
        raise ValueError(unknown_flags_message(extra))
    return ns


def unknown_flags_message(extra: Sequence[str]) -> str:
    flags = [a for a in extra if a.startswith("-")] or list(extra)
    return (f"unknown flags {flags}: not MindSpeed-MM/Megatron flags that mmfuse knows; remove them, or set the "
            f"run config field they stand for with --set section.field=value (see docs/training.md)")


def flags_given(ns: argparse.Namespace) -> list[str]:
    """The MindSpeed flags present in `ns` (those shared with the YAML mode left out)."""
    given = [f for f, _, _ in SUPPORTED
             if f not in SHARED_WITH_YAML_MODE and getattr(ns, dest(f), None) not in (None, False)]
    return given + list(getattr(ns, IGNORED_DEST, None) or []) + list(getattr(ns, UNSUPPORTED_DEST, None) or [])
