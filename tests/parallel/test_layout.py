"""Layout arithmetic and validation: rank coordinates, groups, and the errors bad layouts give
before any process-group work."""

import datetime

import pytest
import torch.distributed as dist

from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.parallel.state import backend_for, coordinates, group_ranks, init_parallel, rank_of


def test_rank_order_is_tp_fastest_then_cp_dp_pp():
    layout = ParallelLayout(tp=2, cp=2, pp=2)
    world = 16                                     # dp = 2
    seen = set()
    for r in range(world):
        t, c, d, p = coordinates(r, layout, world)
        assert rank_of(t, c, d, p, layout, world) == r
        seen.add((t, c, d, p))
    assert len(seen) == world
    assert coordinates(1, layout, world) == (1, 0, 0, 0)
    assert coordinates(2, layout, world) == (0, 1, 0, 0)
    assert coordinates(4, layout, world) == (0, 0, 1, 0)
    assert coordinates(8, layout, world) == (0, 0, 0, 1)


def test_groups_partition_the_world_and_dp_cp_joins_dp_and_cp():
    layout = ParallelLayout(tp=2, cp=2, pp=2)
    groups = group_ranks(layout, 16)
    for kind, size in (("tp", 2), ("cp", 2), ("dp", 2), ("pp", 2), ("dp_cp", 4)):
        members = sorted(r for g in groups[kind] for r in g)
        assert members == list(range(16)), kind
        assert all(len(g) == size for g in groups[kind]), kind
    assert [0, 2, 4, 6] in groups["dp_cp"]          # tp rank 0 of stage 0: cp × dp
    assert [0, 8] in groups["pp"]


@pytest.mark.parametrize("kw,world,match", [
    (dict(tp=3), 4, "world size 4 is not divisible by tp·pp·cp"),
    (dict(tp=2), 1, "torchrun --nproc-per-node 2"),
    (dict(tp=8), 8, "does not divide the model's text num_attention_heads"),
    (dict(tp=4), 4, "num_key_value_heads"),
    (dict(vpp=2), 2, "needs pipeline parallelism"),
    (dict(cp=2, cp_kind="allgather"), 2, "cp_kind must be one of ring, ulysses"),
    (dict(cp=8, cp_kind="ulysses"), 8, "must divide the query heads"),
    (dict(tp=0), 1, "parallel.tp must be an integer >= 1"),
    (dict(tp_overlap_chunks=4), 1, "needs tp > 1 with sequence_parallel"),
    (dict(tp=2, sequence_parallel=False, tp_overlap_chunks=4), 2, "needs tp > 1 with sequence_parallel"),
])
def test_impossible_layouts_fail_with_the_reason(kw, world, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kw).validate(world, Qwen2_5_VLConfig.preset("tiny"))


def test_mindspeed_nested_vpp_lists_are_read_in_chunk_order():
    cfg = Qwen2_5_VLConfig.preset("7b")
    layout = ParallelLayout(pp=2, vpp=2, vit_pp_layers=[[32, 0], [0, 0]], llm_pp_layers=[[6, 8], [8, 6]])
    vit, llm = layout.stage_layers(cfg)
    assert vit == [32, 0, 0, 0] and llm == [6, 8, 8, 6]


def test_default_split_puts_the_vit_first_and_spreads_decoder_layers_with_extras_last():
    cfg = Qwen2_5_VLConfig.preset("7b")              # 32 ViT blocks, 28 decoder layers
    vit, llm = ParallelLayout(pp=3).stage_layers(cfg)
    assert vit == [32, 0, 0] and llm == [9, 9, 10]


def test_bad_layout_fails_before_any_process_group(monkeypatch):
    # No MASTER_ADDR/PORT: reaching init_process_group would fail differently (or hang).
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="not divisible"):
        init_parallel(ParallelLayout(tp=3), "cpu", Qwen2_5_VLConfig.preset("tiny"))


def test_one_process_without_torchrun_gets_the_single_state(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = init_parallel(ParallelLayout(), "cpu")
    assert state.world_size == 1 and state.is_logging_rank and state.dp == 1


def test_backend_follows_the_device_without_importing_its_plugin():
    assert [backend_for(d) for d in ("cpu", "cuda", "cuda:3", "npu", "npu:1")] == \
        ["gloo", "nccl", "nccl", "hccl", "hccl"]


def test_configured_timeout_and_backend_reach_init_process_group(monkeypatch):
    seen = {}

    class Joined(Exception):
        pass

    def fake_init(backend, **kw):
        seen.update(kw, backend=backend)
        raise Joined      # stop before any real rendezvous

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(Joined):
        init_parallel(ParallelLayout(tp=2, timeout_s=42.5), "cpu", Qwen2_5_VLConfig.preset("tiny"))
    assert seen == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": datetime.timedelta(seconds=42.5)}

