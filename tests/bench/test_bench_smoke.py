"""The benchmark harness on tiny shapes: records are complete and consistent, missing ops are
reported as skipped, baselines compute the op they stand in for, and the run_all -> plot -> report
chain writes its files. No timing assertions: benchmarks are not tests."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mmfuse.ops  # noqa: E402
from mmfuse.ops import reference  # noqa: E402

from bench import common, harness, plot, report, tables, targets  # noqa: E402
from bench.ops import ALL_OPS, OP_MODULES, bench_attention, bench_rms_norm, bench_rotary, bench_swiglu  # noqa: E402

TINY = {"rms_norm": (16, 32), "add_rms_norm": (16, 32), "rotary": (64, 2, 1, 16), "apply_mrope": (64, 2, 1, 16),
        "swiglu": (16, 24), "swiglu_packed": (16, 24),
        "cross_entropy": {"N": 8, "V": 40}, "linear_cross_entropy": {"N": 8, "H": 16, "V": 40},
        "attention_varlen": {"T": 48, "B": 3, "Lmin": 4, "Hq": 4, "Hk": 2, "D": 16},
        "attention_windows": {"T": 48, "W": 16, "H": 2, "D": 8}}
FAST = harness.Timing(warmup=1, reps=2, max_time_s=None)
DTYPES = (torch.float32, torch.bfloat16)


def _cases(op, keep_compile=False):
    cases = OP_MODULES[op].cases(op, quick=True, dtypes=DTYPES, shape=TINY[op])
    if not keep_compile:  # torch.compile takes seconds per graph; one test keeps it
        for c in cases:
            c.providers = [p for p in c.providers if p.name != "torch_compile"]
    return cases


def _run(op, keep_compile=False, messages=None):
    say = messages.append if messages is not None else None
    return [r for c in _cases(op, keep_compile) for r in harness.run_case(c, timing=FAST, progress=say)]


def _check_well_formed(records):
    for r in records:
        assert set(harness.RECORD_FIELDS) <= set(r), f"missing fields in {r}"
        assert r["status"] in ("ok", "skipped", "error", "model")
        assert r["status"] != "error", r["reason"]
        assert r["bytes"] > 0 and r["copy_gbps"] > 0 and r["bytes_model"]
        assert r["mode"] in harness.MODES and r["dtype"] in harness.DTYPES
        assert r["bound"] in ("memory", "compute")
        if r["status"] in ("ok", "model"):
            assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
            if r["bound"] == "compute":  # held to the GEMM rate; bytes are recorded, not the roofline
                assert r["flops"] > 0 and r["flops_model"] and r["gemm_gflops"] > 0
                assert math.isclose(r["gflops"], r["flops"] / (r["p50_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
                assert math.isclose(r["frac_gemm"], r["gflops"] / r["gemm_gflops"], rel_tol=1e-9)
                continue
            assert math.isclose(r["gbps"], r["bytes"] / (r["p50_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
            assert math.isclose(r["frac_copy_bw"], r["gbps"] / r["copy_gbps"], rel_tol=1e-9)
        else:
            assert r["reason"] and r["p50_ms"] is None
    modes_with_roofline = {(r["dtype"], r["mode"]) for r in records if r["provider"] == harness.ROOFLINE}
    assert modes_with_roofline == {(d, m) for d in ("fp32", "bf16") for m in harness.MODES}


@pytest.mark.parametrize("op", ALL_OPS)
def test_records_are_well_formed_and_missing_ops_reported(op):
    messages = []
    records = _run(op, messages=messages)
    _check_well_formed(records)
    mine = [r for r in records if r["provider"] == harness.MMFUSE]
    assert len(mine) == 4  # 2 dtypes x 2 modes
    mm_op = "attention" if op in bench_attention.OPS else op  # one mmfuse op, two benchmark layouts
    if getattr(mmfuse.ops, mm_op, None) is None:
        assert all(r["status"] == "skipped" and r["reason"] == f"mmfuse.ops.{mm_op} not available" for r in mine)
        assert any(f"skipped: mmfuse.ops.{mm_op} not available" in m for m in messages)
    else:
        assert all(r["status"] == "ok" and r["mmfuse_speedup"] == 1.0 for r in mine)
        baselines = {p.name for c in _cases(op) for p in c.providers} - {harness.MMFUSE}
        assert all(set(r["speedup_vs"]) == baselines for r in mine)


def test_removed_op_is_skipped_not_silently_dropped(monkeypatch):
    monkeypatch.delattr(mmfuse.ops, "rms_norm")
    records = _run("rms_norm")
    mine = [r for r in records if r["provider"] == harness.MMFUSE]
    assert mine and all(r["status"] == "skipped" for r in mine)
    assert all(r["mmfuse_speedup"] is None for r in records)
    rows = targets.check(records)
    assert [(r["target"], r["status"]) for r in rows] == [("all targets", "n/a")]
    assert "skipped: mmfuse.ops.rms_norm not available" in tables.format_text(records)


# The reference implementations stand in for ops not merged yet, so their call adapters run too.
_REFERENCE_STAND_INS = {"rotary": reference.rotary, "apply_mrope": reference.apply_mrope,
                        "swiglu": reference.swiglu, "swiglu_packed": reference.swiglu_packed}


@pytest.mark.parametrize("op", sorted(_REFERENCE_STAND_INS))
def test_mmfuse_call_adapters_run_every_op(op, monkeypatch):
    if getattr(mmfuse.ops, op, None) is None:
        monkeypatch.setattr(mmfuse.ops, op, _REFERENCE_STAND_INS[op], raising=False)
    records = _run(op)
    _check_well_formed(records)
    mine = [r for r in records if r["provider"] == harness.MMFUSE]
    assert mine and all(r["status"] == "ok" for r in mine)


def test_providers_compute_the_same_op():
    """Every provider of a case returns what hf_eager returns (fp32; torch_compile compiles that
    very function, and is left out for speed). Attention has its own test (no hf_eager, and the
    padded baseline's layout differs)."""
    for op in ALL_OPS:
        if op in bench_attention.OPS:
            continue
        for case in _cases(op):
            if case.dtype != torch.float32:
                continue
            inputs = case.make_inputs()
            outs = {}
            for p in case.providers:
                if p.fn is None:
                    continue
                with torch.no_grad():
                    out = p.fn(inputs)
                outs[p.name] = out if isinstance(out, tuple) else (out,)
            ref = outs["hf_eager"]
            for name, out in outs.items():
                for a, b in zip(out, ref):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{op}: {name} vs hf_eager")


def test_hf_baselines_match_the_reference_contract():
    torch.manual_seed(0)
    x, w = torch.randn(8, 32), torch.randn(32)
    torch.testing.assert_close(bench_rms_norm.hf_rms_norm(x, w), reference.rms_norm(x, w, bench_rms_norm.EPS))
    g, u = torch.randn(8, 24), torch.randn(8, 24)
    torch.testing.assert_close(bench_swiglu.hf_swiglu(g, u), reference.swiglu(g, u))
    torch.testing.assert_close(bench_swiglu.hf_swiglu_packed(torch.cat((g, u), -1)), reference.swiglu(g, u))

    T, D = 64, 16
    q, k = torch.randn(T, 2, D), torch.randn(T, 1, D)
    inv = bench_rotary.inv_freq(D)
    pos = bench_rotary.multimodal_position_ids(T)
    section = bench_rotary.mrope_section(D)
    freqs = pos[..., None].float() * inv
    full = torch.cat((freqs, freqs), -1)
    hq, hk = bench_rotary.hf_apply_multimodal_rotary_pos_emb(q, k, full.cos(), full.sin(), section)
    rq, rk = reference.apply_mrope(q, k, pos, inv, section)
    torch.testing.assert_close(hq, rq)
    torch.testing.assert_close(hk, rk)
    f1 = torch.arange(T, dtype=torch.float32)[:, None] * inv
    f1full = torch.cat((f1, f1), -1)
    hq, _ = bench_rotary.hf_apply_rotary_pos_emb(q, k, f1full.cos(), f1full.sin())
    torch.testing.assert_close(hq, reference.rotary(q, f1.cos(), f1.sin()))


def test_multimodal_position_ids_follow_get_rope_index():
    pos = bench_rotary.multimodal_position_ids(4096)
    assert pos.shape == (3, 4096) and pos.dtype == torch.int64
    spans = bench_rotary.multimodal_layout(4096)
    text0, image = spans[0][1], spans[1]
    assert torch.equal(pos[:, :text0], torch.arange(text0).expand(3, -1))          # text: t = h = w
    img = pos[:, text0: text0 + image[2] * image[3]]
    assert (img[0] == text0).all()                                                 # image: one t
    assert img[1].max() - img[1].min() == image[2] - 1 and img[2].max() - img[2].min() == image[3] - 1
    assert pos[0, text0 + image[2] * image[3]] == img.max() + 1                    # text restarts after max
    assert bench_rotary.mrope_section(128) == [16, 24, 24]


def test_time_ms_resets_gradients_between_reps():
    x = torch.randn(8, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (x * 2).sum().backward()
    t = common.time_ms(step, warmup=2, reps=3, grad_to_none=[x])
    assert all(seen) and len(seen) == 5 and t["reps"] == 3
    assert x.grad is None
    assert 0 < t["p20_ms"] <= t["p50_ms"] <= t["p80_ms"]


def test_quantile_matches_linear_interpolation():
    assert common.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert common.quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def test_run_all_plot_report_chain(tmp_path):
    from bench import run_all

    out = tmp_path / "results.json"
    assert run_all.main(["--ops", "rms_norm", "--dtypes", "fp32,bf16", "--modes", "fwd+bwd", "--quick",
                         "--warmup", "0", "--reps", "1", "--no-tables", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == run_all.SCHEMA and data["command"]
    env = data["environments"][0]
    for key in ("cpu_model", "threads", "torch", "mmfuse", "mmfuse_active_isa", "git_commit", "git_dirty",
                "date_utc", "allocator", "sgemm_gflops", "copy_gbps", "load_average_end"):
        assert key in env
    _check_roofline_and_speedups(data["records"])
    assert {r["target"] for r in data["targets"]} >= {"fp32 fwd+bwd >= 2x torch.compile"}

    pngs = plot.plot_results(data, out_dir=tmp_path / "img")
    assert [p.name for p in pngs] == ["bench_rms_norm.png"] and pngs[0].stat().st_size > 0
    doc = tmp_path / "performance.md"
    report.update_doc(doc, report.render(data, tmp_path))
    text = doc.read_text()
    assert "## Method" in text and "5·N·D·s" in text and data["command"] in text
    assert "No results recorded yet." not in text and "img/bench_rms_norm.png" in text
    report.update_doc(doc, "again\n")  # only the marked block is replaced
    assert doc.read_text().count(report.BEGIN) == 1 and "again" in doc.read_text() and "## Method" in doc.read_text()


def _check_roofline_and_speedups(records):
    roof = [r for r in records if r["provider"] == harness.ROOFLINE]
    assert roof and all(r["frac_copy_bw"] == 1.0 for r in roof)
    for r in records:
        if r["provider"] == harness.MMFUSE and r["status"] == "ok":
            assert set(r["speedup_vs"]) == {"hf_eager", "torch_fused", "torch_compile"}


def test_failing_provider_is_recorded_and_the_others_still_run():
    case = _cases("rms_norm")[0]

    def broken(inputs):
        raise RuntimeError("no kernel for this shape")
    case.providers.insert(1, harness.Provider("torch_fused", broken))
    case.providers = [p for p in case.providers if p.name != "torch_fused" or p.fn is broken]
    messages = []
    records = harness.run_case(case, timing=FAST, progress=messages.append)
    failed = [r for r in records if r["provider"] == "torch_fused"]
    assert [r["status"] for r in failed] == ["error", "error"]
    assert failed[0]["reason"] == "RuntimeError: no kernel for this shape"
    assert any("error: RuntimeError" in m for m in messages)
    assert all(r["status"] in ("ok", "model") for r in records if r["provider"] in ("hf_eager", harness.ROOFLINE))
    assert "error: RuntimeError" in tables.format_text(records)


# ---- attention, linear_cross_entropy: compute-bound cases and peak memory ----------------------

@pytest.mark.parametrize("op", bench_attention.OPS)
def test_attention_baselines_compute_the_same_attention(op):
    """Each SDPA baseline (padded + mask, per-sequence loop, HF window loop, batched windows) gives
    mmfuse's output and input gradients, in the packed layout."""
    case = _cases(op)[0]
    inputs = case.make_inputs()
    lengths = torch.diff(inputs["cu"]).tolist()
    dout = torch.randn_like(inputs["q"])
    expected = None
    for p in case.providers:
        for name in case.grad_inputs:
            inputs[name].grad = None
        out = p.fn(inputs)
        if p.name == "sdpa_padded":
            out = bench_attention.unpad(out, lengths)
        out.backward(dout)
        got = [out.detach()]
        for name in ("q", "k", "v"):
            g = inputs[name].grad if p.name != "sdpa_padded" else \
                bench_attention.unpad(inputs[f"{name}_pad"].grad, lengths)
            got.append(g)
        if expected is None:
            expected = got
            continue
        for a, b, what in zip(got, expected, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{op}: {p.name} {what} vs mmfuse")


def test_packed_lengths_are_fixed_spread_and_sum_to_the_total():
    lengths = bench_attention.packed_lengths(8192, 8, 200)
    assert lengths == bench_attention.packed_lengths(8192, 8, 200)  # seeded: the same every run
    assert sum(lengths) == 8192 and min(lengths) == 200 and 1800 <= max(lengths) <= 2000
    assert len(set(lengths)) == 8 and lengths != sorted(lengths)
    full = bench_attention.cases("attention_varlen", quick=False, dtypes=[torch.float32])[0]
    assert full.dims["pairs"] == sum(n * (n + 1) // 2 for n in lengths)
    assert full.flops["fwd"] == 4 * full.dims["pairs"] * 16 * 128 and full.flops["fwd+bwd"] == 3.5 * full.flops["fwd"]
    windows = bench_attention.cases("attention_windows", quick=False, dtypes=[torch.float32])[0]
    assert windows.dims["windows"] == 64 and windows.flops["fwd"] == 4 * 4096 * 64 * 16 * 80


def _compute_record(op, mode, provider, ms):
    return {"op": op, "dtype": "fp32", "mode": mode, "provider": provider, "status": "ok", "reason": None,
            "threads": 2, "allocator": "default", "p50_ms": ms, "bound": "compute"}


def test_compute_targets_name_their_baseline_and_direction():
    records = [_compute_record("attention_windows", m, p, ms) for m in harness.MODES
               for p, ms in ((harness.MMFUSE, 1.0), ("hf_window_loop", 6.0), ("sdpa_batched", 0.5))]
    records += [_compute_record("linear_cross_entropy", "fwd+bwd", p, ms)
                for p, ms in ((harness.MMFUSE, 10.5), ("hf_eager", 10.0))]
    memory = [{"op": "linear_cross_entropy", "dtype": "fp32", "provider": p, "status": "ok", "threads": 2,
               "extra_bytes": b} for p, b in ((harness.MMFUSE, 100), ("hf_eager", 500))]
    rows = {(r["op"], r["target"]): r for r in targets.check(records, memory)}
    win = rows[("attention_windows", "fp32 fwd+bwd >= 5x faster than hf_window_loop")]
    assert win["status"] == "met" and win["value"] == pytest.approx(6.0)
    lce = rows[("linear_cross_entropy", "fp32 fwd+bwd time <= 1.1x hf_eager's")]
    assert lce["status"] == "met" and lce["value"] == pytest.approx(1.05) and lce["cmp"] == "<="
    mem = rows[("linear_cross_entropy", "fp32 fwd+bwd peak extra memory <= 0.25x hf_eager's")]
    assert mem["value"] == pytest.approx(0.2) and mem["status"] == "met"
    # Memory-bound targets (torch.compile, copy bandwidth) are not applied to compute-bound ops.
    assert not any("torch.compile" in t or "copy bandwidth" in t for _, t in rows)
    no_memory = {(r["op"], r["target"]): r for r in targets.check(records)}
    assert no_memory[("linear_cross_entropy", "fp32 fwd+bwd peak extra memory <= 0.25x hf_eager's")]["status"] == "n/a"
    assert "need <= 1.1x" in tables.targets_text(targets.check(records, memory))


def test_peak_memory_is_measured_in_a_subprocess_with_its_method():
    """One provider (each costs a Python start-up); the ratios between providers are covered by
    the report test."""
    memory = harness.peak_memory_records("bench.ops.bench_cross_entropy", "linear_cross_entropy", [torch.float32],
                                         ("mmfuse",), quick=True, shape=TINY["linear_cross_entropy"])
    [r] = memory
    assert set(harness.MEMORY_FIELDS) <= set(r) and r["status"] == "ok", r["reason"]
    assert r["extra_bytes"] >= 0 and r["grad_bytes"] == (8 * 16 + 40 * 16) * 4 and r["input_bytes"] > 0
    assert r["method"] and r["shape"] == "8x16x40" and r["seconds"] >= 0 and r["extra_vs"] == {}
    text = tables.memory_text(memory)
    assert "peak memory of one fwd+bwd" in text and "fresh process" in text and r["method"] in text


def test_memory_child_failure_is_recorded_not_raised():
    rec = harness.peak_memory("bench.ops.bench_cross_entropy", "linear_cross_entropy", "fp32", "no_such_provider",
                              quick=True, shape=TINY["linear_cross_entropy"])
    assert rec["status"] == "error" and "has no provider 'no_such_provider'" in rec["reason"]


def test_report_renders_compute_tables_and_memory(tmp_path):
    records = [r for op in bench_attention.OPS for r in _run(op)]
    memory = [{**dict.fromkeys(harness.MEMORY_FIELDS), "op": "linear_cross_entropy", "shape": "8x16x40",
               "dtype": "fp32", "mode": "fwd+bwd", "provider": p, "status": "ok", "threads": 2, "extra_bytes": b,
               "grad_bytes": 64, "seconds": 0.1, "method": "VmHWM after reset"}
              for p, b in (("mmfuse", 2**20), ("hf_eager", 4 * 2**20))]
    harness.add_memory_ratios(memory)
    results = {"command": "cmd", "settings": {}, "environments": [{}], "records": records, "memory": memory}
    text = report.render(results, tmp_path, images=False)
    assert "| dtype | mode | provider | ms p50 | p20-p80 | GFLOP/s | % GEMM | mmfuse x faster |" in text
    assert "sdpa_padded" in text and "hf_window_loop" in text and "4·pairs·Hq·D" in text
    assert "peak memory of one fwd+bwd" in text and "0.250 of hf_eager" in text
    assert "fp32 fwd+bwd >= 3x faster than sdpa_padded" in text
