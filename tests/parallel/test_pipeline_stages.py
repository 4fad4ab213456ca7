"""The stage split of Qwen2.5-VL (models/qwen2_5_vl/pipeline.py), chained in one process: any split
computes what the whole model computes, losses and gradients alike."""

import copy

import pytest
import torch

from mmfuse.models.qwen2_5_vl.pipeline import keep_only, stage_forward, stage_specs
from mmfuse.parallel import ParallelLayout
from tests.parallel.batches import micro_batches, tiny_model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("vit,llm", [
    ([2], [2]),                      # one stage
    ([2, 0], [1, 1]),                # ViT on the first stage (the recipes' default)
    ([1, 1, 0], [0, 1, 1]),          # ViT split, vision-only first stage
    ([2, 0, 0], [0, 0, 2]),          # merged vision features pass through a stage with no layers
    ([1, 1, 0, 0], [0, 0, 1, 1]),
])
def test_chained_stages_equal_the_whole_model(vit, llm):
    model = tiny_model()
    batches = micro_batches(model.cfg, 3)
    specs = stage_specs(vit, llm)
    staged = [keep_only(copy.deepcopy(model), [s]) for s in specs]
    for b in batches:
        ref = model(**b)
        (ref.loss_sum * 0.5).backward()
        x = None
        for m, s in zip(staged, specs):
            x = stage_forward(m, s, b, x)
        assert torch.allclose(x.loss_sum, ref.loss_sum, rtol=1e-6, atol=1e-6)
        assert x.num_label_tokens == ref.num_label_tokens
        (x.loss_sum * 0.5).backward()
    want = _grads(model)
    got = {}
    for m in staged:
        for n, g in _grads(m).items():
            got[n] = got[n] + g if n in got else g   # tied embedding: first and last stage both hold it
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n


def test_each_stage_keeps_only_its_parameters():
    model = tiny_model()
    specs = stage_specs([2, 0], [1, 1])
    first = {n for n, _ in keep_only(copy.deepcopy(model), [specs[0]]).named_parameters()}
    last = {n for n, _ in keep_only(copy.deepcopy(model), [specs[1]]).named_parameters()}
    assert any(n.startswith("visual.") for n in first) and not any(n.startswith("visual.") for n in last)
    assert "model.layers.0.mlp.up_proj.weight" in first and "model.layers.1.mlp.up_proj.weight" in last
    assert "model.layers.1.mlp.up_proj.weight" not in first and "model.norm.weight" in last
    assert "model.embed_tokens.weight" in first and "model.embed_tokens.weight" in last   # tied head
    assert first | last == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kw,match", [
    (dict(pp=2, vit_pp_layers=[0, 2], llm_pp_layers=[2, 0]), "ViT layers after decoder"),
    (dict(pp=2, llm_pp_layers=[1, 2]), "sums to 3"),
    (dict(pp=2, llm_pp_layers=[2]), "1 entries but pp·vpp = 2"),
    (dict(pp=2, vit_pp_layers=[2, 0], llm_pp_layers=[2, 0]), "last pipeline stage must hold decoder"),
    (dict(pp=3), "cannot give every one of 3"),
])
def test_bad_pipeline_splits_are_rejected_with_the_reason(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kw).validate(kw["pp"], tiny_model().cfg)
