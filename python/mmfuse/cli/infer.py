"""`mmfuse infer MODEL_DIR`: answer questions about images and videos with a Qwen2.5-VL checkpoint
(a Hugging Face directory with tokenizer.json, such as a run's final/ folder).

  mmfuse infer runs/demo/run/final --question "What colour is the shape?" --image shape.png
  mmfuse infer runs/demo/run/final --data runs/demo/data/eval.jsonl --output answers.jsonl
  mmfuse infer base-7b --adapters runs/lora/final/adapters --question "Describe the image." --image x.jpg

With --data, every conversation of the MLLM file (JSON or JSONL) is answered: one that ends with an
assistant turn is asked for that turn again, and the given answer is kept as the reference (the
summary reports exact matches); one that ends with a user turn is asked for the next answer. Samples
that cannot be used (missing files, bad roles) are counted and listed, never dropped silently. Greedy
decoding unless --temperature > 0; prompts go through the same image processor and chat template as
training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="answer questions about images/videos with a Qwen2.5-VL checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face Qwen2.5-VL directory with tokenizer.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question; <image>/<video> tags mark where the files go "
                                        "(without tags they go first)")
    src.add_argument("--data", metavar="FILE", help="MLLM .json/.jsonl file of conversations to answer")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image for --question (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video for --question: a file (needs PyAV) or a folder of frames (repeatable)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--dataset-dir", metavar="DIR", help="folder --data's media paths are relative to")
    p.add_argument("--max-samples", type=int, metavar="N", help="answer only the first N conversations of --data")
    p.add_argument("--output", metavar="FILE", help="with --data: write one JSON object per answer here (JSONL)")
    p.add_argument("--adapters", metavar="DIR", help="LoRA adapters (a run's final/adapters) folded into MODEL_DIR")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    p.add_argument("--image-max-pixels", type=int, help="scale larger images down to this many pixels first "
                                                        "(default: the training default, 262144)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-stream", action="store_true",
                   help="with --question: print the answer when it is complete, not as it is generated")
    p.set_defaults(run=run)


def _fail(msg: str) -> int:
    print(f"mmfuse infer: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from mmfuse.data.config import DataConfig
    from mmfuse.data.mllm import load_samples
    from mmfuse.data.report import SampleError, SkipReport
    from mmfuse.infer.answerer import Answerer
    from mmfuse.infer.generate import GenerationConfig
    from mmfuse.infer.prompts import question_sample

    if args.data is None and args.output:
        return _fail("--output goes with --data (a --question's answer is printed)")
    if args.data is not None and (args.image or args.video):
        return _fail("--image/--video go with --question; --data files list their own media")
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    data = DataConfig()
    if args.image_max_pixels is not None:
        data.image_max_pixels = args.image_max_pixels
    try:
        gen.validate()
        answerer = Answerer(args.model_dir, adapters=args.adapters, dtype=getattr(torch, args.dtype),
                            device=args.device, data=data)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return _fail(str(exc))

    if args.question is not None:
        try:
            prompt = answerer.prompt(question_sample(args.question, args.image, args.video, args.system))
        except (SampleError, ValueError) as exc:
            return _fail(str(exc))
        if args.no_stream:
            print(answerer.answer([prompt], gen)[0])
        else:   # the answer as it is generated
            answerer.stream(prompt, gen, lambda piece: print(piece, end="", flush=True))
            print()
        return 0

    report = SkipReport()
    if not Path(args.data).is_file():
        return _fail(f"--data {args.data}: no such file")
    samples = load_samples(args.data, dataset_dir=args.dataset_dir, max_samples=args.max_samples, report=report,
                           need_answer=False)
    prompts = []
    for s in samples:
        if args.system is not None:
            s.system = args.system
        try:
            prompts.append(answerer.prompt(s))
        except SampleError as exc:
            report.add_error(exc)
    bar = None
    if not args.no_progress and prompts:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), unit="prompt", dynamic_ncols=True, file=sys.stderr)
    try:
        answers = answerer.answer(prompts, gen, batch_size=args.batch_size, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    rows = [{"where": p.sample.where, "answer": a, "reference": p.reference,
             "exact_match": None if p.reference is None else a == p.reference.strip()}
            for p, a in zip(prompts, answers)]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    scored = [r for r in rows if r["exact_match"] is not None]
    summary = f"answered {len(rows)} prompts"
    if scored:
        hits = sum(r["exact_match"] for r in scored)
        summary += f"; exact match with the reference answer: {hits}/{len(scored)} ({100 * hits / len(scored):.1f}%)"
    if args.output:
        summary += f"; answers in {args.output}"
    print(summary, file=sys.stderr)
    if report.total:
        print(report.format(), file=sys.stderr)
    return 0 if rows or not report.total else 1
