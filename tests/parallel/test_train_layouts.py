"""Every parallel layout trains like one process: the same per-step losses and, after 5 optimizer
steps on micro-batches with images and a video, the same parameters (fp32 tolerance). Runs the real
training step (train/parallel_engine.py) on spawned gloo ranks; one process (LocalEngine) is the
reference. Also: checkpoints written under one layout resume under another."""

from __future__ import annotations


import pytest
import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.train.config import CheckpointSection, ModelSection, RunConfig, TrainingSection
from mmfuse.train.optim import OptimizerConfig, lr_at, set_lr
from tests.parallel.batches import micro_batches
from tests.parallel.spawn import run_ranks

STEPS = 5
MICRO_PER_STEP = 4


def small_config() -> Qwen2_5_VLConfig:
    """The tiny preset with 4 decoder layers and 4 ViT blocks, so 4 virtual pipeline stages have work."""
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.text.num_hidden_layers = 4
    cfg.vision.depth = 4
    cfg.vision.fullatt_block_indexes = [1, 3]
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel_model")
    torch.manual_seed(0)
    Qwen2_5_VL(small_config()).save_pretrained(d)
    return str(d)


def run_config(model_dir: str, save_dir: str, **layout) -> RunConfig:
    return RunConfig(model=ModelSection(pretrained=model_dir),
                     training=TrainingSection(max_steps=STEPS, grad_accum=MICRO_PER_STEP, seq_length=4096),
                     optimizer=OptimizerConfig(lr=2e-3, warmup_steps=2, lr_schedule="cosine", weight_decay=0.01,
                                               grad_clip=0.5),
                     checkpoint=CheckpointSection(save_dir=save_dir), parallel=ParallelLayout(**layout))


def step_batches(cfg: Qwen2_5_VLConfig, step: int) -> list[dict]:
    return micro_batches(cfg, MICRO_PER_STEP, seed=100 * step)


def train_steps(engine, cfg: RunConfig, steps: range, dp_rank: int = 0, dp: int = 1) -> list[float]:
    losses = []
    for step in steps:
        set_lr(engine.optimizer, lr_at(step, cfg.optimizer, cfg.training.max_steps))
        micro = step_batches(engine.model.cfg, step)[dp_rank::dp]
        r = engine.step(micro, cfg.optimizer.grad_clip)
        losses.append(r.loss_sum / r.label_tokens)
    return losses


def reference(model_dir: str, tmp: str, steps: range = range(STEPS)):
    from mmfuse.train.loop import build_engine, seed_everything
    cfg = run_config(model_dir, tmp)
    seed_everything(0)
    engine = build_engine(cfg)
    losses = train_steps(engine, cfg, steps)
    return losses, {n: p.detach().clone() for n, p in engine.model.state_dict().items()}


def _rank_train(rank, world, model_dir, save_dir, layout, load_from, steps, save_at):
    from mmfuse.parallel import checkpoint as pckpt
    from mmfuse.parallel.state import build_state
    from mmfuse.train.parallel_engine import ParallelEngine

    cfg = run_config(model_dir, save_dir, **layout)
    state = build_state(cfg.parallel, rank, world)
    engine = ParallelEngine(cfg, state)
    first = steps[0]
    if load_from:
        engine.load(load_from, load_optimizer=True, load_rng=False)
    losses = train_steps(engine, cfg, range(first, steps[1]), state.dp_rank, state.dp)
    if save_at:
        engine.save(save_dir, steps[1], {"tokens_seen": 0, "data": None}, None, True, False, 0)
    weights = {}
    for part in engine._parts():
        weights.update(pckpt.full_tensors(part, None, state)[0])
    gathered = pckpt.gather_to_rank0(weights, {}, state)
    return {"losses": losses, "params": gathered[0] if gathered else None}


def run_layout(world: int, model_dir: str, save_dir: str, layout: dict, steps=(0, STEPS), load_from=None,
               save_at=False):
    results = run_ranks(world, _rank_train, model_dir, save_dir, layout, load_from, steps, save_at, timeout_s=120)
    return results[0]["losses"], results[0]["params"]


def assert_same_run(got, want):
    losses, params = got
    ref_losses, ref_params = want
    assert torch.allclose(torch.tensor(losses, dtype=torch.float64), torch.tensor(ref_losses, dtype=torch.float64),
                          rtol=2e-5, atol=1e-6), (losses, ref_losses)
    assert set(params) == set(ref_params)
    worst = max(float((params[n] - ref_params[n]).abs().max()) for n in ref_params)
    assert worst < 5e-5, worst


LAYOUTS = {
    "dp2": (2, dict()),
    "dp2_zero1": (2, dict(zero1=True)),
    "dp2_no_overlap": (2, dict(overlap_grad_reduce=False, bucket_mb=0.01)),
    "tp2": (2, dict(tp=2, sequence_parallel=False)),
    "tp2_sp": (2, dict(tp=2)),
    "tp2_sp_overlap": (2, dict(tp=2, tp_overlap_chunks=2)),
    "pp2_1f1b": (2, dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2])),
    "pp2_vpp2": (2, dict(pp=2, vpp=2, vit_pp_layers=[2, 2, 0, 0], llm_pp_layers=[0, 1, 1, 2])),
    "cp2_ring": (2, dict(cp=2, cp_kind="ring")),
    "cp2_ulysses": (2, dict(cp=2, cp_kind="ulysses")),
    "tp2_pp2": (4, dict(tp=2, pp=2, llm_pp_layers=[2, 2])),
    "dp2_tp2": (4, dict(tp=2)),
    "dp2_cp2_zero1": (4, dict(cp=2, zero1=True)),
}


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    return reference(model_dir, str(tmp_path_factory.mktemp("single")))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(name, model_dir, single, tmp_path):
    world, layout = LAYOUTS[name]
    assert_same_run(run_layout(world, model_dir, str(tmp_path), layout), single)


def test_checkpoint_from_tp2_pp2_resumes_in_one_process_and_at_dp2(model_dir, single, tmp_path):
    from mmfuse.train import checkpoint as ckpt
    from mmfuse.train.loop import build_engine

    save = tmp_path / "run"
    run_layout(4, model_dir, str(save), dict(tp=2, pp=2, llm_pp_layers=[2, 2]), steps=(0, 3), save_at=True)
    path = ckpt.latest_checkpoint(save)
    assert path is not None and path.name == ckpt.step_dir_name(3)

    # one process
    cfg = run_config(model_dir, str(tmp_path / "one"))
    engine = build_engine(cfg)
    engine.load(path, load_optimizer=True, load_rng=False)
    one = train_steps(engine, cfg, range(3, STEPS))
    # dp2
    dp2, _ = run_layout(2, model_dir, str(tmp_path / "dp2"), {}, steps=(3, STEPS), load_from=str(path))
    ref_losses = single[0][3:]
    for got in (one, dp2):
        assert torch.allclose(torch.tensor(got), torch.tensor(ref_losses), rtol=2e-5, atol=1e-6), (got, ref_losses)
