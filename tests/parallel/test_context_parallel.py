"""Context parallelism (parallel/cp_sharding.py, ring_attention.py, ulysses.py, context_parallel.py) on
spawned gloo ranks: ring and Ulysses attention equal attention over the whole stream, and the tiny
Qwen2.5-VL under CP (decoder tokens and vision patch rows split) gives the single-process loss and
gradients."""

import pytest
import torch
import torch.distributed as dist

from mmfuse import ops
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from mmfuse.models.qwen2_5_vl.pipeline import stage_forward, stage_specs
from mmfuse.parallel import ParallelLayout
from mmfuse.parallel.context_parallel import (ContextParallelTransforms, RingAttention, UlyssesAttention,
                                              apply_context_parallel)
from mmfuse.parallel.cp_sharding import local_cu_seqlens, max_len, zigzag_index
from mmfuse.parallel.cp_vision import check_vision_heads, local_rows
from mmfuse.parallel.sequence_parallel import SequenceParallelTransforms
from mmfuse.parallel.transforms import ChainTransforms
from tests.parallel.batches import micro_batches, tiny_model
from tests.parallel.spawn import run_ranks

H, HK, D = 4, 2, 8
ODD_LENGTHS = [5, 9, 3, 12]


def _padded_cu(cp: int) -> torch.Tensor:
    unit = 2 * cp
    padded = [-(-n // unit) * unit for n in ODD_LENGTHS]
    return torch.tensor([0] + padded).cumsum(0).to(torch.int32)


def _stream(cp: int):
    gen = torch.Generator().manual_seed(1)
    cu = _padded_cu(cp)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, D, generator=gen) for h in (H, HK, HK))
    w = torch.randn(t, H, D, generator=gen)          # loss = sum(out · w): a dense upstream gradient
    return cu, q, k, v, w


def _attention_rank(rank, world, kinds):
    cu, q, k, v, w = _stream(world)
    group = dist.group.WORLD
    idx = zigzag_index(cu, world, rank)
    cu_local = local_cu_seqlens(cu, world)
    result = {"idx": idx}
    for kind in kinds:
        causal = kind != "ring_noncausal"
        core = (UlyssesAttention if kind == "ulysses" else RingAttention)(group, causal=causal)
        ql, kl, vl = (x.index_select(0, idx).clone().requires_grad_() for x in (q, k, v))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = core(ql, kl, vl, cu_local, max_len(cu_local))
        (out * w.index_select(0, idx)).sum().backward()
        result[kind] = [out.detach(), ql.grad, kl.grad, vl.grad]
        result[kind + "_saved"] = sum(saved)
    return result


def _gather_natural(results, key, i, like):
    full = torch.zeros_like(like)
    for r in results:
        full[r["idx"]] = r[key][i]
    return full


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_and_ulysses_attention_equal_full_attention_with_gradients(cp):
    kinds = ["ring", "ulysses", "ring_noncausal"]   # Ulysses at cp4 (2 kv heads): kv heads repeated
    results = run_ranks(cp, _attention_rank, kinds)
    for kind in kinds:
        cu, q, k, v, w = _stream(cp)
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        ref = ops.attention(q, k, v, cu, cu, max_len(cu), max_len(cu), causal=kind != "ring_noncausal")
        (ref * w).sum().backward()
        want = [ref.detach(), q.grad, k.grad, v.grad]
        for i, name in enumerate(["out", "dq", "dk", "dv"]):
            got = _gather_natural(results, kind, i, want[i])
            assert torch.allclose(got, want[i], rtol=1e-5, atol=1e-5), f"{kind} cp{cp} {name}"


def test_ring_attention_keeps_only_local_tensors_for_backward():
    """Autograd holds q, k, v, out, lse and cu_seqlens of T/cp tokens: no per-step K/V blocks."""
    cp = 2
    cu = _padded_cu(cp)
    n_local = int(cu[-1]) // cp
    local = n_local * D * (2 * H + 2 * HK) + H * n_local + cu.numel()
    for r in run_ranks(cp, _attention_rank, ["ring"]):
        assert r["ring_saved"] == local


def test_zigzag_shards_partition_each_sample_evenly():
    cu = _padded_cu(3)
    shards = [zigzag_index(cu, 3, r) for r in range(3)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(int(cu[-1])))
    local = local_cu_seqlens(cu, 3)
    for s in shards:
        assert s.numel() == int(local[-1])
        for b in range(len(ODD_LENGTHS)):           # each local sample holds only its own sample's tokens
            part = s[int(local[b]):int(local[b + 1])]
            assert bool(((part >= cu[b]) & (part < cu[b + 1])).all())


def test_pad_batch_pads_each_sample_to_twice_cp_with_ignored_labels():
    batch = {"input_ids": torch.arange(1, 18), "labels": torch.arange(1, 18),
             "cu_seqlens": torch.tensor([0, 5, 17], dtype=torch.int32)}
    out = ContextParallelTransforms(None, "ring").pad_batch(batch)      # no group: cp = 1, units of 2
    assert out["cu_seqlens"].tolist() == [0, 6, 18]
    assert out["input_ids"][5] == 0 and out["labels"][5] == -100
    assert torch.equal(out["input_ids"][6:], batch["input_ids"][5:])


def test_pad_batch_continues_given_positions_and_packs_a_batch_of_rows():
    tf = ContextParallelTransforms(None, "ulysses")
    pos = torch.arange(3).repeat(3, 1)
    out = tf.pad_batch({"input_ids": torch.tensor([7, 8, 9]), "position_ids": pos})
    assert out["position_ids"].tolist() == [[0, 1, 2, 3]] * 3 and out["cu_seqlens"].tolist() == [0, 4]
    rows = tf.pad_batch({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert rows["input_ids"].tolist() == [1, 1, 1, 0, 1, 1, 1, 0] and rows["cu_seqlens"].tolist() == [0, 4, 8]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model_rank(rank, world, kind, n_batches, vit=(2,), llm=(2,)):
    """Stages (vit, llm layers per stage) run one after the other on each rank, as a pipeline would."""
    group = dist.group.WORLD
    model = apply_context_parallel(tiny_model(), group, kind)
    tf = ContextParallelTransforms(group, kind)
    specs = stage_specs(list(vit), list(llm))
    losses, counts, vit_rows = [], [], []
    hook = model.visual.blocks[0].norm1.register_forward_hook(lambda m, i, o: vit_rows.append(i[0].shape[0]))
    for b in micro_batches(model.cfg, n_batches):
        out = None
        for spec in specs:
            out = stage_forward(model, spec, b, out, tf)
        (out.loss_sum * 0.5).backward()
        losses.append(out.loss_sum.detach())
        counts.append(out.num_label_tokens)
    hook.remove()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)                  # what the dp·cp gradient reduction does
    return {"losses": losses, "counts": counts, "grads": grads, "vit_rows": vit_rows}


@pytest.fixture(scope="module", params=["ring", "ulysses", "ring, ViT over two stages"])
def cp2_runs(request):
    """Both cp kinds on two ranks, three micro-batches with images and a video; and the ViT blocks
    split over two pipeline stages, so this rank's rows pass from one stage to the next."""
    kind = request.param.split(",")[0]
    split = ((1, 1), (0, 2)) if "stages" in request.param else ((2,), (2,))
    return kind, run_ranks(2, _model_rank, kind, 3, *split)


def test_cp2_qwen2_5_vl_loss_and_gradients_equal_one_process(cp2_runs):
    """Every parameter's gradient, the vision tower's included (its rows are split over cp too)."""
    kind, results = cp2_runs
    model = tiny_model()
    batches = micro_batches(model.cfg, 3)
    want_losses, want_counts = [], []
    for b in batches:
        out = model(**b)
        (out.loss_sum * 0.5).backward()
        want_losses.append(out.loss_sum.detach())
        want_counts.append(out.num_label_tokens)
    want = _grads(model)
    for i in range(3):
        got = sum(r["losses"][i] for r in results)
        assert torch.allclose(got, want_losses[i], rtol=1e-5, atol=1e-5), i
        assert sum(r["counts"][i] for r in results) == want_counts[i]
    got = results[0]["grads"]
    assert set(got) == set(want)
    assert any(n.startswith("visual.blocks.") for n in want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), (kind, n)


def test_cp2_vision_blocks_see_half_the_patch_rows(cp2_runs):
    _, results = cp2_runs
    all_rows = [sum(b[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if b.get(k) is not None)
                for b in micro_batches(tiny_model().cfg, 3)]
    for r in results:
        assert r["vit_rows"] == [n // 2 for n in all_rows if n]



def _cp2_tp2_rank(rank, world):
    """cp 2 · tp 2 with sequence parallel, chained as the training engine chains them; a vision tower of
    4 heads so each of the 4 ranks' vision attention gets one."""
    import copy

    from mmfuse.models.qwen2_5_vl.parallelize import apply_tensor_parallel
    from mmfuse.parallel.state import build_state
    from mmfuse.parallel.tensor_parallel import full_grads, sync_sequence_parallel_grads

    layout = ParallelLayout(tp=2, cp=2)
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.vision.num_heads = 4
    layout.validate(world, cfg)
    state = build_state(layout, rank, world)
    torch.manual_seed(0)
    model = Qwen2_5_VL(cfg)
    spec = stage_specs([2], [2])[0]
    batches = micro_batches(cfg, 3)
    ref_losses = []
    for b in batches:
        out = stage_forward(model, spec, b, None)
        out.loss_sum.backward()
        ref_losses.append(out.loss_sum.detach())
    want = _grads(model)
    par = copy.deepcopy(model)
    par.zero_grad(set_to_none=True)
    apply_context_parallel(apply_tensor_parallel(par, state.tp_group, True), state.cp_group, "ring")
    tf = ChainTransforms([ContextParallelTransforms(state.cp_group, "ring"),
                          SequenceParallelTransforms(state.tp_group, cp_size=2)])
    losses, vit_rows = [], []
    hook = par.visual.blocks[0].norm1.register_forward_hook(lambda m, i, o: vit_rows.append(i[0].shape[0]))
    for b in batches:
        out = stage_forward(par, spec, b, None, tf)
        out.loss_sum.backward()
        loss = out.loss_sum.detach().clone()
        dist.all_reduce(loss, group=state.cp_group)        # each CP rank's loss covers its own tokens
        losses.append(loss)
    hook.remove()
    sync_sequence_parallel_grads(par, state.tp_group)
    for p in par.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=state.cp_group)  # the dp·cp reduction, here cp only
    got = full_grads(par, state.tp_group)
    all_rows = [sum(b[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if b.get(k) is not None)
                for b in batches]
    return {"losses": losses, "ref_losses": ref_losses, "vit_rows": vit_rows,
            "all_rows": [n for n in all_rows if n], "names": sorted(got) == sorted(want),
            "grad errors": {n: float((got[n] - want[n]).abs().max()) for n in want}}


def test_cp2_tp2_sequence_parallel_loss_and_gradients_equal_one_process():
    for r in run_ranks(4, _cp2_tp2_rank, timeout_s=120.0):
        for got, want in zip(r["losses"], r["ref_losses"]):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert r["names"]
        bad = {n: e for n, e in r["grad errors"].items() if e > 1e-4}
        assert not bad, bad
        assert r["vit_rows"] == [n // 4 for n in r["all_rows"]]     # a quarter: cp, then tp

def test_unknown_cp_kind_is_rejected():
    with pytest.raises(ValueError, match="ring, ulysses"):
        ContextParallelTransforms(None, "allgather")
    with pytest.raises(ValueError, match="ring, ulysses"):
        apply_context_parallel(tiny_model(), None, "allgather")


def _bad_heads_rank(rank, world):
    group = dist.group.WORLD
    errors = []
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.num_key_value_heads = 48, 3, 1
    cfg.vision.out_hidden_size = 48
    try:
        apply_context_parallel(Qwen2_5_VL(cfg), group, "ulysses")
    except ValueError as e:
        errors.append(str(e))
    q = torch.randn(4, 3, D)
    k = torch.randn(4, 1, D)
    try:
        UlyssesAttention(group)(q, k, k, torch.tensor([0, 4], dtype=torch.int32), 4)
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_ulysses_with_heads_not_divisible_by_cp_is_rejected():
    for errors in run_ranks(2, _bad_heads_rank):
        assert len(errors) == 2 and all("must divide the query heads (3)" in e for e in errors)


def test_unpadded_stream_is_rejected_by_local_inputs():
    model = tiny_model()
    inp = model.inputs(torch.arange(1, 6), labels=torch.arange(1, 6))
    with pytest.raises(ValueError, match="multiple of 2·cp = 2"):
        ContextParallelTransforms(None, "ring").local_inputs(inp)


def _cp_as_if(cp: int, rank: int = 0) -> ContextParallelTransforms:
    """Context parallel's padding and row slicing for `cp` ranks in one process (no collectives run)."""
    tf = ContextParallelTransforms(None, "ring")
    tf.cp, tf.rank = cp, rank
    return tf


class _SPAsIfTP(SequenceParallelTransforms):
    tp = 4


@pytest.mark.parametrize("cp,rows,want", [(2, 12, 12), (8, 12, 16), (3, 4, 12), (3, 16, 24)])
def test_vision_padding_splits_rows_over_cp_in_whole_merge_groups(cp, rows, want):
    stream, grid = torch.randn(rows, 5), torch.tensor([[1, 2, rows // 2]])
    pixels, padded = _cp_as_if(cp).pad_vision(stream, grid, 2)
    assert pixels.shape[0] == want and int(padded.prod(-1).sum()) == want
    assert torch.equal(pixels[:rows], stream) and not pixels[rows:].any()
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in padded.tolist())    # whole merge groups


@pytest.mark.parametrize("cp,rows", [(2, 12), (2, 4), (3, 4), (3, 20)])
def test_cp_then_sp_padding_splits_rows_over_cp_times_tp(cp, rows):
    """Chained as the training engine builds it (cp, then sp with cp_size): rows split over cp·tp."""
    chain = ChainTransforms([_cp_as_if(cp), _SPAsIfTP(None, cp_size=cp)])
    pixels, grid = chain.pad_vision(torch.randn(rows, 5), torch.tensor([[1, 2, rows // 2]]), 2)
    assert pixels.shape[0] % (cp * 4) == 0 and pixels.shape[0] % 4 == 0
    assert int(grid.prod(-1).sum()) == pixels.shape[0]


def test_vision_rows_and_rotary_tables_are_contiguous_shards():
    model = tiny_model()
    b = micro_batches(model.cfg, 1)[0]
    ctx = model.visual.inputs(b["pixel_values"], b["image_grid_thw"])
    rows = ctx.cos.shape[0]
    x = torch.arange(rows * 3.0).view(rows, 3)
    for rank in range(2):
        tf = _cp_as_if(2, rank)
        local = tf.local_vision_inputs(ctx)
        part = slice(rank * rows // 2, (rank + 1) * rows // 2)
        assert local_rows(rows, 2, rank) == part
        assert torch.equal(tf.shard_vision(x), x[part])
        assert torch.equal(local.cos, ctx.cos[part]) and torch.equal(local.sin, ctx.sin[part])
        assert local.windows is ctx.windows        # the attention sees the whole stream after its all-to-all
    with pytest.raises(ValueError, match="do not split over cp = 2"):
        local_rows(7, 2, 0)


def test_vision_heads_not_divisible_by_cp_are_rejected():
    with pytest.raises(ValueError, match="cp = 4 must divide the vision heads \\(2\\)"):
        check_vision_heads(2, 4)
    with pytest.raises(ValueError, match="must divide the vision heads per tensor-parallel rank \\(1\\)"):
        ParallelLayout(tp=2, cp=2).validate(4, Qwen2_5_VLConfig.preset("tiny"))
