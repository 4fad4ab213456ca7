"""The Qwen2.5-VL training-step benchmark on the tiny model: the result file is complete, every
provider computed the same loss, the memory probe reports its peaks, and report.py writes the step
block without touching the op tables. No timing assertions: benchmarks are not tests."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")

from bench import report  # noqa: E402
from bench.models import bench_qwen2_5_vl_step as step  # noqa: E402
from bench.models import step_tables  # noqa: E402
from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the tiny model's ops are too small to share, and on a loaded machine an OpenMP
    barrier waiting for a descheduled thread made this test several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_run_writes_every_provider_and_mode_and_renders(tmp_path):
    out = tmp_path / "step.json"
    assert step.main(["--quick", "--sizes", "tiny", "--threads", "1", "--warmup", "0", "--reps", "1",
                      "--no-memory", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == step_tables.SCHEMA and data["command"]
    env = data["environments"][0]
    for key in ("cpu_model", "threads", "torch", "transformers", "git_commit", "sgemm_gflops", "load_average"):
        assert key in env
    tiny = data["sizes"]["tiny"]
    assert tiny["params"]["total"] == sum(v for k, v in tiny["params"].items() if k in ("vision", "text_embedding",
                                                                                         "text_layers"))
    assert tiny["inputs"]["tokens"] == sum(tiny["inputs"]["sample_tokens"]) > tiny["inputs"]["label_tokens"] > 0
    assert tiny["flops_per_step"] > 0
    losses = tiny["losses"]
    assert set(losses) == set(step.PROVIDERS)
    assert all(math.isclose(v, losses["mmfuse"], rel_tol=step.LOSS_RTOL) for v in losses.values())
    assert {(r["provider"], r["mode"]) for r in tiny["records"]} == \
        {(p, m) for p in step.PROVIDERS for m in step_tables.MODES}
    for r in tiny["records"]:
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["reps"] == 1
        assert math.isclose(r["tokens_per_s"], r["tokens"] / (r["p50_ms"] * 1e-3))
    for mode, s in data["summary"]["tiny"].items():
        assert s["baseline"] in step_tables.HF_MODES and s["speedup"] > 0
    assert [(t["target"], t["status"]) for t in data["targets"] if "memory" in t["target"]] == \
        [(f"{m} peak memory <= 0.6x", "n/a") for m in step_tables.MODES]

    doc = tmp_path / "performance.md"
    doc.write_text(report.INTRO)
    assert report.main([str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert report.STEP_HEADING in text and "No results recorded yet." in text   # the op block is untouched
    assert data["command"] in text and "hf_per_sample" in text


def test_memory_probe_reports_rss_and_tensor_peaks(tmp_path):
    weights = tmp_path / "w"
    step.write_weights(Qwen2_5_VLConfig.preset("tiny"), 0, weights)
    m = step.measure_memory("mmfuse", "tiny", weights, seed=0, quick=True, steps=1)
    for mode in step_tables.MODES:
        assert m[f"peak_rss_growth_{mode}"] >= 0
        assert m[f"live_tensor_peak_{mode}"] > 0
    assert m["rss_method"] and m["adamw_state_bytes"] > 0 and math.isfinite(m["loss"])
