"""`mmfuse train`, `mmfuse plot` and the demo pieces from the command line: a short run on the
demo data, resume through the flag, config errors with exit status 2, Ctrl-C, and --help for each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfuse.cli.main import main
from mmfuse.train.demo import make_demo_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("demo"), n_train=24, n_eval=8, steps=4)


def test_train_runs_resumes_and_plots(demo, tmp_path, capsys):
    save = tmp_path / "run"
    args = [demo.train_yaml, "--save-dir", str(save), "--no-progress", "--set", "training.seq_length=160",
            "--set", "checkpoint.save_interval=2"]
    assert main(["train", *args, "--max-steps", "2"]) == 0
    assert main(["train", *args, "--max-steps", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-00000002" in out
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (save / "final" / "model.safetensors").is_file()
    assert main(["plot", str(save / "metrics.jsonl"), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_config_errors_name_the_field_and_exit_2(demo, tmp_path, capsys):
    code = main(["train", demo.train_yaml, "--save-dir", str(tmp_path), "--set", "optimizer.lrr=1"])
    assert code == 2
    assert "optimizer.lrr: unknown field (did you mean 'lr'?)" in capsys.readouterr().err
    code = main(["train", demo.train_yaml, "--save-dir", str(tmp_path), "--set", "model.freeze=[vit]"])
    assert code == 2 and "model.freeze" in capsys.readouterr().err


def _commands(parser=None, prefix=()):
    """Every sub-command path of the CLI, read from the parser itself (so a new one is covered)."""
    import argparse

    from mmfuse.cli.main import build_parser

    parser = parser or build_parser()
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append([*prefix, name])
                out += _commands(sub, (*prefix, name))
    return out


def test_every_command_is_in_the_help_smoke_test():
    assert sorted(map(tuple, _commands())) == sorted([
        ("info",), ("demo",), ("showcase",), ("train",), ("plot",), ("data",), ("data", "llava2mllm"),
        ("data", "check"), ("data", "make-demo"), ("plan",), ("merge-lora",), ("infer",), ("eval",)])


@pytest.mark.parametrize("command", [[]] + _commands(), ids=lambda c: " ".join(c) or "mmfuse")
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage:" in out and len(out) > 200


def test_flags_set_the_metrics_file_and_seed_and_a_checkpoint_starts_a_new_run(demo, tmp_path, capsys):
    common = [demo.train_yaml, "--no-progress", "--set", "training.seq_length=160"]
    log = tmp_path / "elsewhere" / "m.jsonl"
    log.parent.mkdir()
    assert main(["train", *common, "--save-dir", str(tmp_path / "a"), "--max-steps", "2", "--seed", "5",
                 "--log-jsonl", str(log)]) == 0
    assert "done: steps 1-2, loss" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    run_a = (tmp_path / "a" / "run_config.yaml").read_text()
    assert "seed: 5" in run_a and str(log) in run_a

    # model.pretrained may name an mmfuse checkpoint: its model/ folder (like final/) is a complete
    # HF folder with the tokenizer and processor files, so the data section finds them there too.
    # The run equals the one from its model/ folder, not the one from the initial weights.
    step2 = tmp_path / "a" / "step-00000002"
    for folder in (step2 / "model", tmp_path / "a" / "final"):
        assert (folder / "tokenizer.json").is_file() and (folder / "preprocessor_config.json").is_file()
    first_loss = {}
    for name, start in (("ckpt", step2), ("hf", step2 / "model"), ("init", demo.model_dir)):
        assert main(["train", *common, "--save-dir", str(tmp_path / name), "--max-steps", "1", "--seed", "5",
                     "--set", f"model.pretrained={start}"]) == 0
        first_loss[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text())["loss"]
    assert first_loss["ckpt"] == first_loss["hf"] != first_loss["init"]


def test_python_dash_m_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "mmfuse", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: mmfuse train" in out.stdout


def test_command_line_paths_are_relative_to_the_working_directory(demo, tmp_path, monkeypatch):
    from mmfuse.train.config import load_run_config

    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(demo.train_yaml, {"checkpoint.save_dir": "runs/a"})
    assert cfg.checkpoint.save_dir == str(tmp_path / "runs" / "a")
    assert load_run_config(demo.train_yaml).model.pretrained.startswith(str(Path(demo.train_yaml).parent))


def test_run_summary_reports_preprocessing_cache_hits(demo, tmp_path, capsys):
    args = [demo.train_yaml, "--no-progress", "--max-steps", "1", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "training.seq_length=160"]
    assert main(["train", *args, "--save-dir", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert main(["train", *args, "--save-dir", str(tmp_path / "b")]) == 0
    second = capsys.readouterr().out
    assert "preprocessing cache (rank 0):" in first and "miss" in first
    assert "hit" in second.split("preprocessing cache (rank 0):")[1]


def test_ctrl_c_exits_130_and_leaves_a_loadable_latest_checkpoint(demo, tmp_path):
    import mmfuse
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
    from mmfuse.train import checkpoint as ckpt
    from mmfuse.train.optim import OptimizerConfig, build_optimizer

    save = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(mmfuse.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p))
    args = [demo.train_yaml, "--save-dir", str(save), "--no-progress", "--set", "training.seq_length=160"]
    # A checkpoint every step, so the signal may well land inside a save.
    # SIGINT back to its default in the child: a runner started as a background job ignores it, and
    # the child would inherit that (Python installs its Ctrl-C handler only over the default).
    proc = subprocess.Popen([sys.executable, "-m", "mmfuse", "train", *args, "--max-steps", "100000",
                             "--save-interval", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240          # a guard against a broken run, not a speed requirement
        while ckpt.latest_checkpoint(save) is None or ckpt.latest_checkpoint(save).name < ckpt.step_dir_name(2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            # Say how the child handled SIGINT (ignored, caught) before it is killed.
            status = Path(f"/proc/{proc.pid}/status")
            masks = [ln for ln in status.read_text().splitlines() if ln.startswith(("SigIgn", "SigCgt"))] \
                if status.exists() else []
            raise AssertionError(f"the run did not stop within 120 s of SIGINT; {masks}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; the latest complete checkpoint is" in err and "--resume" in err
    assert "Traceback" not in err

    latest = ckpt.latest_checkpoint(save)
    step = int(json.loads((latest / "trainer_state.json").read_text())["step"])
    model = Qwen2_5_VL.from_pretrained(demo.model_dir)
    restored = ckpt.load_checkpoint(latest, model, build_optimizer(model, OptimizerConfig()))
    assert restored.step == step >= 2
    assert main(["train", *args, "--max-steps", str(step + 1), "--resume"]) == 0
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step + 1


def test_layout_switches_set_their_run_config_fields():
    from mmfuse.cli.main import build_parser
    from mmfuse.cli.train import overrides_from

    args = build_parser().parse_args(["train", "run.yaml", "--pp", "2", "--no-overlap-p2p", "--no-sequence-parallel"])
    out = overrides_from(args)
    assert out["parallel.pp"] == 2
    assert out["parallel.overlap_p2p_comm"] is False and out["parallel.sequence_parallel"] is False
    assert "parallel.overlap_p2p_comm" not in overrides_from(build_parser().parse_args(["train", "run.yaml"]))
