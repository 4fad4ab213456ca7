"""Checkpoints restore model, optimizer and RNG exactly, and an interrupted save never damages the
last good one."""

import pytest
import torch

import mmfuse.train.checkpoint as ckpt
from mmfuse.models.common.lora import LoRAConfig, apply_lora
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.train.optim import OptimizerConfig, build_optimizer
from tests.models.qwen_fixtures import tiny_config


def _trained(steps=2, lora=None):
    torch.manual_seed(0)
    model = Qwen2_5_VL(tiny_config())
    if lora:
        apply_lora(model, lora)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
    ids = torch.randint(0, 400, (1, 12))
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model, opt, ids


def _step(model, opt, ids):
    opt.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=2)])
def test_resume_continues_exactly(tmp_path, lora):
    model, opt, ids = _trained(lora=lora)
    ckpt.save_checkpoint(tmp_path, 2, model, opt, {"tokens": 24}, lora=lora)
    torch.manual_seed(123)
    expected = [_step(model, opt, ids) for _ in range(2)]

    torch.manual_seed(0)
    fresh = Qwen2_5_VL(tiny_config())
    if lora:
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
        apply_lora(fresh, lora)
    fresh_opt = build_optimizer(fresh, OptimizerConfig(lr=1e-2))
    torch.manual_seed(123)
    restored = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert restored.step == 2 and restored.state["tokens"] == 24
    got = [_step(fresh, fresh_opt, ids) for _ in range(2)]
    assert got == expected
    # the RNG comes back to the save point, whatever ran since
    ckpt.load_checkpoint(tmp_path / "step-00000002", fresh, None)
    first = torch.rand(3)
    ckpt.load_checkpoint(tmp_path / "step-00000002", fresh, None)
    assert torch.equal(torch.rand(3), first)


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = _trained()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {})
    good = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "_torch_rng", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {})
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()
    fresh = Qwen2_5_VL(tiny_config())
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh, None)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path, 3, model, opt, {})        # the next save clears the stale temporary folder
    assert not list(tmp_path.glob(".step-*"))


def test_keep_last_removes_older_checkpoints(tmp_path):
    model, opt, _ = _trained(steps=1)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"


def test_optimizer_state_for_untrained_parameters_is_a_clear_error(tmp_path):
    model, opt, _ = _trained(steps=1)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {})
    fresh = Qwen2_5_VL(tiny_config())
    for p in fresh.model.layers[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="does not train"):
        ckpt.load_checkpoint(tmp_path / "step-00000001", fresh, build_optimizer(fresh, OptimizerConfig()))


def test_optimizer_state_reads_the_same_from_one_file_and_from_indexed_shards(tmp_path):
    import json

    from safetensors.torch import save_file

    model, opt, _ = _trained(steps=1)
    tensors = ckpt.optimizer_tensors(model, opt)
    save_file(tensors, str(tmp_path / ckpt.OPTIMIZER_FILE))
    keys = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"optimizer-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / ckpt.OPTIMIZER_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    one, two = ckpt.read_optimizer_state(tmp_path), ckpt.read_optimizer_state(sharded)
    assert one.keys() == two.keys() == {k.rpartition("::")[0] for k in keys}
    assert all(torch.equal(one[n][k], two[n][k]) for n in one for k in one[n])
    wanted = {"model.norm.weight"}
    assert set(ckpt.read_optimizer_state(sharded, wanted)) == wanted
    (sharded / "optimizer-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer-00002-of-00002"):
        ckpt.read_optimizer_state(sharded)
    with pytest.raises(FileNotFoundError, match="--no-load-optimizer"):
        ckpt.read_optimizer_state(tmp_path / "nowhere")
