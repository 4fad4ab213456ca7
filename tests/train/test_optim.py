"""Schedules hit their end points; parameter groups follow the decay and multiplier rules."""

import math

import pytest
import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.freeze import freeze
from mmfuse.train.optim import OptimizerConfig, build_optimizer, lr_at
from tests.models.qwen_fixtures import tiny_config


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_linearly_then_decays_to_min_lr(schedule):
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-5, lr_schedule=schedule, warmup_steps=4)
    lrs = [lr_at(s, cfg, total_steps=20) for s in range(21)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[20] == pytest.approx(1e-3 if schedule == "constant" else 1e-5)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    if schedule == "cosine":
        assert lrs[12] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_norms_and_biases_do_not_decay_and_multipliers_scale_groups():
    model = Qwen2_5_VL(tiny_config())
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, lr_multipliers={"vision_encoder": 0.1}))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
        vision = name.startswith(("visual.patch_embed", "visual.blocks"))
        assert g["lr_multiplier"] == (0.1 if vision else 1.0), name


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    model = Qwen2_5_VL(tiny_config())
    freeze(model, ["vision_encoder"])
    opt = build_optimizer(model, OptimizerConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all((id(p) in ids) == p.requires_grad for p in model.parameters())
    freeze(model, ["projector", "text_decoder"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimizerConfig())


def test_bad_optimizer_settings_are_rejected():
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimizerConfig(lr_schedule="step").validate()
    with pytest.raises(ValueError, match="unknown groups"):
        OptimizerConfig(lr_multipliers={"vit": 1.0}).validate()
