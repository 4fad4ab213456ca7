"""The Liger-Kernel baseline of the GPU benchmarks: the carried wheel is the one its README pins, it
installs offline as gpu_check.sh installs it, every name the benchmarks call exists in it, and the
layout adapters of bench/liger.py compute what transformers computes (the RoPE kernels, run on the
CPU by Triton's interpreter). Liger's RMSNorm and SwiGLU kernels do not run in the interpreter (they
call `.to` on float scalar arguments), so for them only the names are checked here; the GPU run
records their difference to the eager code (max_abs_diff_liger_vs_eager)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_bandwidth, liger  # noqa: E402


def test_carried_wheel_is_the_one_the_readme_pins():
    whl = liger.wheel()
    line = next(ln for ln in (ROOT / "bench" / "wheels" / "README.md").read_text().splitlines() if whl.name in ln)
    assert hashlib.sha256(whl.read_bytes()).hexdigest() in line
    assert f"| {whl.stat().st_size} |" in line
    assert whl.stat().st_size < 2**20          # pure Python, small enough to carry in git


# Runs in a fresh interpreter with the wheel on PYTHONPATH (as gpu_check.sh runs the benchmarks), so
# this test session's imports and bench.liger's cached answer are not touched.
CHILD = r"""
import json, torch
from bench import liger
from bench.ops import bench_rotary as R
out = {"unavailable": liger.unavailable_reason(), "version": liger.version()}
T, Hq, Hk, D = 24, 4, 2, 16
section = R.mrope_section(D)
freqs = torch.arange(T, dtype=torch.float32)[:, None] * R.inv_freq(D)
mfreqs = R.multimodal_position_ids(T)[..., None].float() * R.inv_freq(D)
cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
mcos, msin = torch.cat((mfreqs, mfreqs), -1).cos(), torch.cat((mfreqs, mfreqs), -1).sin()
q = torch.randn(T, Hq, D, requires_grad=True)
k = torch.randn(T, Hk, D, requires_grad=True)
dq, dk = torch.randn(T, Hq, D), torch.randn(T, Hk, D)
cases = {"rotary": (lambda a, b: liger.rotary(a, b, cos, sin), lambda: R.hf_apply_rotary_pos_emb(q, k, cos, sin)),
         "apply_mrope": (lambda a, b: liger.apply_mrope(a, b, mcos, msin, section),
                         lambda: R.hf_apply_multimodal_rotary_pos_emb(q, k, mcos, msin, section))}
for name, (mine, hf) in cases.items():
    # Liger rotates q and k (and the incoming gradients) in place: give it copies.
    got = mine(q.clone(), k.clone())
    want = hf()
    g_got = torch.autograd.grad(got, (q, k), (dq.clone(), dk.clone()))
    g_want = torch.autograd.grad(want, (q, k), (dq, dk))
    out[name] = {"shape_ok": all(a.shape == b.shape for a, b in zip(got, want)),
                 "out": max((a - b).abs().max().item() for a, b in zip(got, want)),
                 "grad": max((a - b).abs().max().item() for a, b in zip(g_got, g_want))}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def liger_path(tmp_path_factory):
    return liger.install(tmp_path_factory.mktemp("liger"))


def test_wheel_installs_offline_and_its_rope_adapters_match_transformers(liger_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(liger_path), str(ROOT), str(ROOT / "python")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["unavailable"] is None               # every name in liger.NAMES imports
    assert got["version"] in liger.wheel().name
    for op in ("rotary", "apply_mrope"):
        assert got[op]["shape_ok"]
        assert got[op]["out"] < 1e-5 and got[op]["grad"] < 1e-5, (op, got[op])


def _rec(op, provider, mode, status="ok", p50=None, reason=None):
    return {"op": op, "shape": "8x8", "dtype": "bf16", "mode": mode, "provider": provider, "status": status,
            "p50_ms": p50, "reason": reason}


def test_liger_targets_are_ratios_over_mmfuse_and_never_met_without_numbers():
    records = [_rec("rms_norm", "mmfuse", "fwd+bwd", p50=1.0), _rec("rms_norm", "liger", "fwd+bwd", p50=1.5),
               _rec("swiglu", "mmfuse", "fwd+bwd", p50=1.0), _rec("swiglu", "liger", "fwd+bwd", p50=1.1),
               _rec("rotary", "mmfuse", "fwd+bwd", p50=1.0),
               _rec("rotary", "liger", "fwd+bwd", status="skipped", reason="liger_kernel not importable"),
               _rec("swiglu_packed", "mmfuse", "fwd+bwd", p50=1.0),          # Liger has no such op: no row
               {"op": "apply_mrope", "shape": "8x8", "dtype": "bf16", "status": "skipped",
                "reason": "time budget of 30 s spent"}]
    rows = {r["op"]: r for r in gpu_bandwidth.targets(records)}
    assert set(rows) == {"rms_norm", "swiglu", "rotary", "apply_mrope"}
    assert rows["rms_norm"]["status"] == "met" and rows["rms_norm"]["value"] == pytest.approx(1.5)
    assert rows["swiglu"]["status"] == "NOT met" and rows["swiglu"]["value"] == pytest.approx(1.1)
    assert rows["rotary"]["status"] == "n/a" and "not importable" in rows["rotary"]["reason"]
    assert rows["apply_mrope"]["status"] == "n/a" and "time budget" in rows["apply_mrope"]["reason"]
    assert all(r["target"] == "fwd+bwd >= 1.2x faster than liger" for r in rows.values())


def test_liger_is_recorded_as_skipped_with_the_reason_where_it_does_not_import(monkeypatch):
    monkeypatch.setattr(liger, "unavailable_reason", lambda: "no liger here")
    skipped = gpu_bandwidth.liger_or_skipped(lambda i: None)
    assert isinstance(skipped, gpu_bandwidth.Skipped) and skipped.reason == "no liger here"
    cases = gpu_bandwidth.cases(torch.device("cpu"), torch.float32, quick=True)
    with_liger = {c[0] for c in cases if gpu_bandwidth.LIGER in c[5]}
    assert with_liger == set(gpu_bandwidth.TARGETS[0][1])
