"""`mmfuse demo`: the main job on a CPU. Generates a small dataset of coloured-shape images with
questions, a tokenizer and a random-init tiny Qwen2.5-VL, fine-tunes it for a few hundred steps,
and shows the loss falling and the held-out answer accuracy rising from chance. Writes a checkpoint
and a loss-curve PNG and prints where they are. `mmfuse showcase` is the fused-op showcase."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
    from mmfuse.train.batches import build_batches
    from mmfuse.train.config import load_run_config
    from mmfuse.train.demo import held_out_samples, make_demo_run
    from mmfuse.train.evaluate import answer_accuracy
    from mmfuse.train.loop import train
    from mmfuse.train.plot import plot_metrics

    began = time.perf_counter()
    root = Path(args.dir)
    if (root / "run").exists():
        shutil.rmtree(root / "run")             # the demo always starts from step 0
    demo = make_demo_run(root, steps=args.steps, force=True)
    print(f"demo data, tokenizer and a random-init tiny Qwen2.5-VL written under {root}/")
    samples, chance = held_out_samples(demo)
    overrides = {"logging.progress": False} if args.no_progress else {}
    cfg = load_run_config(demo.train_yaml, overrides)
    batches = build_batches(cfg)

    start = Qwen2_5_VL.from_pretrained(cfg.model.pretrained)
    before = answer_accuracy(start, samples)
    print(f"held-out answer accuracy before training: {before.accuracy:.1%} ({before.correct}/{before.total}); "
          f"chance is {chance:.1%}")
    del start

    def evaluate(model, m):
        if m.step % args.eval_interval == 0 and m.step != cfg.training.max_steps:
            acc = answer_accuracy(model, samples)
            return f"  held-out answer accuracy at step {m.step}: {acc.accuracy:.1%}"
        return None

    history = train(cfg, batches, on_step_end=evaluate)
    final = Qwen2_5_VL.from_pretrained(Path(cfg.checkpoint.save_dir) / "final")
    after = answer_accuracy(final, samples)
    png = plot_metrics(Path(cfg.checkpoint.save_dir) / "metrics.jsonl", Path(cfg.checkpoint.save_dir) / "loss.png")
    first, last = history[0], history[-1]
    tail = history[-10:]
    print()
    print(f"loss: {first.loss:.3f} at step 1 -> {sum(m.loss for m in tail) / len(tail):.3f} "
          f"(mean of the last {len(tail)} steps)")
    print(f"held-out answer accuracy: {before.accuracy:.1%} before -> {after.accuracy:.1%} after "
          f"({after.correct}/{after.total}; chance {chance:.1%})")
    show_answers(Path(cfg.checkpoint.save_dir) / "final", demo.eval_dir)
    print(f"checkpoint (Hugging Face format): {Path(cfg.checkpoint.save_dir) / 'final'}")
    print(f"loss curve: {png}")
    print(f"metrics: {Path(cfg.checkpoint.save_dir) / 'metrics.jsonl'}; run config: {demo.train_yaml}")
    print(f"total time {time.perf_counter() - began:.0f} s")
    skipped = batches.report.total
    if skipped:
        print(f"skipped samples: {batches.report.format()}")
    return 0


def show_answers(final: Path, eval_dir: str, n: int = 3) -> None:
    """A few held-out questions answered by generation (what `mmfuse infer` does), and the command to ask more."""
    from mmfuse.data.mllm import IMAGE_TAG, load_samples
    from mmfuse.infer import GenerationConfig
    from mmfuse.infer.answerer import Answerer

    answerer = Answerer(final)
    samples = load_samples(Path(eval_dir) / "mllm_data.json", dataset_dir=eval_dir)[:n]
    prompts = [answerer.prompt(s) for s in samples]
    answers = answerer.answer(prompts, GenerationConfig(max_new_tokens=16))
    print("held-out questions answered by the fine-tuned model (greedy decoding):")
    for sample, prompt, answer in zip(samples, prompts, answers):
        question = sample.messages[0].content.replace(IMAGE_TAG, "")
        print(f"  {Path(sample.images[0]).name}: {question} -> {answer!r} (reference {prompt.reference!r})")
    if samples:
        print(f"ask your own: mmfuse infer {final} --question 'What colour is the shape?' --image {samples[0].images[0]}")


def run_showcase(args: argparse.Namespace) -> int:
    from mmfuse.cli import showcase

    return showcase.run_showcase(quick=args.quick)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune a tiny Qwen2.5-VL on generated images, on the CPU",
                       description=__doc__)
    p.add_argument("--dir", default="runs/demo", help="folder for the demo data, checkpoint and curves "
                                                       "(default runs/demo; regenerated each time)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--eval-interval", type=int, default=200, help="held-out evaluation every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(run=run)

    s = sub.add_parser("showcase", help="op showcase: every fused op vs the float64 reference, timed vs eager",
                       description="Every fused op against the float64 reference and timed against the PyTorch "
                                   "eager code it replaces.")
    s.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    s.set_defaults(run=run_showcase)
