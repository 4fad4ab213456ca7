"""`torchrun … -m mmfuse train` end to end on the demo data: a run saved under one layout resumes
under another and reproduces the one-process loss curve; bad layouts stop before any rendezvous."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmfuse

from mmfuse.cli.main import main
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.train.demo import make_demo_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("demo"), n_train=24, n_eval=8, steps=4)


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The ranks import the mmfuse this test imported (the source tree in development, the installed
    # package in CI, whose source tree has no compiled core).
    python_dir = str(Path(mmfuse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "mmfuse", "train",
           *args, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _losses(save: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_tp2_run_resumed_at_pp2_repeats_the_one_process_curve(demo, tmp_path):
    common = [demo.train_yaml, "--set", "training.seq_length=160", "--set", "checkpoint.save_interval=2"]
    one, par = tmp_path / "one", tmp_path / "par"
    assert main(["train", *common, "--save-dir", str(one), "--max-steps", "4", "--no-progress"]) == 0
    first = _torchrun(2, *common, "--save-dir", str(par), "--max-steps", "2", "--tp", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tp 2 · pp 1" in first.stdout
    second = _torchrun(2, *common, "--save-dir", str(par), "--max-steps", "4", "--pp", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step-00000002" in second.stdout
    got, want = _losses(par), _losses(one)
    assert len(got) == len(want) == 4
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)
    # final/ is written in shards by the ranks (docs/parallel.md), a folder transformers and mmfuse load
    assert (par / "final" / "model.safetensors.index.json").is_file()
    assert Qwen2_5_VL.from_pretrained(par / "final").cfg.text.num_hidden_layers > 0


def test_layout_that_needs_more_processes_fails_before_any_rendezvous(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", demo.train_yaml, "--save-dir", str(tmp_path), "--tp", "2"])
    assert code == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
