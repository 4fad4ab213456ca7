"""Data parallelism: two gloo ranks with bucketed, overlapped gradient reduction (and ZeRO-1) train
the tiny Qwen2.5-VL exactly as one process accumulating the same micro-batches does.

Each spawned rank also computes the one-process reference itself (1 thread, like the ranks), so the
comparison sees the same kernels and thread count. The whole run happens once per module (a spawn
costs seconds); each test checks one property of its results.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl.model import shift_labels
from mmfuse.parallel.data_parallel import GradReducer
from mmfuse.parallel.zero import ZeroAdamW, adamw_full_state, load_adamw_full_state
from mmfuse.train.optim import OptimizerConfig, build_optimizer, lr_at, set_lr
from tests.models.qwen_fixtures import pixels_for, sample, tiny_config
from tests.parallel.spawn import run_ranks

STEPS = 5
BUCKET_MB = 0.1          # the tiny model's 0.8 MB of gradients in ~8 buckets; ZeRO shards straddle parameters
OPT = OptimizerConfig(lr=2e-3, warmup_steps=2, weight_decay=0.01, grad_clip=1.0,
                      lr_multipliers={"vision_encoder": 0.5})


def _micro(seed: int, image: bool = True) -> dict:
    """A packed micro-batch of two samples; with `image`, the first one holds a 4×4-patch image."""
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(seed)
    a = sample(cfg, [3 + seed % 4, ("image", (1, 4, 4)), 7] if image else [5 + seed % 4, 9], gen)
    b = sample(cfg, [9 + seed % 3], gen)
    ids = torch.tensor(a + b)
    labels = ids.clone()
    labels[ids == cfg.image_token_id] = -100
    batch = {"input_ids": ids, "labels": labels,
             "cu_seqlens": torch.tensor([0, len(a), len(ids)], dtype=torch.int32)}
    if image:
        batch.update(pixel_values=pixels_for(cfg, [(1, 4, 4)], gen), image_grid_thw=torch.tensor([[1, 4, 4]]))
    return batch


def _setup(kind: str, group, overlap: bool = True, params: dict | None = None, opt_state: dict | None = None,
           max_norm: float = OPT.grad_clip):
    """(model, reducer, optimizer, clip) for kind 'adamw' (GradReducer + torch AdamW) or 'zero'."""
    torch.manual_seed(0)
    model = Qwen2_5_VL(tiny_config())
    if params is not None:
        model.load_state_dict(params, strict=False)
    adamw = build_optimizer(model, OPT)
    if kind == "zero":
        opt = ZeroAdamW.from_adamw(model, adamw, group, bucket_mb=BUCKET_MB, overlap=overlap)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        return model, opt.reducer, opt, lambda: opt.clip_grad_norm_(max_norm)
    if opt_state is not None:
        load_adamw_full_state(model.named_parameters(), adamw, opt_state)
    reducer = GradReducer(model.named_parameters(), group, bucket_mb=BUCKET_MB, overlap=overlap)
    trained = [p for g in adamw.param_groups for p in g["params"]]
    return model, reducer, adamw, lambda: torch.nn.utils.clip_grad_norm_(trained, max_norm)


def _label_tokens(micro: list[dict], group) -> torch.Tensor:
    n = torch.tensor(float(sum(int((shift_labels(b["labels"], b["cu_seqlens"]) != -100).sum()) for b in micro)))
    if group is not None:
        dist.all_reduce(n, group=group)     # the loss is the mean over the whole step's label tokens
    return n


def _train(kind: str, group, micro_of_step, steps: range, overlap: bool = True, init=None, save_at=None,
           max_norm: float = OPT.grad_clip) -> dict:
    """Optimizer steps as the training loop runs them; what the tests compare, per step and at the end."""
    model, reducer, opt, clip = _setup(kind, group, overlap, *(init or (None, None)), max_norm=max_norm)
    rec = {"loss": [], "norm": [], "first_micro_launches": [], "backward_launches": [], "step_launches": [],
           "grads": None, "saved": None}
    for step in steps:
        set_lr(opt, lr_at(step, OPT, STEPS))
        micro = micro_of_step(step)
        tokens = _label_tokens(micro, group)
        began, loss = reducer.launches, 0.0
        for i, b in enumerate(micro):
            with reducer.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
                out = model(**b)
                (out.loss_sum / tokens).backward()
            loss += float(out.loss_sum.detach())
            if i == 0:
                rec["first_micro_launches"].append(reducer.launches - began)
        rec["backward_launches"].append(reducer.launches - began)
        reducer.finish()
        rec["step_launches"].append(reducer.launches - began)
        if rec["grads"] is None and kind == "adamw":
            rec["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        rec["norm"].append(float(clip()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["loss"].append(loss)
        if save_at == step + 1:
            state = opt.state_dict() if kind == "zero" else adamw_full_state(model.named_parameters(), opt)
            rec["saved"] = ({n: p.detach().clone() for n, p in model.named_parameters()}, state)
    rec["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec["buckets"] = len(reducer.buckets)
    return rec


def _pairs(rank: int | None):
    """Step s uses micro-batches 2s and 2s+1: rank r takes 2s+r, one process takes both."""
    return lambda s: [_micro(2 * s + r) for r in ((0, 1) if rank is None else (rank,))]


def _quads(rank: int | None):
    """grad_accum 2 per rank: step s uses 4s..4s+3, rank r takes 4s+2r and 4s+2r+1."""
    return lambda s: [_micro(4 * s + i) for i in (range(4) if rank is None else (2 * rank, 2 * rank + 1))]


def _mixed(rank: int | None):
    """Rank 0 gets an image batch, rank 1 a text-only one (no vision gradients on rank 1)."""
    batches = lambda s: [_micro(2 * s, image=True), _micro(2 * s + 1, image=False)]  # noqa: E731
    return lambda s: batches(s) if rank is None else [batches(s)[rank]]


def _dp_rank(rank: int, world: int) -> dict:
    g = dist.group.WORLD
    return {
        "ref": _train("adamw", None, _pairs(None), range(STEPS)),
        "overlap": _train("adamw", g, _pairs(rank), range(STEPS)),
        "no_overlap": _train("adamw", g, _pairs(rank), range(STEPS), overlap=False),
        "ref_accum": _train("adamw", None, _quads(None), range(3)),
        "accum": _train("adamw", g, _quads(rank), range(3)),
        "ref_mixed": _train("adamw", None, _mixed(None), range(2)),
        "mixed": _train("adamw", g, _mixed(rank), range(2)),
    }


def _zero_rank(rank: int, world: int) -> dict:
    g = dist.group.WORLD
    ref = _train("adamw", None, _pairs(None), range(STEPS), save_at=STEPS - 1)
    zero = _train("zero", g, _pairs(rank), range(STEPS), save_at=STEPS - 1)
    return {
        "ref": ref, "zero": zero,
        "ref_unclipped": _train("adamw", None, _pairs(None), range(STEPS), max_norm=float("inf")),
        "zero_unclipped": _train("zero", g, _pairs(rank), range(STEPS), max_norm=float("inf")),
        # the last step again, from the dp2 state saved before it / from the one-process AdamW state
        "resumed": _train("zero", g, _pairs(rank), range(STEPS - 1, STEPS), init=zero["saved"]),
        "from_ref": _train("zero", g, _pairs(rank), range(STEPS - 1, STEPS), init=ref["saved"]),
        "to_adamw": _train("adamw", None, _pairs(None), range(STEPS - 1, STEPS), init=zero["saved"]),
        "ref_mixed": _train("adamw", None, _mixed(None), range(2)),
        "mixed": _train("zero", g, _mixed(rank), range(2)),
    }


@pytest.fixture(scope="module")
def dp():
    return run_ranks(2, _dp_rank)


@pytest.fixture(scope="module")
def zero():
    return run_ranks(2, _zero_rank)


# Parameters after 5 AdamW steps agree to 1e-5 when only the order of a sum differs, but not to
# the last bit: Adam divides by sqrt(exp_avg_sq), so on entries whose gradient is rounding noise
# (e.g. some attention biases) a last-bit difference becomes a sizeable part of an lr-sized update.
# Measured: no_sync accumulation (g0+g1)+(g2+g3) vs ((g0+g1)+g2)+g3 -> 9.8e-6; ZeRO's fp64 global
# norm vs torch's fp32 one (7e-7 relative apart) -> 1.7e-5. Hence 5e-5; the exact cases are exact.
PARAM_ATOL = 5e-5


def _assert_params_close(a: dict, b: dict, atol: float = PARAM_ATOL) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_same_training(ranks: list[dict], run: str, ref: str) -> None:
    expect = ranks[0][ref]
    summed = [sum(r[run]["loss"][s] for r in ranks) for s in range(len(expect["loss"]))]
    torch.testing.assert_close(torch.tensor(summed), torch.tensor(expect["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0][run]["norm"]), torch.tensor(expect["norm"]), rtol=1e-5, atol=1e-6)
    for r in ranks:
        _assert_params_close(r[run]["params"], expect["params"])


def test_dp2_trains_like_one_process_accumulating_both_micro_batches(dp):
    _assert_same_training(dp, "overlap", "ref")


def test_overlap_launches_buckets_during_backward_and_without_overlap_only_in_finish(dp):
    n = dp[0]["overlap"]["buckets"]
    assert n > 2
    assert all(0 < k <= n for k in dp[0]["overlap"]["backward_launches"])
    assert dp[0]["no_overlap"]["backward_launches"] == [0] * STEPS
    assert dp[0]["overlap"]["step_launches"] == dp[0]["no_overlap"]["step_launches"] == [n] * STEPS


def test_overlap_on_and_off_give_identical_results(dp):
    for r in dp:
        assert r["overlap"]["loss"] == r["no_overlap"]["loss"]
        for name, p in r["overlap"]["params"].items():
            assert torch.equal(p, r["no_overlap"]["params"][name]), name


def test_no_sync_issues_no_collective_for_the_first_micro_batch(dp):
    for r in dp:
        assert r["accum"]["first_micro_launches"] == [0, 0, 0]
        assert r["accum"]["step_launches"] == [r["accum"]["buckets"]] * 3
    _assert_same_training(dp, "accum", "ref_accum")


def test_rank_without_images_does_not_hang_and_gets_the_summed_grads(dp):
    for r in dp:
        assert all(r["mixed"]["grads"][n].abs().sum() > 0 for n in r["mixed"]["grads"] if n.startswith("visual."))
        _assert_params_close(r["mixed"]["grads"], dp[0]["ref_mixed"]["grads"], atol=1e-6)
    _assert_same_training(dp, "mixed", "ref_mixed")


def test_zero1_dp2_trains_like_one_process_adamw(zero):
    _assert_same_training(zero, "zero", "ref")


def test_zero1_update_without_clipping_is_bitwise_torch_adamw(zero):
    for r in zero:
        for name, p in r["zero_unclipped"]["params"].items():
            assert torch.equal(p, zero[0]["ref_unclipped"]["params"][name]), name


def test_zero1_with_a_text_only_rank_trains_like_one_process(zero):
    _assert_same_training(zero, "mixed", "ref_mixed")


def test_zero1_full_state_matches_adamw_state_by_name(zero):
    ours, theirs = zero[0]["zero"]["saved"][1], zero[0]["ref"]["saved"][1]
    assert zero[1]["zero"]["saved"][1]["state"].keys() == ours["state"].keys() == theirs["state"].keys()
    for name, st in theirs["state"].items():
        assert float(ours["state"][name]["step"]) == float(st["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][name][k], st[k], rtol=1e-4, atol=1e-9,
                                       msg=lambda m: f"{name}.{k}: {m}")


def test_zero1_resumed_from_its_full_state_repeats_the_step_exactly(zero):
    for r in zero:
        for name, p in r["zero"]["params"].items():
            assert torch.equal(p, r["resumed"]["params"][name]), name


def test_zero1_loads_a_one_process_adamw_state(zero):
    for r in zero:
        _assert_params_close(r["from_ref"]["params"], r["ref"]["params"])


def test_dp2_zero1_state_loads_into_a_one_process_adamw(zero):
    for r in zero:
        _assert_params_close(r["to_adamw"]["params"], r["ref"]["params"])


def test_reducer_without_a_group_leaves_gradients_untouched():
    model, reducer, _, _ = _setup("adamw", None)
    (model(**_micro(0)).loss_sum).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reducer.finish()
    assert reducer.launches == 0
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_zero1_step_before_finish_is_an_error():
    model, reducer, opt, _ = _setup("zero", None)
    (model(**_micro(0)).loss_sum).backward()
    with pytest.raises(RuntimeError, match="before reducer.finish"):
        opt.step()
