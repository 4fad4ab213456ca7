"""One benchmark over a checkpoint: records -> questions (task prompts, training chat template and
image processor) -> greedy answers -> per-question scores and the task's mean. Records that cannot be
used are counted by reason and listed, and the mean is over the questions answered: the summary says
both counts, so a partial run is never read as a whole one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mmfuse.data.mllm import read_records, resolve_media
from mmfuse.data.report import SampleError, SkipReport
from mmfuse.eval.tasks import EvalItem, Task
from mmfuse.infer.answerer import Answerer
from mmfuse.infer.generate import GenerationConfig
from mmfuse.infer.prompts import Prompt, question_sample


@dataclass
class EvalResult:
    task: str
    metric: str
    rows: list[dict] = field(default_factory=list)     # where, question, answer, reference, score
    report: SkipReport = field(default_factory=SkipReport)

    @property
    def score(self) -> float:
        return sum(r["score"] for r in self.rows) / len(self.rows) if self.rows else 0.0

    def summary(self) -> dict:
        return {"task": self.task, "metric": self.metric, "score": self.score, "answered": len(self.rows),
                "skipped": self.report.total, "skipped_by_reason": dict(self.report.counts)}


def _prompt(answerer: Answerer, task: Task, record, path, index: int, dataset_dir) -> tuple[Prompt, EvalItem]:
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"expected a JSON object, found {type(record).__name__}")
    item = task.build(record)
    images = []
    for image in item.images:
        found = resolve_media(image, dataset_dir)
        if found is None:
            raise SampleError("missing_file", f"{image!r} not found (dataset dir: {dataset_dir})")
        images.append(found)
    return answerer.prompt(question_sample(item.question, images=images, source=str(path), index=index)), item


def evaluate(answerer: Answerer, task: Task, path: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
             max_samples: int | None = None, gen: GenerationConfig | None = None, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Answer and score the records of `path` (.json list or .jsonl) with greedy decoding."""
    gen = gen or GenerationConfig(max_new_tokens=32)
    result = EvalResult(task.name, task.metric)
    records = read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    prepared: list[tuple[str, Prompt, EvalItem]] = []
    for index, record in enumerate(records):
        if record is None:
            continue
        where = f"{path}[{index}]"
        try:
            prompt, item = _prompt(answerer, task, record, path, index, dataset_dir)
        except SampleError as err:
            result.report.add_error(err, where)
            continue
        prepared.append((where, prompt, item))
    answers = answerer.answer([p for _, p, _ in prepared], gen, batch_size=batch_size, progress=progress)
    for (where, prompt, item), answer in zip(prepared, answers):
        result.rows.append({"where": where, "question": item.question, "answer": answer,
                            "reference": item.reference, "score": task.score(answer, item)})
    return result
