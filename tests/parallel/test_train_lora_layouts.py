"""LoRA under parallel layouts (parallel/lora_parallel.py, train/parallel_engine.py): tp2 (with and
without sequence parallelism), pp2, dp2 and dp2 with ZeRO-1 train LoRA adapters like one process (the
same per-step losses; the same adapters, fp32 tolerance), and the adapter files a parallel run
exports and checkpoints are the PEFT-format files of the one-process run; a LoRA checkpoint of a
tp2 run resumes under dp2 (adapters and their AdamW state) on the one-process loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.models.common.lora import LoRAConfig
from tests.parallel.spawn import run_ranks
from tests.parallel.test_train_layouts import model_dir, run_config, train_steps  # noqa: F401  (fixture)

STEPS = 3
# The default targets plus the ViT's fused qkv (column-parallel in 3 blocks) and attention output (row).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj"]


def lora_config(model_dir: str, save_dir: str, **layout):
    cfg = run_config(model_dir, save_dir, **layout)
    cfg.model.lora = LoRAConfig(rank=4, alpha=8.0, target_modules=list(TARGETS))
    cfg.training.max_steps = STEPS
    return cfg


def adapter_files(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def _rank_train(rank, world, model_dir, out_dir, layout, steps=(0, STEPS), load_from=None):
    from mmfuse.parallel.state import build_state
    from mmfuse.train.loop import seed_everything
    from mmfuse.train.parallel_engine import ParallelEngine

    cfg = lora_config(model_dir, out_dir, **layout)
    state = build_state(cfg.parallel, rank, world)
    seed_everything(0)
    engine = ParallelEngine(cfg, state)
    if load_from:
        engine.load(load_from, load_optimizer=True, load_rng=False)
    losses = train_steps(engine, cfg, range(*steps), state.dp_rank, state.dp)
    engine.export(Path(out_dir) / "final", cfg.model.lora)
    engine.save(Path(out_dir) / "run", steps[1], {"tokens_seen": 0, "data": None}, cfg.model.lora, True, False, 0)
    return losses


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):  # noqa: F811
    from mmfuse.train.loop import build_engine, seed_everything

    out = tmp_path_factory.mktemp("lora_single")
    cfg = lora_config(model_dir, str(out))
    seed_everything(0)
    engine = build_engine(cfg)
    losses = train_steps(engine, cfg, range(STEPS))
    engine.export(out / "final", cfg.model.lora)
    return losses, adapter_files(out / "final" / "adapters")


LAYOUTS = {
    "tp2": (2, dict(tp=2, sequence_parallel=False)),
    "tp2_sp": (2, dict(tp=2)),
    "pp2": (2, dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2])),
    "dp2": (2, dict()),
    "dp2_zero1": (2, dict(zero1=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_trains_and_saves_like_one_process(name, model_dir, single, tmp_path):  # noqa: F811
    world, layout = LAYOUTS[name]
    losses = run_ranks(world, _rank_train, model_dir, str(tmp_path), layout, timeout_s=120)[0]
    want_losses, (want_config, want) = single
    assert torch.allclose(torch.tensor(losses, dtype=torch.float64), torch.tensor(want_losses, dtype=torch.float64),
                          rtol=2e-5, atol=1e-6), (losses, want_losses)
    exported = adapter_files(tmp_path / "final" / "adapters")
    checkpointed = adapter_files(tmp_path / "run" / f"step-{STEPS:08d}" / "adapters")
    for config, got in (exported, checkpointed):
        assert config == want_config
        assert set(got) == set(want)
        assert any(".visual.blocks.0.attn.qkv.lora_B" in k for k in got)
        for k, t in want.items():
            assert got[k].shape == t.shape, k
            # the bound of the full-weight layout tests: AdamW's first steps divide rounding-level
            # gradient differences by their own square root, so a few reach ~1e-5 on weights ~1e-2
            assert float((got[k] - t).abs().max()) < 5e-5, (k, float((got[k] - t).abs().max()))
    # the adapters moved: B starts at zero
    assert all(float(t.abs().max()) > 0 for k, t in want.items() if k.endswith("lora_B.weight"))


def test_lora_checkpoint_from_tp2_resumes_under_dp2(model_dir, single, tmp_path):  # noqa: F811
    run_ranks(2, _rank_train, model_dir, str(tmp_path / "tp2"), dict(tp=2), (0, 2), timeout_s=120)
    ckpt = tmp_path / "tp2" / "run" / "step-00000002"
    assert (ckpt / "adapters" / "adapter_model.safetensors").is_file() and not (ckpt / "model").exists()
    losses = run_ranks(2, _rank_train, model_dir, str(tmp_path / "dp2"), {}, (2, STEPS), str(ckpt), timeout_s=120)[0]
    want = single[0][2:]
    assert torch.allclose(torch.tensor(losses, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          rtol=2e-5, atol=1e-6), (losses, want)
