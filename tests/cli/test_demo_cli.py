"""`mmfuse demo`, the README's main job, run whole: the loss falls, held-out answer accuracy rises
from chance to clearly above it, and the checkpoint, loss curve and metrics it names exist. The full
600-step run takes about 25 s on two idle cores; a short run checks the flags and outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mmfuse.cli.main import main


def _report(out: str) -> dict[str, float | str]:
    acc = re.search(r"held-out answer accuracy: ([\d.]+)% before -> ([\d.]+)% after \(\d+/\d+; chance ([\d.]+)%\)", out)
    loss = re.search(r"loss: ([\d.]+) at step 1 -> ([\d.]+) \(mean of the last", out)
    paths = dict(re.findall(r"^(checkpoint \(Hugging Face format\)|loss curve): (\S+)$", out, re.M))
    assert acc and loss and len(paths) == 2, out
    return {"before": float(acc[1]), "after": float(acc[2]), "chance": float(acc[3]),
            "first_loss": float(loss[1]), "last_loss": float(loss[2]),
            "checkpoint": paths["checkpoint (Hugging Face format)"], "png": paths["loss curve"]}


def test_demo_learns_the_task(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    r = _report(out)
    assert r["last_loss"] < 0.5 * r["first_loss"]
    # A model that ignores the image answers at chance (the most frequent answer per question kind);
    # the demo recorded 51% against 23.5% chance.
    assert r["after"] >= r["chance"] + 15.0
    assert r["after"] > r["before"]
    assert (Path(r["checkpoint"]) / "config.json").is_file()
    assert "held-out questions answered by the fine-tuned model (greedy decoding):" in out
    assert out.count("(reference '") == 3
    assert f"ask your own: mmfuse infer {r['checkpoint']} --question" in out
    assert Path(r["png"]).stat().st_size > 1000
    lines = (Path(r["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 600 and json.loads(lines[-1])["step"] == 600


def test_short_demo_run_reports_and_regenerates(tmp_path, capsys):
    args = ["demo", "--dir", str(tmp_path / "demo"), "--steps", "4", "--eval-interval", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    r = _report(out)
    assert "held-out answer accuracy at step 2:" in out
    assert Path(r["checkpoint"]).is_dir() and Path(r["png"]).is_file()
    # A second run starts again from step 0 rather than resuming the first.
    assert main(args) == 0
    lines = (Path(r["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
