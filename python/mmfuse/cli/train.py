"""`mmfuse train CONFIG`: fine-tune Qwen2.5-VL as a YAML run config says, with the stable flags
for steps, checkpoints, resume and logging; `mmfuse plot LOG.jsonl` draws a run's curves."""

from __future__ import annotations

import argparse
import sys

import yaml

HELP = """Fine-tune Qwen2.5-VL from a YAML run config (sections model, data, training, optimizer,
checkpoint, logging, parallel; see docs/training.md). Every field can be overridden with
--set section.field=value. Runs on the CPU out of the box; set training.device for a GPU."""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune Qwen2.5-VL from a YAML run config", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config (YAML), e.g. the train.yaml written by `mmfuse data make-demo`")
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
    p.set_defaults(run=run)

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
    out.update({k: v for k, v in flags.items() if v is not None})
    if args.resume:
        out["checkpoint.resume"] = True
    if args.no_load_optimizer:
        out["checkpoint.load_optimizer"] = False
    if args.no_load_rng:
        out["checkpoint.load_rng"] = False
    if args.no_progress:
        out["logging.progress"] = False
    return out


def run(args: argparse.Namespace) -> int:
    from mmfuse.train.batches import build_batches
    from mmfuse.train.config import load_run_config
    from mmfuse.train.loop import train

    try:
        cfg = load_run_config(args.config, overrides_from(args))
        batches = build_batches(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmfuse train: {e}", file=sys.stderr)
        return 2
    history = train(cfg, batches)
    if history:
        first, last = history[0], history[-1]
        tps = sum(m.tokens for m in history) / max(sum(m.step_s for m in history), 1e-9)
        print(f"done: steps {first.step}-{last.step}, loss {first.loss:.4f} -> {last.loss:.4f}, "
              f"{tps:,.0f} tokens/s, peak memory {last.mem_peak_bytes / 2**30:.2f} GiB; run folder {cfg.checkpoint.save_dir}")
    skipped = batches.report.total if hasattr(batches, "report") else 0
    if skipped:
        print(f"skipped samples: {batches.report.format()}")
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
