"""`mmfuse demo`: a short showcase of the fused ops (correctness against the float64 reference and
a timing table against PyTorch eager). It becomes the tiny Qwen2.5-VL fine-tune once that lands."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from mmfuse.cli import showcase

    return showcase.run_showcase(quick=args.quick)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="op showcase: correctness vs float64 reference and timings",
                       description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    p.set_defaults(run=run)
