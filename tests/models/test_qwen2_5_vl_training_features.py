"""Recompute policies change memory, never results; frozen groups get no gradients; LoRA starts as
the identity, merges exactly, and its adapters round-trip alone."""

import pytest
import torch

from mmfuse.models.common.lora import LoRAConfig, apply_lora, load_adapters, merge_lora, save_adapters, unmerge_lora
from mmfuse.models.common.recompute import RecomputeConfig
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.freeze import freeze
from tests.models.qwen_fixtures import pixels_for, sample, tiny_config


def _batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = sample(cfg, [3, ("image", (1, 4, 6)), 6], gen)
    b = sample(cfg, [5, ("image", (1, 2, 4)), 4], gen)
    ids = torch.tensor(a + b)
    return dict(input_ids=ids, labels=ids.clone(), cu_seqlens=torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32),
                pixel_values=pixels_for(cfg, [(1, 4, 6), (1, 2, 4)], gen), image_grid_thw=torch.tensor([[1, 4, 6], [1, 2, 4]]))


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


POLICIES = {
    "full_uniform_2": RecomputeConfig("full", "uniform", 2),
    "full_uniform_1": RecomputeConfig("full", "uniform", 1),
    "full_block_1": RecomputeConfig("full", "block", 1),
    "selective": RecomputeConfig("selective"),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_recompute_gives_identical_loss_and_gradients(name):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    batch = _batch(cfg)
    loss0, g0 = _grads(model, batch)
    model.set_recompute(vision=POLICIES[name], text=POLICIES[name])
    loss1, g1 = _grads(model, batch)
    assert loss0 == loss1
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_bad_recompute_policy_is_rejected():
    model = Qwen2_5_VL(tiny_config())
    with pytest.raises(ValueError, match="granularity"):
        model.set_recompute(text=RecomputeConfig("everything"))


@pytest.mark.parametrize("groups", [("vision_encoder",), ("vision_encoder", "projector"), ("text_decoder",)])
def test_frozen_groups_get_no_gradients(groups):
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    freeze(model, groups)
    _, grads = _grads(model, _batch(cfg))
    prefixes = {"vision_encoder": ("visual.patch_embed", "visual.blocks"), "projector": ("visual.merger",),
                "text_decoder": ("model.", "lm_head")}
    frozen = tuple(p for g in groups for p in prefixes[g])
    for name, p in model.named_parameters():
        assert (name in grads) == (not name.startswith(frozen)), name


def test_unknown_freeze_group_is_rejected():
    with pytest.raises(ValueError, match="unknown module groups"):
        freeze(Qwen2_5_VL(tiny_config()), ["vit"])


def test_lora_starts_as_the_identity_and_merge_equals_unmerged_forward():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    batch = _batch(cfg)
    with torch.no_grad():
        base = model(**batch, return_logits=True).logits
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "qkv", "gate_proj"]))
    assert any(n.startswith("visual.") for n in names) and any(n.startswith("model.") for n in names)
    with torch.no_grad():
        assert torch.equal(model(**batch, return_logits=True).logits, base)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        unmerged = model(**batch, return_logits=True).logits
        merge_lora(model)
        merged = model(**batch, return_logits=True).logits
        unmerge_lora(model)
        again = model(**batch, return_logits=True).logits
    assert not torch.allclose(unmerged, base)
    assert float((merged - unmerged).abs().max() / unmerged.abs().max()) < 1e-5
    assert float((again - unmerged).abs().max() / unmerged.abs().max()) < 1e-5


def test_lora_trains_only_adapters_and_keeps_state_dict_names():
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    before = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=2))
    _, grads = _grads(model, _batch(cfg))
    assert grads and all(".lora_" in n for n in grads)
    assert before <= set(model.state_dict())


def test_lora_adapters_save_and_load_alone(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    lcfg = LoRAConfig(rank=3, alpha=6)
    apply_lora(model, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_adapters(model, tmp_path, lcfg)
    fresh = Qwen2_5_VL(cfg)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    load_adapters(fresh, tmp_path)
    batch = _batch(cfg)
    with torch.no_grad():
        assert torch.equal(fresh(**batch, return_logits=True).logits, model(**batch, return_logits=True).logits)


def test_lora_target_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_lora(Qwen2_5_VL(tiny_config()), LoRAConfig(target_modules=["nope"]))
