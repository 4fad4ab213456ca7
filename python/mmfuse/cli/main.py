"""The `mmfuse` command line: one entry point, one sub-command per task."""

from __future__ import annotations

import argparse
import sys

from mmfuse.cli import data, demo, eval as eval_cli, infer, info, merge_lora, plan, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfuse",
        description="mmfuse: fused operators and training for multimodal large models (Qwen2.5-VL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info.add_parser(sub)
    demo.add_parser(sub)
    train.add_parser(sub)
    infer.add_parser(sub)
    eval_cli.add_parser(sub)
    data.add_parser(sub)
    plan.add_parser(sub)
    merge_lora.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown = unknown   # `mmfuse train` reports MindSpeed-style flags it does not know by name
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if argv is None and len(sys.argv) <= 1 else 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
