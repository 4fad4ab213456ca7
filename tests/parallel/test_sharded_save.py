"""Multi-rank checkpoints are written as shards, each rank its share: a standard Hugging Face sharded
model folder and an indexed optimizer state, one file per writing rank, that load in one process,
under another layout and in transformers; no rank holds more than its share of full tensors; a rank
failing mid-save leaves `latest` at the previous checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmfuse.parallel.shard_writer import Item, deal, file_names, plan
from tests.parallel.spawn import run_ranks
from tests.parallel.test_train_layouts import (STEPS, model_dir, reference, run_config, run_layout,  # noqa: F401
                                               small_config, train_steps)

TP2_PP2 = dict(tp=2, pp=2, llm_pp_layers=[2, 2])
DP2_TP2_ZERO1 = dict(tp=2, zero1=True)


def _rank_save(rank, world, model_dir, save_dir, layout, steps, fail_rank):
    from mmfuse.parallel import shard_writer
    from mmfuse.parallel.state import build_state
    from mmfuse.train.parallel_engine import ParallelEngine

    cfg = run_config(model_dir, save_dir, **layout)
    state = build_state(cfg.parallel, rank, world)
    engine = ParallelEngine(cfg, state)
    train_steps(engine, cfg, range(steps), state.dp_rank, state.dp)
    engine.save(save_dir, steps, {"tokens_seen": 0, "data": None}, None, True, False, 0)
    out = {"pp": state.pp_rank, "peak": engine.last_save.peak_bytes, "files": engine.last_save.files}
    if fail_rank is not None:
        train_steps(engine, cfg, range(steps, steps + 1), state.dp_rank, state.dp)
        if rank == fail_rank:
            def crash(tensors, path):           # half a file, then the disk or the process is gone
                Path(path).write_bytes(b"partial")
                raise OSError(f"simulated crash writing {path}")
            shard_writer._write_file = crash
        try:
            engine.save(save_dir, steps + 1, {"tokens_seen": 0, "data": None}, None, True, False, 0)
        except RuntimeError as e:
            out["error"] = str(e)
    return out


def _save(world, model_dir, save_dir, layout, steps=1, fail_rank=None):
    return run_ranks(world, _rank_save, model_dir, str(save_dir), layout, steps, fail_rank, timeout_s=120)


def _keys_and_bytes(folder: Path, index_name: str) -> dict[str, dict[str, int]]:
    """file → {tensor key: bytes}, read from the files the index lists."""
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    out: dict[str, dict[str, int]] = {}
    for f in sorted(set(weight_map.values())):
        with safe_open(str(folder / f), framework="pt") as h:
            out[f] = {k: _nbytes(h, k) for k in h.keys()}
        assert {k for k, v in weight_map.items() if v == f} == set(out[f]), f"{f}: the index disagrees with the file"
    return out


def _nbytes(h, key: str) -> int:
    t = h.get_tensor(key)
    return t.numel() * t.element_size()


def _check_layout(ckpt: Path, ranks: list[dict], world: int):
    """One model shard and one optimizer shard per rank, indexes that cover each tensor once, and
    every rank's peak within its stage's share plus one tensor."""
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL

    model = ckpt / "model"
    weights = _keys_and_bytes(model, "model.safetensors.index.json")
    optim = _keys_and_bytes(ckpt, "optimizer.safetensors.index.json")
    assert sorted(weights) == [f"model-{i:05d}-of-{world:05d}.safetensors" for i in range(1, world + 1)]
    assert sorted(optim) == [f"optimizer-{i:05d}-of-{world:05d}.safetensors" for i in range(1, world + 1)]
    assert not list(model.glob("model.safetensors")) and not (ckpt / "optimizer.safetensors").exists()
    with torch.device("meta"):
        names = set(Qwen2_5_VL(small_config()).state_dict())
    all_w = [k for f in weights.values() for k in f]
    assert sorted(all_w) == sorted(names)                        # every weight, each once
    all_o = [k for f in optim.values() for k in f]
    assert len(all_o) == len(set(all_o)) and {k.rpartition("::")[0] for k in all_o} == names
    for files in (weights, optim):
        for pp in {r["pp"] for r in ranks}:
            stage = [r for r in ranks if r["pp"] == pp]
            held = {f: sum(files[f].values()) for r in stage for f in r["files"] if f in files}
            total = sum(held.values())
            largest = max(v for f in held for v in files[f].values())
            assert max(held.values()) <= total / len(stage) + largest, (pp, held)
            assert all(v > 0 for v in held.values())
    for r in ranks:                                   # the peak is one pass's tensors, not the union
        per_pass = [sum(files[f].values()) for files in (weights, optim) for f in r["files"] if f in files]
        assert r["peak"] == max(per_pass)


@pytest.fixture(scope="module")
def tp2_pp2_checkpoint(model_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("tp2_pp2")
    ranks = _save(4, model_dir, save, TP2_PP2)
    return save / "step-00000001", ranks


def test_tp2_pp2_save_writes_one_shard_per_rank_within_its_share(tp2_pp2_checkpoint):
    ckpt, ranks = tp2_pp2_checkpoint
    _check_layout(ckpt, ranks, 4)
    assert (ckpt.parent / "latest").read_text().strip() == ckpt.name


def test_sharded_model_folder_loads_in_transformers_with_our_logits(tp2_pp2_checkpoint):
    import transformers

    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
    from tests.models.qwen_fixtures import mm_token_types, pixels_for, sample

    folder = tp2_pp2_checkpoint[0] / "model"
    ours = Qwen2_5_VL.from_pretrained(folder).eval()
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    cfg = ours.cfg
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor(sample(cfg, [4, ("image", (1, 4, 6)), 5], gen))
    pix, grid = pixels_for(cfg, [(1, 4, 6)], gen), torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        ref = theirs(input_ids=ids[None], mm_token_type_ids=mm_token_types(cfg, ids)[None], pixel_values=pix,
                     image_grid_thw=grid).logits[0]
        got = ours(ids, pixel_values=pix, image_grid_thw=grid).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_zero1_tp2_save_shards_and_resumes_in_one_process_and_at_dp2(model_dir, tmp_path):
    from mmfuse.train import checkpoint as ckpt
    from mmfuse.train.loop import build_engine

    save = tmp_path / "run"
    ranks = _save(4, model_dir, save, DP2_TP2_ZERO1, steps=3)
    path = ckpt.latest_checkpoint(save)
    assert path.name == ckpt.step_dir_name(3)
    _check_layout(path, ranks, 4)

    ref_losses = reference(model_dir, str(tmp_path / "single"))[0][3:]
    cfg = run_config(model_dir, str(tmp_path / "one"))
    engine = build_engine(cfg)
    engine.load(path, load_optimizer=True, load_rng=False)
    one = train_steps(engine, cfg, range(3, STEPS))
    dp2, _ = run_layout(2, model_dir, str(tmp_path / "dp2"), dict(zero1=True), steps=(3, STEPS), load_from=str(path))
    for got in (one, dp2):
        assert torch.allclose(torch.tensor(got), torch.tensor(ref_losses), rtol=2e-5, atol=1e-6), (got, ref_losses)


def test_a_rank_failing_mid_save_leaves_latest_at_the_previous_checkpoint(model_dir, tmp_path):
    from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
    from mmfuse.train import checkpoint as ckpt

    ranks = _save(2, model_dir, tmp_path, dict(pp=2, vit_pp_layers=[4, 0], llm_pp_layers=[2, 2]), fail_rank=1)
    assert all("failed on rank(s) [1]" in r.get("error", "") for r in ranks), ranks
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()
    model = Qwen2_5_VL(small_config())
    restored = ckpt.load_checkpoint(tmp_path / "step-00000001", model, None, load_rng=False)
    assert restored.step == 1
    assert set(ckpt.read_optimizer_state(tmp_path / "step-00000001")) == set(model.state_dict())


# ---- the plan, without ranks ----------------------------------------------------------------------

def _items(sizes: dict[str, int]) -> list[Item]:
    return [Item(k, k, None, n) for k, n in sizes.items()]


def test_deal_keeps_every_writer_within_its_share_plus_one_tensor():
    gen = torch.Generator().manual_seed(0)
    sizes = {f"t{i}": int(n) for i, n in enumerate(torch.randint(1, 1000, (200,), generator=gen))}
    owner = deal(_items(sizes), [3, 5, 7, 9])
    assert set(owner) == set(sizes)
    load = {w: sum(sizes[k] for k, r in owner.items() if r == w) for w in (3, 5, 7, 9)}
    assert max(load.values()) <= sum(sizes.values()) / 4 + max(sizes.values())


def test_a_tensor_held_by_two_stages_is_written_once_by_the_first():
    kept, owner = plan([_items({"embed": 8, "a": 4}), _items({"b": 4, "embed": 8})], [[0, 1], [2, 3]])
    assert [it.key for it in kept[1]] == ["b"] and owner["embed"] in (0, 1)
    assert file_names(owner, "model") == {0: "model-00001-of-00003.safetensors",
                                          1: "model-00002-of-00003.safetensors",
                                          2: "model-00003-of-00003.safetensors"}
