"""Benchmark records become the questions lmms-eval asks, with images in marker order, and the
scores of known answers come out as the metrics define; broken records are named errors."""

import json

import pytest
import torch

from mmfuse.data.packing import ProcessedSample
from mmfuse.data.report import SampleError
from mmfuse.eval.run import evaluate
from mmfuse.eval.tasks import LETTER_SUFFIX, WORD_SUFFIX, get_task
from mmfuse.infer.prompts import Prompt


def test_ai2d_question_lists_lettered_options_and_takes_index_or_letter_answers():
    task = get_task("ai2d")
    item = task.build({"question": "What eats grass?", "options": ["fox", "cow", "owl"], "answer": "1",
                       "image": "q1.png"})
    assert item.question == f"<image>What eats grass?\nA. fox\nB. cow\nC. owl\n{LETTER_SUFFIX}"
    assert item.images == ["q1.png"] and item.reference == "B"
    assert task.score("B", item) == 1.0 and task.score("(C)", item) == 0.0 and task.score("a cow", item) == 1.0
    assert task.build({"question": "q", "options": ["x", "y"], "answer": "b", "image": "i"}).reference == "B"
    with pytest.raises(SampleError, match="neither an option index below 2 nor a letter A..B"):
        task.build({"question": "q", "options": ["x", "y"], "answer": "5", "image": "i"})


def test_mmmu_places_each_image_at_its_first_marker():
    task = get_task("mmmu")
    record = {"question": "Compare <image 2> with <image 1>. Is <image 2> larger?",
              "options": "['yes', 'no']", "answer": "A", "question_type": "multiple-choice",
              "image_1": "one.png", "image_2": "two.png"}
    item = task.build(record)
    assert item.question == f"Compare <image> with <image>. Is [image 2] larger?\nA. yes\nB. no\n{LETTER_SUFFIX}"
    assert item.images == ["two.png", "one.png"]
    assert task.score("A", item) == 1.0
    open_item = task.build({"question": "How many legs? <image 1>", "answer": ["4", "four"],
                            "question_type": "open", "image_1": "a.png"})
    assert open_item.question == f"How many legs? <image>\n{WORD_SUFFIX}"
    assert task.score("It has 4 legs", open_item) == 1.0 and task.score("three", open_item) == 0.0
    with pytest.raises(SampleError, match="refers to <image 3> but the record has no image_3"):
        task.build({**record, "question": "See <image 3>"})
    with pytest.raises(SampleError, match="'options' is neither a list nor a list's repr"):
        task.build({**record, "options": "[unclosed"})


def test_chartqa_and_docvqa_questions_and_scores():
    chart = get_task("chartqa").build({"question": "Peak value?", "answer": "120", "image": "c.png"})
    assert chart.question.startswith("<image>Peak value?\n")
    assert get_task("chartqa").score("118", chart) == 1.0 and get_task("chartqa").score("100", chart) == 0.0
    doc = get_task("docvqa").build({"question": "Who signed?", "answers": ["J. Smith", "John Smith"],
                                    "image": "d.png"})
    assert get_task("docvqa").score("john smith", doc) == 1.0
    with pytest.raises(SampleError, match="no 'answers' field"):
        get_task("docvqa").build({"question": "q", "image": "d.png"})


class FixedAnswers:
    """Stands in for an Answerer: prompts are placeholders, answers come from a table."""

    def __init__(self, answers):
        self.answers = answers

    def prompt(self, sample):
        ids = torch.zeros(1, dtype=torch.int64)
        return Prompt(ProcessedSample(input_ids=ids, labels=ids, where=sample.where))

    def answer(self, prompts, gen, batch_size=8, progress=None):
        return [self.answers[p.sample.where] for p in prompts]


def test_evaluate_scores_answered_questions_and_counts_the_rest(tmp_path):
    (tmp_path / "d.png").write_bytes(b"")     # existence is what the run checks before the processor
    records = [{"question": "Who?", "answers": ["Ann"], "image": "d.png"},
               {"question": "Where?", "answers": ["Rome", "Roma"], "image": "d.png"},
               {"question": "When?", "answers": ["1990"], "image": "gone.png"},
               {"question": "What?", "image": "d.png"}]
    data = tmp_path / "docvqa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    answers = {f"{data}[0]": "ann", f"{data}[1]": "Romq"}
    result = evaluate(FixedAnswers(answers), get_task("docvqa"), data, dataset_dir=tmp_path)
    assert [r["score"] for r in result.rows] == [1.0, pytest.approx(0.75)]
    assert result.score == pytest.approx(0.875)
    assert dict(result.report.counts) == {"missing_file": 1, "bad_record": 2}
    summary = result.summary()
    assert summary["answered"] == 2 and summary["skipped"] == 3 and summary["metric"] == "ANLS"
