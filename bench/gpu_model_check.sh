#!/usr/bin/env bash
# One command for a GPU machine with torch, triton and transformers preinstalled and no network: the
# Qwen2.5-VL-3B training-step benchmark (bench/gpu_model_step.py, issue 5) of mmfuse against
# transformers (SDPA) and transformers + Liger-Kernel, plus mmfuse with full recompute, on the same
# random-init bf16 weights and one 4096-token sample with an 896x896 image, fused AdamW.
#
#   bash bench/gpu_model_check.sh      # results: $OUT/gpu-model-<card>-<date>.json, else bench/results/
#   bash bench/gpu_model_check.sh --providers mmfuse,hf      # arguments go to gpu_model_step.py
#   bash bench/gpu_model_check.sh --device cpu --quick       # the script itself, end to end on a CPU
#
# Limits: ~5 s of versions and the Liger wheel install, then the benchmark under 235 s (its own
# --limit-s 215 shares that among the providers: each runs in a subprocess with at most 120 / 75 / 90
# / 60 s for mmfuse / hf / hf_liger / mmfuse_recompute, and none starts with < 30 s left), so the
# whole check stays under 4 minutes. It runs mmfuse from the source tree (PYTHONPATH=python): on CUDA
# tensors every op is Triton or PyTorch, so no C++ build is needed (bench/gpu_check.sh builds it).
#
# Expected on an H200 (derived, not measured): one step is ~101 TFLOP of model FLOPs (text
# 6·3.09e9·4096 = 76, vision 6·0.67e9·4096 = 16.5, attention 8.5). Anchors: transformers ~0.56 s per
# step (7.3k tokens/s, 18% MFU of 989 TFLOP/s, 59 GB), + Liger ~0.59 s (6.9k tokens/s, 44 GB); mmfuse
# at the 40% MFU target ~0.26 s. Time per provider: ~10 s of imports and loading 7.5 GB of weights,
# a first step of ~5 s (transformers) or ~30-60 s (mmfuse: ~30 Triton kernels to compile, cached in
# ~/.triton for reruns), then 2 warm-up + 8 timed steps (~3-6 s). Writing the weights once: ~15 s.
# Expected total ~170 s; with a cold Triton cache and slow disk up to the 215 s limit.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export MMFUSE_COMMIT=${MMFUSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# Triton's interpreter is for CPU-only test runs; on a GPU the kernels must be compiled.
unset TRITON_INTERPRET MMFUSE_BACKEND

# Liger-Kernel from the carried wheel (pure Python), offline and without dependencies; a failed
# install leaves hf_liger recorded as skipped, with the reason.
LIGER_DIR=$(mktemp -d)
trap 'rm -rf "$LIGER_DIR"' EXIT
"$PY" -m pip install --no-index --no-deps --disable-pip-version-check -q --target "$LIGER_DIR" \
  bench/wheels/liger_kernel-*-py3-none-any.whl || echo "!! liger-kernel wheel did not install: hf_liger skipped"
export PYTHONPATH="$LIGER_DIR:python${PYTHONPATH:+:$PYTHONPATH}"

printf '== versions (commit %s)\n' "$MMFUSE_COMMIT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PY" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"cudnn {torch.backends.cudnn.version()}")
for name in ("triton", "transformers", "liger_kernel"):
    try:
        from importlib.metadata import version
        print(f"{name} {version(name)}")
    except Exception:
        print(f"{name} NOT installed")
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF

status=0
printf '\n== Qwen2.5-VL-3B training step (limit 235s, %ss elapsed)\n' "$SECONDS"
# SIGINT first (the benchmark saves what it measured), KILL 10 s later.
timeout --signal=INT --kill-after=10 235 \
  "$PY" bench/gpu_model_step.py --out-dir "$RESULTS" --limit-s 215 "$@" || status=$?
if [ "$status" -eq 124 ]; then echo "!! model step: time limit of 235s reached"; elif [ "$status" -ne 0 ]; then
  echo "!! model step: exit $status"; fi

printf '\n== done in %ss, status %s; results in %s\n' "$SECONDS" "$status" "$RESULTS"
exit "$status"
