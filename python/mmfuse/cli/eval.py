"""`mmfuse eval TASK MODEL_DIR --data FILE`: score a Qwen2.5-VL checkpoint on a public benchmark with
its standard metric, from a local export of the set (JSON or JSONL records, images as files).

  mmfuse eval ai2d runs/x/final --data ai2d_test.jsonl --dataset-dir ai2d_images
  mmfuse eval docvqa Qwen2.5-VL-7B --data docvqa_val.jsonl --dataset-dir docvqa --output preds.jsonl

Tasks and metrics: ai2d (option-letter accuracy), chartqa (relaxed accuracy: 5% on numbers),
docvqa (ANLS), mmmu (option-letter accuracy; open questions matched as MMMU does). The record
columns are those of lmms-lab's copies of the sets (docs/inference.md shows the export). Greedy
decoding; records that cannot be used are counted by reason and listed, and the score is over the
questions answered (the summary gives both counts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from mmfuse.eval.tasks import TASKS

    p = sub.add_parser("eval", help="score a checkpoint on AI2D, ChartQA, DocVQA or MMMU (local exports)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS), help="the benchmark")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face Qwen2.5-VL directory with tokenizer.json")
    p.add_argument("--data", required=True, metavar="FILE", help="the set's records (.json list or .jsonl)")
    p.add_argument("--dataset-dir", metavar="DIR", help="folder the records' image paths are relative to")
    p.add_argument("--max-samples", type=int, metavar="N", help="score only the first N records")
    p.add_argument("--output", metavar="FILE", help="one JSON object per question (answer, reference, score)")
    p.add_argument("--summary", metavar="FILE", help="write the summary as JSON here too")
    p.add_argument("--adapters", metavar="DIR", help="LoRA adapters folded into MODEL_DIR")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from mmfuse.eval.run import evaluate
    from mmfuse.eval.tasks import get_task
    from mmfuse.infer.answerer import Answerer
    from mmfuse.infer.generate import GenerationConfig

    def fail(msg: str) -> int:
        print(f"mmfuse eval: {msg}", file=sys.stderr)
        return 2

    if not Path(args.data).is_file():
        return fail(f"--data {args.data}: no such file")
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    try:
        gen.validate()
        answerer = Answerer(args.model_dir, adapters=args.adapters, dtype=getattr(torch, args.dtype),
                            device=args.device)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return fail(str(exc))
    task = get_task(args.task)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(unit="question", dynamic_ncols=True, file=sys.stderr, desc=task.name)
    try:
        result = evaluate(answerer, task, args.data, args.dataset_dir, args.max_samples, gen, args.batch_size,
                          progress=bar.update if bar else None)
    except ValueError as exc:   # an unreadable .json file
        return fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for row in result.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = result.summary()
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{task.name}: {task.metric} {100 * result.score:.2f} over {len(result.rows)} questions"
          + (f"; {result.report.total} record{'s' if result.report.total != 1 else ''} skipped"
             if result.report.total else ""))
    if result.report.total:
        print(result.report.format(), file=sys.stderr)
    return 0 if result.rows else 1
