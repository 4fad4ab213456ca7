"""Benchmark tasks: how a record of each public set becomes a question with images, and how its
answer is scored. Records are JSON objects with the columns of the sets as lmms-lab publishes them on
the Hugging Face hub, with images as file paths (see docs/inference.md for a 6-line export):

  ai2d     question, options [str], answer (option index "0".. or letter), image
  chartqa  question, answer, image
  docvqa   question, answers [str], image
  mmmu     question (with <image i> markers), options (list, or its Python repr), answer (letter or text),
           question_type ("multiple-choice" | "open"), image_1 .. image_7 (or images [str])

Prompts follow lmms-eval's defaults for Qwen2-VL (the suffix that asks for the answer format).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmfuse.data.report import SampleError
from mmfuse.eval import metrics
from mmfuse.eval.metrics import LETTERS

LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
WORD_SUFFIX = "Answer the question using a single word or phrase."
CHART_SUFFIX = "Answer the question with a single word."


@dataclass
class EvalItem:
    """One question of a benchmark, ready for the chat template."""
    question: str                                      # text with <image> tags where the images go
    images: list[str] = field(default_factory=list)    # paths as the record gives them, in tag order
    reference: str = ""                                # what the summary shows as the expected answer
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str                                        # what the score means, for the summary
    build: Callable[[dict], EvalItem]
    score: Callable[[str, EvalItem], float]            # 0..1 for one answer


def _field(record: dict, name: str, kind: type | tuple[type, ...] = str):
    if name not in record:
        raise SampleError("bad_record", f"no '{name}' field (columns: {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind):
        raise SampleError("bad_record", f"'{name}' must be {getattr(kind, '__name__', kind)}, got "
                                        f"{type(value).__name__}")
    return value


def _image_of(record: dict) -> list[str]:
    if isinstance(record.get("images"), list):
        return [str(p) for p in record["images"]]
    return [_field(record, "image")]


def _options(record: dict) -> list[str]:
    raw = _field(record, "options", (list, str))
    if isinstance(raw, str):   # MMMU stores the list's Python repr
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise SampleError("bad_record", f"'options' is neither a list nor a list's repr: {exc}") from exc
    if not isinstance(raw, list) or not raw or len(raw) > len(LETTERS):
        raise SampleError("bad_record", f"'options' must be a list of 1..{len(LETTERS)} choices")
    return [str(o) for o in raw]


def _letter(answer: Any, n_options: int) -> str:
    text = str(answer).strip()
    if text.isdigit() and int(text) < n_options:
        return LETTERS[int(text)]
    if len(text) == 1 and text.upper() in LETTERS[:n_options]:
        return text.upper()
    raise SampleError("bad_record", f"answer {answer!r} is neither an option index below {n_options} nor a letter "
                                    f"A..{LETTERS[n_options - 1]}")


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _choice_score(answer: str, item: EvalItem) -> float:
    return float(metrics.option_letter(answer, item.record["_options"]) == item.reference)


# ---- the sets ---------------------------------------------------------------------------------------

def _build_ai2d(record: dict) -> EvalItem:
    options = _options(record)
    question = f"<image>{_field(record, 'question')}\n{_lettered(options)}\n{LETTER_SUFFIX}"
    return EvalItem(question, _image_of(record), _letter(_field(record, "answer", (str, int)), len(options)),
                    {**record, "_options": options})


def _build_chartqa(record: dict) -> EvalItem:
    question = f"<image>{_field(record, 'question')}\n{CHART_SUFFIX}"
    return EvalItem(question, _image_of(record), str(_field(record, "answer", (str, int, float))), record)


def _build_docvqa(record: dict) -> EvalItem:
    answers = _field(record, "answers", list)
    if not answers:
        raise SampleError("bad_record", "'answers' is empty")
    question = f"<image>{_field(record, 'question')}\n{WORD_SUFFIX}"
    return EvalItem(question, _image_of(record), str(answers[0]), record)


_MMMU_MARKER = re.compile(r"<image (\d+)>")


def _build_mmmu(record: dict) -> EvalItem:
    kind = record.get("question_type", "multiple-choice")
    if kind not in ("multiple-choice", "open"):
        raise SampleError("bad_record", f"question_type {kind!r} is not 'multiple-choice' or 'open'")
    text = _field(record, "question")
    options = _options(record) if kind == "multiple-choice" else []
    if options:
        text += "\n" + _lettered(options)
    # Each image goes where its marker first appears (as lmms-eval places them); later mentions stay text.
    order: list[int] = []
    for m in _MMMU_MARKER.finditer(text):
        if int(m.group(1)) not in order:
            order.append(int(m.group(1)))
    listed = record.get("images")
    images = []
    for i in order:
        path = listed[i - 1] if isinstance(listed, list) and 0 < i <= len(listed) else record.get(f"image_{i}")
        if not isinstance(path, str) or not path:
            raise SampleError("bad_record", f"the question refers to <image {i}> but the record has no image_{i}")
        images.append(path)
    seen: set[int] = set()

    def tag(m: re.Match) -> str:
        i = int(m.group(1))
        if i in seen:
            return f"[image {i}]"
        seen.add(i)
        return "<image>"

    text = _MMMU_MARKER.sub(tag, text)
    answer = _field(record, "answer", (str, int, list))
    if kind == "multiple-choice":
        return EvalItem(f"{text}\n{LETTER_SUFFIX}", images, _letter(answer, len(options)),
                        {**record, "_options": options})
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return EvalItem(f"{text}\n{WORD_SUFFIX}", images, answers[0], {**record, "_answers": answers})


def _score_mmmu(answer: str, item: EvalItem) -> float:
    if "_options" in item.record:
        return _choice_score(answer, item)
    return float(metrics.open_answer_match(answer, item.record["_answers"]))


TASKS = {
    "ai2d": Task("ai2d", "option-letter accuracy", _build_ai2d, _choice_score),
    "chartqa": Task("chartqa", "relaxed accuracy (5% on numbers)", _build_chartqa,
                    lambda a, item: float(metrics.relaxed_accuracy(a, item.reference))),
    "docvqa": Task("docvqa", "ANLS", _build_docvqa, lambda a, item: metrics.anls(a, item.record["answers"])),
    "mmmu": Task("mmmu", "accuracy (option letter; open answers matched)", _build_mmmu, _score_mmmu),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
