"""`mmfuse eval`: a benchmark file scored end to end with a real checkpoint (the demo's tiny model):
answers, per-question scores that are the metric of those answers, skipped records counted, and
clear failures for bad arguments."""

from __future__ import annotations

import json

import pytest

from mmfuse.cli.main import main
from mmfuse.data.mllm import load_samples
from mmfuse.eval.tasks import get_task
from mmfuse.train.demo import make_demo_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("demo"), n_train=8, n_eval=4, steps=1)


def test_ai2d_file_is_answered_and_scored(demo, tmp_path, capsys):
    images = [s.images[0] for s in load_samples(f"{demo.eval_dir}/mllm_data.json", dataset_dir=demo.eval_dir)]
    records = [{"question": "Which shape is shown?", "options": ["circle", "square", "triangle"], "answer": str(i % 3),
                "image": path} for i, path in enumerate(images)]
    records.append({"question": "Which?", "options": ["x", "y"], "answer": "0", "image": "missing.png"})
    data = tmp_path / "ai2d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out, summary = tmp_path / "preds.jsonl", tmp_path / "summary.json"
    rc = main(["eval", "ai2d", demo.model_dir, "--data", str(data), "--output", str(out), "--summary", str(summary),
               "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(images)
    task = get_task("ai2d")
    for row, record in zip(rows, records):
        assert row["reference"] == "ABC"[int(record["answer"])]
        assert row["score"] == task.score(row["answer"], task.build(record))
    s = json.loads(summary.read_text())
    assert s["answered"] == len(images) and s["skipped"] == 1 and s["skipped_by_reason"] == {"missing_file": 1}
    captured = capsys.readouterr()
    assert f"ai2d: option-letter accuracy {100 * s['score']:.2f} over {len(images)} questions; 1 record skipped" \
        in captured.out
    assert "missing.png" in captured.err


def test_bad_arguments_fail_with_a_message(demo, tmp_path, capsys):
    assert main(["eval", "docvqa", demo.model_dir, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text("{}")
    assert main(["eval", "docvqa", str(tmp_path / "nomodel"), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "vqav2", demo.model_dir, "--data", str(tmp_path / "x.jsonl")])
