"""mmfuse.parallel.planner and `mmfuse plan`: parameter counts equal the real model's, every parameter
is held by exactly one rank of each TP·PP grid (TP-replicated ones by every TP rank), the activation
formula equals what the model saves for backward, and the bubble, ZeRO-1 and communication formulas."""

import json

import pytest
import torch

from mmfuse.cli.main import main
from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmfuse.models.qwen2_5_vl.model import Qwen2_5_VL
from mmfuse.parallel.layout import ParallelLayout
from mmfuse.parallel.costs import PARTS, Costs, Hardware, VirtualStage, model_params, unit_params
from mmfuse.parallel.planner import GiB, balanced_llm_layers, format_plan, plan, search

PREFIXES = {"vit": ("visual.patch_embed", "visual.blocks"), "merger": ("visual.merger",),
            "embed": ("model.embed_tokens",), "decoder": ("model.layers",), "head": ("model.norm", "lm_head")}


def _meta_model(preset):
    cfg = Qwen2_5_VLConfig.preset(preset)
    with torch.device("meta"):
        return cfg, Qwen2_5_VL(cfg)


@pytest.mark.parametrize("preset", ["tiny", "100m", "3b", "7b", "72b"])
def test_param_counts_equal_the_models_numel(preset):
    cfg, model = _meta_model(preset)
    counted = model_params(cfg)
    for part in PARTS:
        real = sum(p.numel() for n, p in model.named_parameters() if n.startswith(PREFIXES[part]))
        assert counted[part] == real, part
    assert sum(counted.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, layout", [
    ("7b", ParallelLayout(tp=2, pp=2)),
    ("7b", ParallelLayout(tp=4, pp=4, vpp=2)),
    ("7b", ParallelLayout(tp=2, pp=2, vit_pp_layers=[20, 12], llm_pp_layers=[0, 28])),
    ("72b", ParallelLayout(tp=8, pp=8, llm_pp_layers=[6, 11, 11, 11, 11, 11, 11, 8])),
])
def test_rank_params_sum_to_the_model_over_tp_and_pp(preset, layout):
    cfg = Qwen2_5_VLConfig.preset(preset)
    world = layout.tp * layout.pp
    r = plan(cfg, layout, world)
    total = sum(model_params(cfg).values())
    # Each TP rank of a stage holds the same split share; norms, row-parallel biases and the patch
    # embedding are held in full by every TP rank.
    held = sum(layout.tp * s.params_total - (layout.tp - 1) * s.params_tp_replicated for s in r.stages)
    assert held == total == r.total_params


def test_a_tied_lm_head_is_copied_to_the_last_stage():
    cfg = Qwen2_5_VLConfig.preset("3b")
    one = plan(cfg, ParallelLayout(), 1)
    two = plan(cfg, ParallelLayout(pp=2), 2)
    vh = cfg.text.vocab_size * cfg.text.hidden_size
    assert one.stages[0].params["head"] == cfg.text.hidden_size
    assert two.stages[1].params["head"] == cfg.text.hidden_size + vh
    assert sum(s.params_total for s in two.stages) == one.total_params + vh


def test_stage_params_follow_the_per_module_split():
    cfg = Qwen2_5_VLConfig.preset("7b")
    r = plan(cfg, ParallelLayout(pp=2, vit_pp_layers=[32, 0], llm_pp_layers=[12, 16]), 2)
    u = {k: n for k, (n, _) in unit_params(cfg).items()}
    s0, s1 = r.stages
    assert (s0.vit_layers, s0.llm_layers, s1.vit_layers, s1.llm_layers) == (32, 12, 0, 16)
    assert s0.params == {"vit": u["patch_embed"] + 32 * u["vit_block"], "merger": u["merger"], "embed": u["embed"],
                         "decoder": 12 * u["decoder_layer"], "head": 0}
    assert s1.params == {"vit": 0, "merger": 0, "embed": 0, "decoder": 16 * u["decoder_layer"],
                         "head": u["final_norm"] + u["lm_head"]}


@pytest.mark.parametrize("pp, vpp, m, expected", [(1, 1, 8, 0.0), (4, 1, 8, 3 / 11), (4, 2, 8, 3 / 19),
                                                  (8, 1, 32, 7 / 39)])
def test_bubble_is_pp_minus_1_over_m_vpp_plus_pp_minus_1(pp, vpp, m, expected):
    cfg = Qwen2_5_VLConfig.preset("72b")
    r = plan(cfg, ParallelLayout(tp=8, pp=pp, vpp=vpp), 8 * pp, micro_batches=m)
    assert r.bubble == pytest.approx(expected)


@pytest.mark.parametrize("cp", [1, 2])
def test_zero1_bytes_per_parameter_are_6_plus_12_over_dp_cp(cp):
    cfg = Qwen2_5_VLConfig.preset("100m")
    for zero1, per_param in ((False, 18), (True, 6 + 12 / 8)):
        s = plan(cfg, ParallelLayout(cp=cp, zero1=zero1), 8).stages[0]
        state = s.weight_bytes + s.grad_bytes + s.optimizer_bytes
        assert state == pytest.approx(per_param * s.params_total, abs=1)


def test_frozen_groups_cost_their_weights_only():
    cfg = Qwen2_5_VLConfig.preset("7b")
    p = model_params(cfg)
    s = plan(cfg, ParallelLayout(), 1, frozen=("vision_encoder",)).stages[0]
    assert s.trainable_params == sum(p.values()) - p["vit"]
    assert s.weight_bytes + s.grad_bytes + s.optimizer_bytes == 2 * p["vit"] + 18 * s.trainable_params
    # Nothing before the frozen ViT trains, so it keeps no activations.
    everything = plan(cfg, ParallelLayout(), 1).stages[0]
    assert s.activation_bytes_per_microbatch < everything.activation_bytes_per_microbatch


def _saved_bytes(model, cfg, T, G):
    """Bytes that autograd keeps for backward after one forward (parameters excluded), plus the two
    gradients the fused loss keeps on its context (dhidden [T, H], dweight [V, H])."""
    side = int(G ** 0.5)
    grid = torch.tensor([[1, 2 * side, 2 * side]])
    pixels = torch.randn(4 * G, cfg.vision.patch_dim)
    ids = torch.randint(0, 50, (T,))
    ids[5:5 + G] = cfg.image_token_id
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, pixel_values=pixels, image_grid_thw=grid, labels=ids)
    t = cfg.text
    return sum(seen.values()) + 2 * T * t.hidden_size + 2 * t.vocab_size * t.hidden_size


@pytest.mark.parametrize("preset, T, G", [("tiny", 256, 16), ("100m", 512, 64)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_formula_equals_what_the_model_saves(preset, T, G, recompute):
    from mmfuse.models.common.recompute import RecomputeConfig

    cfg = Qwen2_5_VLConfig.preset(preset)
    # The formula is per layer: two layers of each tower check it at the 100m widths in a tenth of the
    # time (bf16 on the CPU is slow); one vision block of each attention kind.
    cfg.text.num_hidden_layers = cfg.vision.depth = 2
    cfg.vision.fullatt_block_indexes = [1]
    model = Qwen2_5_VL(cfg).to(torch.bfloat16)
    if recompute != "none":
        policy = RecomputeConfig(recompute, "uniform", 1)
        model.set_recompute(vision=policy, text=policy)
    saved = _saved_bytes(model, cfg, T, G)
    c = Costs(cfg, ParallelLayout(), 1, T, G, recompute, recompute, (), Hardware())
    whole = VirtualStage(cfg.vision.depth, cfg.text.num_hidden_layers, True, True, True, True, "")
    keep, _ = c.stage_activation_bytes(whole)
    t = cfg.text
    # The workspace's fp32 accumulator and logits chunk live only while the loss runs.
    transient = 4 * t.vocab_size * t.hidden_size + 4 * min(256, T) * t.vocab_size
    predicted = keep + c.head_workspace_bytes() - transient
    assert predicted == pytest.approx(saved, rel=0.01)


def test_sequence_parallel_divides_decoder_activations_by_tp():
    cfg = Qwen2_5_VLConfig.preset("7b")
    one = Costs(cfg, ParallelLayout(), 1, 4096, 0, "none", "none", (), Hardware()).text_layer_bytes()[0]
    sp = Costs(cfg, ParallelLayout(tp=4), 4, 4096, 0, "none", "none", (), Hardware()).text_layer_bytes()[0]
    no_sp = Costs(cfg, ParallelLayout(tp=4, sequence_parallel=False), 4, 4096, 0, "none", "none", (),
                   Hardware()).text_layer_bytes()[0]
    assert sp == pytest.approx(one / 4, rel=1e-6)
    assert no_sp > sp


def test_pipeline_peak_microbatches_per_stage():
    cfg = Qwen2_5_VLConfig.preset("72b")
    r = plan(cfg, ParallelLayout(tp=8, pp=4), 32, micro_batches=16)
    assert [s.inflight for s in r.stages] == [4, 3, 2, 1]
    r = plan(cfg, ParallelLayout(tp=8, pp=4, vpp=2), 32, micro_batches=16)
    # Megatron's interleaved warmup on rank 0: 2(pp−1) + (vpp−1)·pp forwards, plus the one in flight.
    assert r.stages[0].inflight == (2 * 3 + 4 + 1) / 2


def test_communication_volumes():
    cfg = Qwen2_5_VLConfig.preset("7b")
    r = plan(cfg, ParallelLayout(), 8)
    s = r.stages[0]
    assert s.comm_bytes["tp"] == s.comm_bytes["pp"] == s.comm_bytes["cp"] == 0
    assert s.comm_bytes["dp"] == int(2 * 7 / 8 * 4 * s.trainable_params)          # ring all-reduce, fp32
    z = plan(cfg, ParallelLayout(zero1=True), 8).stages[0]
    assert z.comm_bytes["dp"] == int(7 / 8 * (4 + 2) * z.trainable_params)        # reduce-scatter + all-gather
    # Ring CP: each rank passes its K/V block around cp−1 times forward; backward passes K/V and dK/dV.
    ring = plan(cfg, ParallelLayout(cp=2), 2, seq_length=4096, image_tokens=0).stages[0]
    kv = cfg.text.num_key_value_heads * cfg.text.head_dim
    per_layer = 1 * (2 * 2048 * 2 * kv) * 3
    assert ring.comm_bytes["cp"] == 8 * cfg.text.num_hidden_layers * per_layer
    # PP: one boundary; each micro-batch's hidden states go forward and their gradients come back.
    pp = plan(cfg, ParallelLayout(pp=2), 2, seq_length=4096)
    hidden = 2 * 4096 * cfg.text.hidden_size
    assert [s.comm_bytes["pp"] for s in pp.stages] == [8 * hidden, 8 * hidden]



def test_cp_halves_the_vit_blocks_and_sends_their_all_to_alls():
    """CP splits the ViT blocks' rows: their activations and FLOPs halve at cp 2, and each block adds
    four all-to-alls of half its local q/k/v/out rows each way, plus the gather before the merger."""
    cfg = Qwen2_5_VLConfig.preset("7b")
    vit = VirtualStage(cfg.vision.depth, 0, True, True, False, False, "merged")
    blocks = VirtualStage(cfg.vision.depth, 0, False, False, False, False, "vit")
    one, two = (Costs(cfg, ParallelLayout(cp=cp), cp, 4096, 1024, "none", "none", (), Hardware()) for cp in (1, 2))
    assert two.vit_block_bytes()[0] == one.vit_block_bytes()[0] // 2
    assert two.stage_flops(blocks) == pytest.approx(one.stage_flops(blocks) / 2, rel=1e-9)
    assert two.boundary_bytes("vit") == one.boundary_bytes("vit") // 2
    rows = 2 * 2048 * cfg.vision.hidden_size                       # bf16 [P/cp, D] of one rank
    assert two.cp_vision_bytes(vit) == cfg.vision.depth * 4 * rows // 2 * 2 + rows * 2
    assert two.cp_bytes(vit) == two.cp_vision_bytes(vit) and one.cp_vision_bytes(vit) == 0

def test_groups_that_cross_nodes():
    cfg = Qwen2_5_VLConfig.preset("72b")
    r = plan(cfg, ParallelLayout(tp=8, pp=2), 32)
    assert r.spans_nodes == {"tp": False, "cp": False, "dp_cp": True, "pp": True}


def test_a_layout_that_does_not_fit_reports_it():
    cfg = Qwen2_5_VLConfig.preset("72b")
    r = plan(cfg, ParallelLayout(), 8, device_gib=80)
    assert not r.fits and r.peak_stage.total_bytes > 80 * GiB
    assert any("does not fit" in n for n in r.notes)
    text = format_plan(r)
    assert "OVER" in text and "fits: no" in text


def test_balanced_split_gives_the_vision_and_head_stages_fewer_layers():
    cfg = Qwen2_5_VLConfig.preset("7b")
    split = balanced_llm_layers(cfg, ParallelLayout(pp=4), 4096)
    assert sum(split) == 28 and split[0] < split[1] and split[-1] < split[1]
    even = plan(cfg, ParallelLayout(pp=4), 4)
    balanced = plan(cfg, ParallelLayout(pp=4, llm_pp_layers=split), 4)
    slowest = lambda r: max(s.compute_flops for s in r.stages)  # noqa: E731
    assert slowest(balanced) < slowest(even)


def test_search_returns_fitting_layouts_fastest_first():
    cfg = Qwen2_5_VLConfig.preset("7b")
    found = search(cfg, 8, limit=4)
    assert found and all(r.fits for r in found)
    speeds = [r.tokens_per_second_per_device for r in found]
    assert speeds == sorted(speeds, reverse=True)


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--preset", "7b", "--world", "8", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "tp 2 · pp 2 · cp 1 · dp 2" in out and "bubble" in out and "fits: yes" in out


def test_cli_json_and_exit_status_when_it_does_not_fit(capsys):
    assert main(["plan", "--preset", "72b", "--world", "8", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["layout"]["tp"] == 1 and len(report["stages"]) == 1


def test_cli_rejects_an_impossible_layout(capsys):
    assert main(["plan", "--preset", "7b", "--world", "8", "--tp", "8"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_cli_search_and_help(capsys):
    assert main(["plan", "--preset", "7b", "--world", "8", "--search", "3"]) == 0
    assert "tok/s/dev" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--zero1" in out and "--search" in out


def _docs_rows():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "parallel.md").read_text()
    table = text.split("### Qwen2.5-VL 7B and 72B on 8, 16 and 32 devices")[1]
    return [line for line in table.splitlines() if re.match(r"\| (7|72)B × \d+ \|", line)]


def _plan_json(argv, capsys):
    assert main(argv) in (0, 1)          # 1: does not fit the default 80 GiB; the numbers still print
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("row", _docs_rows(), ids=lambda r: r.split("|")[1].strip() + r.split("`")[1])
def test_docs_table_is_what_the_planner_prints(row, capsys):
    import re
    import shlex

    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    size, world = re.match(r"(\d+)B × (\d+)", cells[0]).groups()
    argv = ["plan", "--preset", f"{size}b", "--world", world, *shlex.split(cells[1].split("`")[1]),
            "--seq-length", "4096", "--micro-batches", "16", "--json"]
    plain = _plan_json(argv, capsys)
    full = _plan_json(argv + ["--recompute", "full", "--recompute-vit", "full"], capsys)

    def peak(r):
        return max(s["weight_bytes"] + s["grad_bytes"] + s["optimizer_bytes"] + s["activation_bytes"]
                   + s["workspace_bytes"] + s["reserve_bytes"] for s in r["stages"]) / 2 ** 30

    def fits(gib):
        return f"80 {'✓' if gib <= 80 else '✗'} · 141 {'✓' if gib <= 141 else '✗'}"

    comm = " · ".join(f"{max(s['comm_bytes'][k] for s in plain['stages']) / 2 ** 30:.1f}" for k in ("tp", "cp", "pp", "dp"))
    assert cells[2:] == [
        str(plain["dp"]), f"{peak(plain):.1f} ({fits(peak(plain))})", f"{peak(full):.1f} ({fits(peak(full))})",
        f"{100 * plain['bubble']:.1f} %", comm,
        f"{plain['tokens_per_second_per_device']:,.0f} / {full['tokens_per_second_per_device']:,.0f}"]
    if "(→" in cells[1]:                  # the split --balance chose
        assert cells[1].split("(→ ")[1].rstrip(")") == ",".join(map(str, plain["layout"]["llm_pp_layers"]))


def test_docs_table_has_the_7b_and_72b_rows_on_8_to_32_devices():
    worlds = {(r.split("|")[1].split("×")[0].strip(), int(r.split("|")[1].split("×")[1])) for r in _docs_rows()}
    assert {("7B", 8), ("7B", 16), ("7B", 32), ("72B", 8), ("72B", 16), ("72B", 32)} <= worlds
