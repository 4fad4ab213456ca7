"""bench/gpu_model_step.py end to end on the CPU (--quick: tiny model, 128 tokens with one 112x112
image): every provider runs in its own process on the same weights file, mmfuse and transformers
compute the same step-0 loss, and the result file has what docs/performance.md reports. No timing
assertions: benchmarks are not tests."""

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

from bench import gpu_model_step as gms  # noqa: E402


def test_quick_cpu_run_gives_equal_step0_losses_and_complete_records(tmp_path):
    # fp32, so the loss check is tight (the GPU run is bf16, checked at LOSS_RTOL["bf16"]).
    assert gms.main(["--device", "cpu", "--quick", "--dtype", "fp32", "--providers", "mmfuse,hf,hf_liger",
                     "--warmup", "0", "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("gpu-model-cpu-*.json")
    data = json.loads(out.read_text())
    assert data["schema"] == gms.SCHEMA and data["status"] == "complete"
    assert data["environment"]["transformers"] and data["setup"]["flops_per_step"] > 0
    recs = {r["provider"]: r for r in data["records"]}
    assert set(recs) == {"mmfuse", "hf", "hf_liger"}
    mm, hf = recs["mmfuse"], recs["hf"]
    assert mm["status"] == hf["status"] == "ok"
    assert math.isclose(mm["loss_step0"], hf["loss_step0"], rel_tol=gms.LOSS_RTOL["fp32"])
    assert 5 < mm["loss_step0"] < 7          # ~ln(512): random init over the tiny vocabulary
    assert data["loss_check"]["status"] == "ok" and data["loss_check"]["rel_diff"]["hf"] < 1e-4
    # the same parameters (tied LM head counted once) loaded by both from the one file
    assert mm["weights_bytes"] == hf["weights_bytes"] == 4 * data["setup"]["params"]["total"]
    for r in (mm, hf):
        assert r["tokens"] == 128 and r["reps"] == 1 and len(r["losses"]) == 1 and r["peak_bytes"] > 0
        assert math.isclose(r["tokens_per_s"], r["tokens"] / (r["p50_ms"] * 1e-3))
        assert "mfu" not in r                # no known peak for a CPU
    liger = recs["hf_liger"]
    assert liger["status"] in ("ok", "skipped", "failed") and (liger["status"] == "ok" or liger["reason"])
    rows = {t["target"]: t for t in data["targets"]}
    assert rows["MFU >= 40%"]["status"] == "n/a"
    speed = rows["tokens/s >= 2x hf's"]
    assert speed["status"] in ("met", "NOT met") and math.isclose(speed["value"],
                                                                  mm["tokens_per_s"] / hf["tokens_per_s"])


def _ok(provider, tps, peak, mfu=None):
    r = {"provider": provider, "status": "ok", "tokens_per_s": tps, "peak_bytes": peak}
    if mfu is not None:
        r.update(mfu=mfu, tflops=mfu * 989, peak_tflops=989.0)
    return r


def test_targets_and_loss_check_name_what_is_missing_and_never_pass_without_numbers():
    records = [_ok("mmfuse", 15000, 45 * 2**30, mfu=0.41), _ok("hf", 7300, 59 * 2**30),
               {"provider": "hf_liger", "status": "timeout", "reason": "time limit of 90 s reached"}]
    rows = {t["target"]: t for t in gms.targets(records)}
    assert rows["tokens/s >= 2x hf's"]["status"] == "met"
    assert rows["tokens/s >= 2x hf's"]["value"] == pytest.approx(15000 / 7300)
    assert rows["tokens/s >= 1.5x hf_liger's"]["status"] == "n/a"
    assert "timeout" in rows["tokens/s >= 1.5x hf_liger's"]["reason"]
    assert rows["MFU >= 40%"]["status"] == "met"
    assert rows["peak memory <= 0.7x hf's"]["status"] == "NOT met"       # 45 / 59 = 0.76
    records[0]["loss_step0"], records[1]["loss_step0"] = 11.93, 11.93 * 1.02
    check = gms.check_losses(records, gms.LOSS_RTOL["bf16"])
    assert check["status"] == "MISMATCH" and "hf" in check["reason"]
    assert gms.check_losses(records[1:], 1e-2)["status"] == "n/a"
