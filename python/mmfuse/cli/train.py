"""`mmfuse train CONFIG`: fine-tune Qwen2.5-VL as a YAML run config says, with the stable flags
for steps, checkpoints, resume and logging; or `mmfuse train --mm-model model.json --mm-data
data.json [Megatron flags]` from a MindSpeed-MM launch. `mmfuse plot LOG.jsonl` draws a run's curves."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from mmfuse.train.config import RunConfig

HELP = """Fine-tune Qwen2.5-VL from a YAML run config (sections model, data, training, optimizer,
checkpoint, logging, parallel; see docs/training.md), or from MindSpeed-MM's model.json and
data.json with the Megatron-style flags of its finetune script (--mm-model M --mm-data D --lr ...
--train-iters ... --save DIR). Every field can be overridden with --set section.field=value; the
resolved config is written to SAVE_DIR/run_config.yaml. Runs on the CPU out of the box; set
training.device for a GPU."""


def add_parser(sub) -> None:
    from mmfuse.train.mindspeed_flags import SHARED_WITH_YAML_MODE, add_megatron_arguments

    # allow_abbrev off: Megatron's --save must not read as a prefix of --save-dir (Megatron does the same)
    p = sub.add_parser("train", help="fine-tune Qwen2.5-VL from a YAML run config or a MindSpeed-MM launch",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("config", nargs="?",
                   help="run config (YAML), e.g. the train.yaml written by `mmfuse data make-demo`; "
                        "or leave out and give --mm-model/--mm-data")
    p.add_argument("--mm-model", metavar="MODEL_JSON", help="MindSpeed-MM model.json (instead of CONFIG)")
    p.add_argument("--mm-data", metavar="DATA_JSON", help="MindSpeed-MM data.json (instead of CONFIG)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run in total (training.max_steps)")
    p.add_argument("--save-dir", help="run folder for checkpoints and metrics (checkpoint.save_dir)")
    p.add_argument("--save-interval", type=int, help="save a checkpoint every N steps (checkpoint.save_interval)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the save dir")
    p.add_argument("--no-load-optimizer", action="store_true", help="on resume, start the optimizer afresh")
    p.add_argument("--no-load-rng", action="store_true", help="on resume, do not restore RNG states")
    p.add_argument("--seed", type=int, help="RNG seed (training.seed)")
    p.add_argument("--log-jsonl", help="write one JSON object per step here (default: SAVE_DIR/metrics.jsonl)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config field, e.g. --set optimizer.lr=2e-4 (repeatable; values are YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    par = p.add_argument_group("parallel layout (launch with torchrun; DP = world size / (tp·pp·cp))")
    par.add_argument("--tp", type=int, help="tensor parallel size (parallel.tp)")
    par.add_argument("--pp", type=int, help="pipeline stages (parallel.pp)")
    par.add_argument("--vpp", type=int, help="model chunks per pipeline rank: interleaved 1F1B (parallel.vpp)")
    par.add_argument("--cp", type=int, help="context parallel size (parallel.cp)")
    par.add_argument("--cp-kind", choices=("ring", "ulysses"), help="context parallel algorithm (parallel.cp_kind)")
    par.add_argument("--zero1", action="store_true", help="shard optimizer state over data-parallel ranks")
    par.add_argument("--no-sequence-parallel", action="store_true",
                     help="with tp > 1, keep whole sequences on every rank (parallel.sequence_parallel: false)")
    par.add_argument("--no-overlap-p2p", action="store_true",
                     help="with pp > 1, wait for each pipeline receive where it is posted "
                          "(parallel.overlap_p2p_comm: false; same results)")
    add_megatron_arguments(p, skip=SHARED_WITH_YAML_MODE)
    # unknown flags reach run() (see mmfuse.cli.main), which names them
    p.set_defaults(run=run, accepts_unknown=True)

    q = sub.add_parser("plot", help="draw loss and throughput curves of a run's metrics JSONL as a PNG")
    q.add_argument("metrics", help="metrics JSONL written by `mmfuse train` (SAVE_DIR/metrics.jsonl)")
    q.add_argument("--out", help="PNG to write (default: next to the metrics file)")
    q.set_defaults(run=run_plot)


def overrides_from(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. optimizer.lr=2e-4")
        out[key.strip()] = yaml.safe_load(value)
    flags = {"training.max_steps": args.max_steps, "checkpoint.save_dir": args.save_dir,
             "checkpoint.save_interval": args.save_interval, "training.seed": args.seed,
             "logging.log_jsonl": args.log_jsonl}
    flags.update({"parallel.tp": args.tp, "parallel.pp": args.pp, "parallel.vpp": args.vpp, "parallel.cp": args.cp,
                  "parallel.cp_kind": args.cp_kind})
    out.update({k: v for k, v in flags.items() if v is not None})
    if args.zero1:
        out["parallel.zero1"] = True
    if args.no_sequence_parallel:
        out["parallel.sequence_parallel"] = False
    if args.no_overlap_p2p:
        out["parallel.overlap_p2p_comm"] = False
    if args.resume:
        out["checkpoint.resume"] = True
    if args.no_load_optimizer:
        out["checkpoint.load_optimizer"] = False
    if args.no_load_rng:
        out["checkpoint.load_rng"] = False
    if args.no_progress:
        out["logging.progress"] = False
    return out


def run_config(args: argparse.Namespace) -> RunConfig:
    """The validated RunConfig from CONFIG or from --mm-model/--mm-data, with the flags and --set on top."""
    from mmfuse.train.config import apply_overrides, load_run_config
    from mmfuse.train.mindspeed import run_config_from_mindspeed
    from mmfuse.train.mindspeed_flags import flags_given, unknown_flags_message

    if getattr(args, "unknown", None):
        raise ValueError(unknown_flags_message(args.unknown))
    mindspeed = args.mm_model is not None or args.mm_data is not None
    if mindspeed and args.config:
        raise ValueError(f"give either a run config ({args.config}) or --mm-model/--mm-data, not both")
    if mindspeed:
        if args.mm_model is None or args.mm_data is None:
            raise ValueError("--mm-model and --mm-data: give both (MindSpeed-MM's model.json and data.json)")
        if args.save is None and args.save_dir is not None:
            args.save = args.save_dir      # the YAML mode's name for Megatron's --save
        cfg = run_config_from_mindspeed(args.mm_model, args.mm_data, args)
        return apply_overrides(cfg, overrides_from(args))
    if not args.config:
        raise ValueError("no run config: give CONFIG (a YAML run config) or MindSpeed-MM's pair "
                         "--mm-model model.json --mm-data data.json")
    given = flags_given(args)
    if given:
        raise ValueError(f"{given}: MindSpeed flags apply only with --mm-model/--mm-data; with a YAML run config "
                         f"set the field instead, e.g. --set optimizer.lr=1e-5 (see docs/training.md)")
    return load_run_config(args.config, overrides_from(args))


def run(args: argparse.Namespace) -> int:
    from mmfuse.models.qwen2_5_vl.hf_adapter import read_config
    from mmfuse.parallel.state import destroy_parallel, init_parallel
    from mmfuse.train.batches import build_batches
    from mmfuse.train.config import weights_dir
    from mmfuse.train.loop import train

    try:
        cfg = run_config(args)
        # The layout is checked against the world size and the model before any rendezvous.
        state = init_parallel(cfg.parallel, cfg.training.device, read_config(weights_dir(cfg.model.pretrained)))
        batches = build_batches(cfg, state.dp_rank, state.dp)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmfuse train: {e}", file=sys.stderr)
        return 2
    try:
        history = train(cfg, batches, state=state)
    except KeyboardInterrupt:
        # Ctrl-C: checkpoints are renamed into place only when complete, so `latest` still names a
        # whole one even if the signal came during a save. Exit status 130, the shell's for SIGINT.
        from mmfuse.train.checkpoint import latest_checkpoint
        if state.rank == 0:
            latest = latest_checkpoint(cfg.checkpoint.save_dir)
            where = f"the latest complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
            print(f"mmfuse train: interrupted; {where}; continue with --resume", file=sys.stderr)
        return 130
    finally:
        destroy_parallel()
    if history and state.rank == 0:
        first, last = history[0], history[-1]
        tps = sum(m.tokens_per_s * m.step_s for m in history) / max(sum(m.step_s for m in history), 1e-9)
        per = "/device" if state.world_size > 1 else ""
        print(f"done: steps {first.step}-{last.step}, loss {first.loss:.4f} -> {last.loss:.4f}, "
              f"{tps:,.0f} tokens/s{per}, peak memory {last.mem_peak_bytes / 2**30:.2f} GiB; "
              f"run folder {cfg.checkpoint.save_dir}")
    stats = getattr(getattr(batches, "dataset", None), "cache_stats", None)
    if stats:
        print(f"preprocessing cache (rank {state.rank}): " + ", ".join(f"{n} {k}" for k, n in sorted(stats.items())))
    skipped = batches.report.total if hasattr(batches, "report") else 0
    if skipped:
        print(f"skipped samples (rank {state.rank}): {batches.report.format()}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from mmfuse.train.plot import plot_metrics

    try:
        out = plot_metrics(args.metrics, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmfuse plot: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
