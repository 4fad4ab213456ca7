"""The training loop: an interrupted and resumed run repeats the uninterrupted one bit for bit,
gradient accumulation equals one big batch, LoRA runs export adapters, and the console and
TensorBoard show each step."""

import json
import sys
import types

import pytest
import torch

from mmfuse.models.common.lora import LoRAConfig
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.train.config import CheckpointSection, LoggingSection, ModelSection, RunConfig, TrainingSection
from mmfuse.train.loop import train
from mmfuse.train.optim import OptimizerConfig
from tests.models.qwen_fixtures import pixels_for, sample, tiny_config


class ListBatches:
    """Endless cycle over fixed micro-batches; its state is the position."""

    def __init__(self, batches, crash_after=None):
        self.batches, self.pos, self.crash_after = batches, 0, crash_after

    def __iter__(self):
        while True:
            if self.crash_after is not None and self.pos >= self.crash_after:
                raise KeyboardInterrupt("simulated stop")
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _micro(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    a = sample(cfg, [3, ("image", (1, 4, 4)), 7], gen)
    b = sample(cfg, [9], gen)
    ids = torch.tensor(a + b)
    labels = ids.clone()
    labels[ids == cfg.image_token_id] = -100
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, len(a), len(ids)], dtype=torch.int32),
            "pixel_values": pixels_for(cfg, [(1, 4, 4)], gen), "image_grid_thw": torch.tensor([[1, 4, 4]])}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    Qwen2_5_VL(tiny_config()).save_pretrained(d)
    return d


def _cfg(weights, save_dir, steps, **kw):
    return RunConfig(
        model=ModelSection(pretrained=str(weights), lora=kw.get("lora")),
        training=TrainingSection(max_steps=steps, grad_accum=kw.get("grad_accum", 1), seed=7),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, lr_schedule="cosine", weight_decay=0.01),
        checkpoint=CheckpointSection(save_dir=str(save_dir), save_interval=kw.get("save_interval", 0),
                                     resume=kw.get("resume", False)),
        logging=LoggingSection(progress=False))


def test_resumed_run_repeats_the_uninterrupted_run_bit_for_bit(weights, tmp_path):
    cfg = tiny_config()
    data = [_micro(cfg, s) for s in range(5)]
    straight = train(_cfg(weights, tmp_path / "a", 12), ListBatches(data), log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):      # stopped during step 8, after the step-6 checkpoint
        train(_cfg(weights, tmp_path / "b", 12, save_interval=3), ListBatches(data, crash_after=7),
              log=lambda s: None)
    second = train(_cfg(weights, tmp_path / "b", 12, save_interval=3, resume=True), ListBatches(data),
                   log=lambda s: None)
    assert [m.step for m in second] == list(range(7, 13))
    assert [m.loss for m in second] == [m.loss for m in straight[6:]]
    assert [m.grad_norm for m in second] == [m.grad_norm for m in straight[6:]]
    final_a = Qwen2_5_VL.from_pretrained(tmp_path / "a" / "final").state_dict()
    final_b = Qwen2_5_VL.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert straight[-1].loss < straight[0].loss


def test_gradient_accumulation_equals_one_packed_batch(weights, tmp_path):
    cfg = tiny_config()
    a, b = _micro(cfg, 1), _micro(cfg, 2)
    n_a = len(a["input_ids"])
    both = {"input_ids": torch.cat([a["input_ids"], b["input_ids"]]), "labels": torch.cat([a["labels"], b["labels"]]),
            "cu_seqlens": torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + n_a]),
            "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
            "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]])}
    accum = train(_cfg(weights, tmp_path / "acc", 1, grad_accum=2), ListBatches([a, b]), log=lambda s: None)
    one = train(_cfg(weights, tmp_path / "one", 1), ListBatches([both]), log=lambda s: None)
    assert accum[0].label_tokens == one[0].label_tokens
    assert accum[0].loss == pytest.approx(one[0].loss, rel=1e-6)
    assert accum[0].grad_norm == pytest.approx(one[0].grad_norm, rel=1e-5)


def test_metrics_file_has_one_record_per_step(weights, tmp_path):
    cfg = tiny_config()
    train(_cfg(weights, tmp_path, 3), ListBatches([_micro(cfg, 0)]), log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_peak_bytes", "elapsed_s"):
        assert key in rows[0]
    assert rows[0]["mem_peak_bytes"] > 0 and rows[0]["tokens"] == 25


def test_lora_run_trains_and_exports_adapters_only(weights, tmp_path):
    cfg = tiny_config()
    hist = train(_cfg(weights, tmp_path, 4, lora=LoRAConfig(rank=4, alpha=8)), ListBatches([_micro(cfg, 0)]),
                 log=lambda s: None)
    assert hist[-1].loss < hist[0].loss
    assert (tmp_path / "final" / "adapters" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_bf16_autocast_run_tracks_the_fp32_run(weights, tmp_path):
    cfg = tiny_config()
    data = [_micro(cfg, s) for s in range(3)]
    fp32 = train(_cfg(weights, tmp_path / "fp32", 3), ListBatches(data), log=lambda s: None)
    run = _cfg(weights, tmp_path / "bf16", 3)
    run.training.bf16 = True
    bf16 = train(run, ListBatches(data), log=lambda s: None)
    for a, b in zip(fp32, bf16):
        assert b.loss == pytest.approx(a.loss, rel=2e-2)


class _Writer:
    """Records what the loop hands torch.utils.tensorboard.SummaryWriter."""
    made: list["_Writer"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_steps_scalars_when_installed(weights, tmp_path, monkeypatch):
    # A stand-in module: tensorboard is an optional extra, not a test dependency.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_Writer))
    _Writer.made.clear()
    hist = train(_cfg(weights, tmp_path, 2), ListBatches([_micro(tiny_config(), 0)]), log=lambda s: None)
    (w,) = _Writer.made
    assert w.log_dir == str(tmp_path / "tensorboard") and w.closed
    keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mem_peak_bytes")
    assert [(tag, step) for tag, step, _ in w.scalars] == [(f"train/{k}", s) for s in (1, 2) for k in keys]
    assert [v for tag, _, v in w.scalars if tag == "train/loss"] == [m.loss for m in hist]

    off = _cfg(weights, tmp_path / "off", 1)
    off.logging.tensorboard = False
    train(off, ListBatches([_micro(tiny_config(), 0)]), log=lambda s: None)
    assert len(_Writer.made) == 1


def test_run_without_tensorboard_installed_trains_and_writes_no_event_folder(weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import raises ImportError
    train(_cfg(weights, tmp_path, 1), ListBatches([_micro(tiny_config(), 0)]), log=lambda s: None)
    assert (tmp_path / "final").is_dir() and not (tmp_path / "tensorboard").exists()


def test_progress_bar_on_a_terminal_shows_step_loss_tokens_per_second_and_eta(weights, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cfg = _cfg(weights, tmp_path, 3)
    cfg.logging.progress = True
    hist = train(cfg, ListBatches([_micro(tiny_config(), 0)]), log=lambda s: None)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "3/3" in bar and f"loss {hist[-1].loss:.4f}" in bar and "tok/s" in bar and "<00:00" in bar
