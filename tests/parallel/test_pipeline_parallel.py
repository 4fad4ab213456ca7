"""Pipeline schedules (parallel/pipeline_schedule.py) on spawned gloo ranks: three optimizer steps of a
pipelined run give the losses and parameters of the same steps in one process; a failing rank ends
the run instead of hanging it; an impossible interleaving is refused before any communication."""

import contextlib
import time

import pytest
import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from mmfuse.models.qwen2_5_vl.pipeline import NoTransforms
from mmfuse.parallel import ParallelLayout, ParallelState
from mmfuse.parallel.pipeline_schedule import build_pipeline_chunks, forward_backward, sync_tied_embedding_grads
from mmfuse.parallel.state import build_state
from tests.parallel.batches import label_tokens, micro_batch, micro_batches
from tests.parallel.spawn import run_ranks

STEPS = 3
LR = 0.5


def optimizer(model):
    # Plain SGD: a parameter's difference to the reference is LR times its gradient's, so fp32 noise
    # stays fp32 noise. (Adam divides by sqrt(v): on near-zero gradients, such as k_proj.bias, whose
    # gradient vanishes under softmax's shift invariance, it blows rounding noise up to ±lr.)
    return torch.optim.SGD(model.parameters(), lr=LR)


def deeper_tiny_model() -> Qwen2_5_VL:
    """The tiny config with 4 ViT blocks and 4 decoder layers, so pp·vpp up to 8 stages can be split."""
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.text.num_hidden_layers = 4
    cfg.vision.depth = 4
    cfg.vision.fullatt_block_indexes = [1, 3]
    torch.manual_seed(0)
    return Qwen2_5_VL(cfg)


def step_batches(cfg, step: int, n: int) -> list[dict]:
    """n micro-batches of one step: images and a video, and one text-only micro-batch (its vision
    stages send an empty tensor)."""
    batches = micro_batches(cfg, n, seed=100 * step)
    batches[1] = micro_batch(cfg, [[13], [9, 6]], seed=100 * step + 50)
    return batches


def train(model, state, layout, n_micro: int, overlap_p2p: bool = True, steps: int = STEPS,
          p2p_protocol: str = "auto") -> dict:
    chunks = build_pipeline_chunks(model, layout, state)
    opt = optimizer(model)
    losses = []
    for step in range(steps):
        batches = step_batches(model.cfg, step, n_micro)
        opt.zero_grad()
        loss, tokens = forward_backward(chunks, batches, state, 1.0 / sum(label_tokens(b) for b in batches),
                                        overlap_p2p=overlap_p2p, p2p_protocol=p2p_protocol)
        sync_tied_embedding_grads(model, state)
        opt.step()
        losses.append((loss, tokens))
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def reference(n_micro: int) -> dict:
    """The same steps in one process, the whole model, no schedule."""
    model = deeper_tiny_model()
    opt = optimizer(model)
    losses = []
    for step in range(STEPS):
        batches = step_batches(model.cfg, step, n_micro)
        scale = 1.0 / sum(label_tokens(b) for b in batches)
        opt.zero_grad()
        loss, tokens = 0.0, 0
        for b in batches:
            out = model(**b)
            (out.loss_sum * scale).backward()
            loss, tokens = loss + out.loss_sum.item(), tokens + out.num_label_tokens
        opt.step()
        losses.append((loss, tokens))
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


def train_rank(rank, world_size, layout_kw, n_micro, overlap_p2p: bool = True, steps: int = STEPS,
               p2p_protocol: str = "auto"):
    """p2p_protocol 'ordered' also gives the shape headers a gloo group of their own, as on NCCL."""
    layout = ParallelLayout(timeout_s=30, **layout_kw)
    model = deeper_tiny_model()
    layout.validate(world_size, model.cfg)
    state = build_state(layout, rank, world_size, own_meta_group=p2p_protocol == "ordered")
    return train(model, state, layout, n_micro, overlap_p2p, steps, p2p_protocol)


# (layout, micro-batches) on two ranks: 1F1B, interleaved with vision-only stages, interleaved all-warm-up
PP2_SCHEDULES = [
    pytest.param(dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 3]), 4, id="pp2-1f1b"),
    pytest.param(dict(pp=2, vpp=2, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 0, 2, 2]), 4,
                 id="pp2-vpp2-vision-only-stages"),
    pytest.param(dict(pp=2, vpp=3, vit_pp_layers=[2, 2, 0, 0, 0, 0], llm_pp_layers=[0, 0, 1, 1, 1, 1]), 2,
                 id="pp2-vpp3-all-warmup"),
]


@pytest.mark.parametrize("layout_kw,n_micro", [
    *PP2_SCHEDULES,
    pytest.param(dict(pp=4, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 1, 1, 2]), 4, id="pp4-1f1b"),
    pytest.param(dict(pp=4, vpp=2, vit_pp_layers=[1, 1, 1, 1, 0, 0, 0, 0], llm_pp_layers=[0, 0, 0, 0, 1, 1, 1, 1]),
                 8, id="pp4-vpp2"),
])
def test_pipelined_steps_equal_the_single_process_steps(layout_kw, n_micro):
    world = layout_kw["pp"]
    ranks = run_ranks(world, train_rank, layout_kw, n_micro, timeout_s=30)
    want = reference(n_micro)
    last = ranks[-1]["losses"]
    for (got_loss, got_tokens), (want_loss, want_tokens) in zip(last, want["losses"]):
        assert got_tokens == want_tokens
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for r in ranks[:-1]:
        assert r["losses"] == [(0.0, 0)] * STEPS
    owned = set()
    for r in ranks:
        for name, p in r["params"].items():
            assert torch.allclose(p, want["params"][name], rtol=1e-4, atol=1e-5), name
            owned.add(name)
    assert owned == set(want["params"])


def test_one_stage_schedule_equals_the_single_process_steps():
    layout = ParallelLayout()
    state = ParallelState.single()
    got = train(deeper_tiny_model(), state, layout, 4)
    want = reference(4)
    for (gl, gt), (wl, wt) in zip(got["losses"], want["losses"]):
        assert gt == wt and gl == pytest.approx(wl, rel=1e-6)
    for name, p in got["params"].items():
        assert torch.allclose(p, want["params"][name], rtol=1e-5, atol=1e-6), name


def test_interleaving_needs_micro_batches_in_groups_of_pp_before_any_communication():
    layout = ParallelLayout(pp=2, vpp=2, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 0, 2, 2])
    # No process group exists here: reaching any send or receive would fail with another error.
    state = ParallelState(layout, rank=0, world_size=2, tp_rank=0, cp_rank=0, dp_rank=0, pp_rank=0, pp_ranks=(0, 1))
    model = deeper_tiny_model()
    chunks = build_pipeline_chunks(model, layout, state)
    with pytest.raises(ValueError, match="3 micro-batches per step is not a multiple of 2"):
        forward_backward(chunks, micro_batches(model.cfg, 3), state, 1.0)


class Log(NoTransforms):
    """Records the order of forwards (pad_batch starts every stage_forward) and backwards (grad_sync
    wraps every backward, with whether it is the rank's last)."""

    def __init__(self):
        self.events = []

    def pad_batch(self, batch):
        self.events.append("F")
        return batch

    def grad_sync(self, is_last):
        self.events.append("B!" if is_last else "B")
        return contextlib.nullcontext()


def _order_rank(rank, world_size, layout_kw, n_micro):
    layout = ParallelLayout(timeout_s=30, **layout_kw)
    model = deeper_tiny_model()
    state = build_state(layout, rank, world_size)
    log = Log()
    forward_backward(build_pipeline_chunks(model, layout, state), step_batches(model.cfg, 0, n_micro), state, 1.0,
                     transforms=log, grad_sync=log.grad_sync)
    return " ".join(log.events)


@pytest.mark.parametrize("layout_kw,n_micro,want", [
    # 1F1B: rank 0 runs pp − 0 − 1 = 1 forward ahead, so at most 2 micro-batches are in flight.
    (dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2]), 4,
     ["F F B F B F B B!", "F B F B F B F B!"]),
    # Interleaved (Megatron): warm-up (pp − rank − 1)·2 + (vpp − 1)·pp forwards of 8 (micro-batch, chunk) pairs.
    (dict(pp=2, vpp=2, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 0, 2, 2]), 4,
     ["F F F F F B F B F B F B B B B B!", "F F F B F B F B F B F B F B B B!"]),
])
def test_schedules_run_forwards_and_backwards_in_megatrons_order(layout_kw, n_micro, want):
    assert run_ranks(layout_kw["pp"], _order_rank, layout_kw, n_micro, timeout_s=30) == want


class FailAt(NoTransforms):
    """Raises in the n-th stage forward on this rank (pad_batch runs first in every stage_forward)."""

    def __init__(self, n: int):
        self.calls, self.n = 0, n

    def pad_batch(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected stage failure")
        return batch


# The process-group timeout of the failure tests: a wedged peer is noticed after it, and it must
# exceed the wait for one micro-batch's activations on a loaded 2-core machine (5 s was seen to fail).
FAILURE_TIMEOUT_S = 12


def _failing_rank(rank, world_size, layout_kw, stay_alive):
    layout = ParallelLayout(timeout_s=FAILURE_TIMEOUT_S, **layout_kw)
    model = deeper_tiny_model()
    state = build_state(layout, rank, world_size)
    chunks = build_pipeline_chunks(model, layout, state)
    batches = micro_batches(model.cfg, 4)
    transforms = FailAt(3) if rank == 1 else None     # rank 1, micro-batch 2
    try:
        forward_backward(chunks, batches, state, 1.0, transforms)
    except RuntimeError as e:
        if not (stay_alive and "injected" in str(e)):
            raise
        time.sleep(60)   # a wedged rank: alive, never communicating again
    return None


@pytest.mark.parametrize("stay_alive", [False, True], ids=["rank-dies", "rank-wedged"])
def test_a_failing_rank_ends_the_run_instead_of_hanging_it(stay_alive):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        run_ranks(2, _failing_rank, dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2]), stay_alive,
                  timeout_s=FAILURE_TIMEOUT_S)
    assert time.monotonic() - start < 30 + 2 * FAILURE_TIMEOUT_S
    # Dies: its own error ends the run. Wedged: rank 0 gives up by itself after the group timeout.
    if stay_alive:
        assert "rank0" in str(err.value) and "Timed out" in str(err.value)
    else:
        assert "injected stage failure" in str(err.value)
