"""Tensor and sequence parallelism (parallel/tensor_parallel.py, vocab_parallel_loss.py,
sequence_parallel.py, models/qwen2_5_vl/parallelize.py) on two gloo CPU ranks: every split computes
what the unsplit model computes, losses and (gathered) gradients alike."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmfuse import ops
from mmfuse.models.qwen2_5_vl.parallelize import apply_tensor_parallel, check_divisible
from mmfuse.models.qwen2_5_vl.pipeline import _Absent, keep_only, stage_forward, stage_specs
from mmfuse.parallel import ParallelLayout
from mmfuse.parallel.collectives import gather_sequence
from mmfuse.parallel.sequence_parallel import SequenceParallelTransforms, pad_with_sample, padded_length
from mmfuse.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             full_grads, full_state_dict, load_full_state_dict,
                                             sync_sequence_parallel_grads)
from mmfuse.parallel.vision_padding import vision_padding
from mmfuse.parallel.vocab_parallel_loss import VocabParallelLinearCrossEntropy
from tests.parallel.batches import micro_batches, tiny_model
from tests.parallel.spawn import run_ranks


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to b's scale (so one tolerance fits every tensor)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3)) if a.numel() else 0.0


# ---- layers ------------------------------------------------------------------------------------------


def _layers_rank(rank, world, sp, overlap):
    group = dist.new_group(list(range(world)))
    torch.manual_seed(1)
    lin1, lin2, emb = nn.Linear(8, 12), nn.Linear(12, 8), nn.Embedding(16, 8)
    x, w_out, ids = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 16, (10,))
    w_emb = torch.randn(10, 8)

    x_ref = x.clone().requires_grad_()
    y_ref = lin2(lin1(x_ref))
    ((y_ref * w_out).sum() + (emb(ids) * w_emb).sum()).backward()

    col = ColumnParallelLinear.from_linear(lin1, group, sp, overlap_chunks=overlap)
    row = RowParallelLinear.from_linear(lin2, group, sp, overlap_chunks=overlap)
    vemb = VocabParallelEmbedding.from_embedding(emb, group)
    tp_model = nn.ModuleDict(dict(col=col, row=row, emb=vemb))
    mine = slice(rank * 3, rank * 3 + 3) if sp else slice(None)   # SP: this rank's tokens
    x_tp = x[mine].clone().requires_grad_()
    y = row(col(x_tp))
    e = vemb(ids)
    ((y * w_out[mine]).sum() + (e * w_emb).sum()).backward()
    sync_sequence_parallel_grads(tp_model, group)
    grads = full_grads(tp_model, group)
    ref = {"col.weight": lin1.weight.grad, "col.bias": lin1.bias.grad, "row.weight": lin2.weight.grad,
           "row.bias": lin2.bias.grad, "emb.weight": emb.weight.grad}
    errs = {n: _max_err(grads[n], ref[n]) for n in ref}
    errs["output"] = _max_err(y, y_ref[mine])
    errs["embedding"] = _max_err(e, emb(ids))
    errs["input grad"] = _max_err(x_tp.grad, x_ref.grad[mine])
    return errs


@pytest.mark.parametrize("sp,overlap", [(False, 0), (True, 0), (True, 2)], ids=["tp", "tp+sp", "tp+sp+overlap"])
def test_parallel_layers_equal_linear_and_embedding(sp, overlap):
    for errs in run_ranks(2, _layers_rank, sp, overlap):
        assert all(e < 1e-5 for e in errs.values()), errs


# ---- vocab-parallel loss -----------------------------------------------------------------------------


def _lce_rank(rank, world):
    group = dist.new_group(list(range(world)))
    torch.manual_seed(2)
    n, d, v = 36, 16, 24
    hidden, weight = torch.randn(n, d), torch.randn(v, d) * 2.0
    mixed = torch.randint(0, v, (n,))
    mixed[3:17] = -100                       # more ignored rows in a row than one chunk holds
    cases = {"mixed": mixed, "all ignored": torch.full((n,), -100), "none ignored": torch.randint(0, v, (n,))}
    errs = {}
    for case, target in cases.items():
        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_ref = ops.linear_cross_entropy(h_ref, w_ref, target, ignore_index=-100, reduction="sum")
        loss_ref.backward()
        for sp in (False, True):
            mine = slice(rank * n // 2, (rank + 1) * n // 2) if sp else slice(None)
            h = hidden[mine].clone().requires_grad_()
            w = weight.chunk(world)[rank].clone().requires_grad_()
            loss = VocabParallelLinearCrossEntropy(group, sp, chunk_rows=8)(
                gather_sequence(h, group) if sp else h, w, target)
            loss.backward()
            tag = f"{case}, sp={sp}"
            errs[f"loss {tag}"] = float((loss - loss_ref).abs())
            errs[f"dhidden {tag}"] = _max_err(h.grad, h_ref.grad[mine])
            errs[f"dweight {tag}"] = _max_err(w.grad, w_ref.grad.chunk(world)[rank])
    return errs


def test_vocab_parallel_loss_equals_fused_linear_cross_entropy():
    for errs in run_ranks(2, _lce_rank):
        assert all(e < 1e-5 for e in errs.values()), errs


# ---- the model -------------------------------------------------------------------------------------


def _randomize_biases_and_norms(model):
    """The model initialises biases to 0 and norms to 1; random values make their gradients count."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


VARIANTS = {"tp2": (False, 0), "tp2+sp": (True, 0), "tp2+sp+overlap": (True, 3)}   # (sequence parallel, chunks)


def _model_rank(rank, world):
    group = dist.new_group(list(range(world)))
    model = tiny_model()
    _randomize_biases_and_norms(model)
    spec = stage_specs([2], [2])[0]
    batches = micro_batches(model.cfg, 3)
    ref_losses = []
    for b in batches:
        out_ref = stage_forward(model, spec, b, None)
        out_ref.loss_sum.backward()
        ref_losses.append(float(out_ref.loss_sum.detach()))
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    results = {}
    for variant, (sp, overlap) in VARIANTS.items():
        tp_model = copy.deepcopy(model)
        tp_model.zero_grad(set_to_none=True)
        tp_model = apply_tensor_parallel(keep_only(tp_model, [spec]), group, sp, overlap_chunks=overlap)
        transforms = SequenceParallelTransforms(group) if sp else None
        losses, vit_rows = [], []
        hook = tp_model.visual.blocks[0].norm1.register_forward_hook(lambda m, i, o: vit_rows.append(i[0].shape[0]))
        for b in batches:
            out = stage_forward(tp_model, spec, b, None, transforms)
            out.loss_sum.backward()
            losses.append(float(out.loss_sum.detach()))
        hook.remove()
        sync_sequence_parallel_grads(tp_model, group)
        grads = full_grads(tp_model, group)
        assert set(grads) == set(want), set(grads) ^ set(want)
        all_rows = [sum(b[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if b.get(k) is not None)
                    for b in batches]
        all_rows = [n for n in all_rows if n]
        results[variant] = {"losses": losses, "ref_losses": ref_losses, "vit_rows": vit_rows, "all_rows": all_rows,
                            "grad errors": {n: _max_err(grads[n], want[n]) for n in want}}
    return results


@pytest.fixture(scope="module")
def model_runs():
    """Every variant on the same two ranks (one spawn; the single-process reference computed once)."""
    return run_ranks(2, _model_rank, timeout_s=120.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_model_loss_and_grads_equal_single_process(model_runs, variant):
    for per_rank in model_runs:
        res = per_rank[variant]
        assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-5, abs=1e-5)
        bad = {n: e for n, e in res["grad errors"].items() if e > 1e-4}
        assert not bad, bad
        # the vision blocks' norms see every patch without SP, this rank's half with it
        share = 2 if VARIANTS[variant][0] else 1
        assert res["all_rows"] and res["vit_rows"] == [n // share for n in res["all_rows"]]


class _PadAsIfTP8(SequenceParallelTransforms):
    """Sequence parallel's padding for tp = 8 in one process (shards and gathers are the identity)."""
    tp = 8


def test_vision_padding_image_changes_no_loss_or_gradient():
    model = tiny_model()
    _randomize_biases_and_norms(model)
    spec = stage_specs([2], [2])[0]
    padded = copy.deepcopy(model)
    batches = micro_batches(model.cfg, 3)
    rows = [b["pixel_values"].shape[0] for b in batches if b.get("pixel_values") is not None]
    assert any(vision_padding(n, 8, 2) for n in rows), rows     # the padding image is really added
    for b in batches:
        want = stage_forward(model, spec, b, None)
        got = stage_forward(padded, spec, b, None, _PadAsIfTP8(None))
        want.loss_sum.backward()
        got.loss_sum.backward()
        assert float(got.loss_sum.detach()) == pytest.approx(float(want.loss_sum.detach()), rel=1e-6)
    for (n, p), q in zip(model.named_parameters(), padded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_vision_padding_is_whole_merge_groups_up_to_a_multiple_of_tp():
    assert [vision_padding(n, 2, 2) for n in (4, 8, 12)] == [0, 0, 0]
    assert [vision_padding(n, 8, 2) for n in (4, 8, 12, 16)] == [4, 0, 4, 0]
    assert vision_padding(36, 3, 3) == 0 and vision_padding(9, 2, 3) == 9    # 9 rows -> 18
    stream, grid = torch.randn(12, 5), torch.tensor([[1, 2, 6]])
    pixels, grid = _PadAsIfTP8(None).pad_vision(stream, grid, 2)
    assert pixels.shape == (16, 5) and grid.tolist() == [[1, 2, 6], [1, 2, 2]]
    assert torch.equal(pixels[:12], stream) and not pixels[12:].any()


def _state_dict_rank(rank, world):
    group = dist.new_group(list(range(world)))
    model = tiny_model()
    _randomize_biases_and_norms(model)
    want = {n: t.clone() for n, t in model.state_dict().items()}
    tp_model = apply_tensor_parallel(model, group, sequence_parallel=True)
    full = full_state_dict(tp_model, group)
    fresh = apply_tensor_parallel(tiny_model(seed=7), group, sequence_parallel=True)
    load_full_state_dict(fresh, full, group)
    shards_equal = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tp_model.state_dict().values()))
    return {"names": sorted(full) == sorted(want), "values": all(torch.equal(full[n], want[n]) for n in want),
            "reloaded shards": shards_equal,
            "sharded": tp_model.model.layers[0].mlp.up_proj.weight.shape[0] == model.cfg.text.intermediate_size // 2}


def test_full_state_dict_equals_unsharded_and_reloads():
    for res in run_ranks(2, _state_dict_rank):
        assert all(res.values()), res


def test_plan_applies_to_pipeline_cut_stages_and_keeps_their_results():
    # One process (group None: tp = 1): the plan skips the layers keep_only removed, and the chained
    # parallelised stages still compute the whole model's loss.
    model = tiny_model()
    specs = stage_specs([2, 0], [1, 1])
    stages = [apply_tensor_parallel(keep_only(copy.deepcopy(model), [s]), None, True) for s in specs]
    assert isinstance(stages[1].model.layers[1].mlp.up_proj, ColumnParallelLinear)
    assert isinstance(stages[0].model.layers[1], _Absent)
    for b in micro_batches(model.cfg, 2):
        x = None
        for m, s in zip(stages, specs):
            x = stage_forward(m, s, b, x, SequenceParallelTransforms(None))
        assert torch.allclose(x.loss_sum, model(**b).loss_sum, rtol=1e-6, atol=1e-6)


# ---- checks and padding ----------------------------------------------------------------------------


def test_tp_not_dividing_heads_fails_with_the_width_named():
    model = tiny_model()   # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_divisible(model, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_divisible(model, 4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ParallelLayout(tp=4).validate(4, model.cfg)


@pytest.mark.parametrize("t,tp,cp,want", [(10, 2, 1, 10), (11, 2, 1, 12), (13, 4, 1, 16),
                                          (12, 2, 2, 12), (12, 4, 2, 16), (16, 3, 2, 24)])
def test_sequence_parallel_padding_splits_evenly_over_cp_then_tp(t, tp, cp, want):
    n = padded_length(t, tp, cp)
    assert n == want and (n // cp) % tp == 0 and (n - t) % (2 * cp if cp > 1 else 1) == 0


def test_padding_sample_carries_no_labels_and_changes_no_loss():
    model = tiny_model()
    batch = micro_batches(model.cfg, 1)[0]
    t = batch["input_ids"].shape[0]
    padded = pad_with_sample(batch, t + 3)
    assert padded["cu_seqlens"].tolist() == batch["cu_seqlens"].tolist() + [t + 3]
    assert (padded["labels"][t:] == -100).all() and (padded["input_ids"][t:] == 0).all()
    assert torch.allclose(model(**padded).loss_sum, model(**batch).loss_sum, rtol=1e-6, atol=1e-6)
