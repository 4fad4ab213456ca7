#!/usr/bin/env bash
# One command for a GPU machine with torch, triton and the build tools preinstalled and no network:
# build and install mmfuse, run the op tests on CUDA tensors (the Triton backend), then measure the
# Triton ops' bandwidth against copy, F.rms_norm, eager, torch.compile and Liger-Kernel, the Triton attention's
# TFLOP/s against PyTorch SDPA (default, flash and cuDNN backends), and linear_cross_entropy's time
# and peak memory against F.linear + F.cross_entropy.
#
#   bash bench/gpu_check.sh      # results: $OUT/gpu-{,attention-,lce-}<card>-<date>.json, else bench/results/
#
# Each step runs under its own time limit (90 + 140 + 45 + 45 + 35 s = 355 s: the whole check stays
# under 6 minutes); a failed or timed-out step is reported and the next still runs. Exit status: that of
# the first failed step. PYTHON picks the interpreter (default: python). Liger-Kernel comes from the
# wheel carried in bench/wheels/ (pure Python), installed offline into a temporary directory that only
# the benchmarks see on PYTHONPATH. bench/gpu_model_check.sh runs the model-step benchmark (~4 min).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export MMFUSE_COMMIT=${MMFUSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# Triton's interpreter is for CPU-only test runs; on a GPU the kernels must be compiled.
unset TRITON_INTERPRET MMFUSE_BACKEND
status=0

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, remember the first failure
  local name=$1 limit=$2 rc=0
  shift 2
  printf '\n== %s (limit %ss, %ss elapsed)\n' "$name" "$limit" "$SECONDS"
  # SIGINT first: pytest then still prints its summary; KILL 10 s later if that does not end it.
  timeout --signal=INT --kill-after=10 "$limit" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ]; then echo "!! $name: time limit of ${limit}s reached"; else echo "!! $name: exit $rc"; fi
    if [ "$status" -eq 0 ]; then status=$rc; fi
  fi
}

# pytest_groups NAME LIMIT_S K1 FILES1 [K2 FILES2 ...]: one `pytest -k Ki FILESi` process per group, all
# at once, each under the time limit (SIGINT, then KILL 10 s later, as in `step`). Most of a Triton
# test run is kernel compilation, one kernel at a time per process, so groups use the host's cores;
# Triton's on-disk cache is safe to share between processes. Logs are printed in group order.
pytest_groups() {
  local name=$1 limit=$2 rc=0 r p i=0 dir pids=()
  shift 2
  dir=$(mktemp -d)
  printf '\n== %s (limit %ss, %ss elapsed, %s pytest processes)\n' "$name" "$limit" "$SECONDS" $(($# / 2))
  while [ "$#" -ge 2 ]; do
    # shellcheck disable=SC2086  # $2 is a list of test files (no spaces in their paths)
    timeout --signal=INT --kill-after=10 "$limit" \
      "$PY" -m pytest -q -p no:cacheprovider -k "$1" $2 >"$dir/$i.log" 2>&1 &
    pids+=("$!")
    i=$((i + 1))
    shift 2
  done
  i=0
  for p in "${pids[@]}"; do
    r=0
    wait "$p" || r=$?
    echo "-- group $i"
    cat "$dir/$i.log"
    if [ "$r" -eq 124 ]; then echo "!! $name, group $i: time limit of ${limit}s reached"
    elif [ "$r" -ne 0 ]; then echo "!! $name, group $i: exit $r"; fi
    if [ "$rc" -eq 0 ]; then rc=$r; fi
    i=$((i + 1))
  done
  rm -rf "$dir"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

# Liger-Kernel baseline: no network here, so from the carried wheel, without dependencies (torch and
# triton are the machine's). A failed install leaves the benchmarks recording Liger as skipped.
LIGER_DIR=$(mktemp -d)
trap 'rm -rf "$LIGER_DIR"' EXIT
"$PY" -m pip install --no-index --no-deps --disable-pip-version-check -q --target "$LIGER_DIR" \
  bench/wheels/liger_kernel-*-py3-none-any.whl || echo "!! liger-kernel wheel did not install: Liger skipped"
BENCH_PYTHONPATH="$LIGER_DIR${PYTHONPATH:+:$PYTHONPATH}"

printf '== versions (commit %s)\n' "$MMFUSE_COMMIT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PY" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"cudnn {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton NOT installed: CUDA tensors would run the reference")
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF
PYTHONPATH="$BENCH_PYTHONPATH" "$PY" -c \
  "from importlib.metadata import version; print('liger_kernel', version('liger_kernel'))" 2>/dev/null \
  || echo "liger_kernel NOT importable"

step "build (pip install --no-build-isolation --no-deps .)" 90 \
  "$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q .

# The tests import the installed mmfuse (no PYTHONPATH=python); `-k triton` selects the Triton
# cases, which run on CUDA tensors here, every shape of the CPU suite included. Most of the time
# goes to compiling kernel variants (a few hundred, ~0.3 s each, cached in ~/.triton for reruns),
# so the tests run as five pytest processes at once: the elementwise ops, the cross-entropies, and
# test_attention.py in three parts (its ~110 kernel variants, counted from the cases, take ~0.5-1 s
# each to compile).
attn=tests/ops/test_attention.py
parts="single_sequence or window or gqa or unequal"
pytest_groups "op tests on cuda (Triton backend)" 140 \
  triton "tests/ops/test_rms_norm.py tests/ops/test_swiglu.py tests/ops/test_rotary.py tests/ops/test_mrope.py
          tests/ops/test_backend.py" \
  triton "tests/ops/test_cross_entropy.py tests/ops/test_linear_cross_entropy.py" \
  "triton and single_sequence" "$attn" \
  "triton and (window or gqa or unequal)" "$attn" \
  "triton and not ($parts)" "$attn"

# Liger adds a provider to five of the seven cases: ~2 s to import it and ~10 kernels to compile
# (~15 s in all). The ops of its targets run first; cases past the budget are recorded as skipped
# (rerun just those: see the usage lines of bench/gpu_bandwidth.py, --providers liger --tag liger).
step "bandwidth benchmark (vs F.rms_norm, eager, torch.compile, Liger-Kernel)" 45 \
  env PYTHONPATH="$BENCH_PYTHONPATH" "$PY" bench/gpu_bandwidth.py --out-dir "$RESULTS" --budget-s 30

# B=2 x S=8192, H=16, D=128 bf16, causal and not, fwd and fwd+bwd: ~10 s of kernel compilation
# (8 variants), 16 timings of ~0.3 s; cases past the budget are recorded as skipped.
step "attention benchmark (TFLOP/s vs SDPA)" 45 \
  "$PY" bench/gpu_attention.py --out-dir "$RESULTS" --budget-s 28

# N 16384, H 2048, V 151936 bf16: one fwd+bwd is ~30 TFLOP (~50 ms per provider on an H100), so
# warm-up, peak memory and do_bench take a few seconds; most of the limit is import and kernel compiles.
step "linear_cross_entropy benchmark (vs F.linear + F.cross_entropy)" 35 \
  "$PY" bench/gpu_linear_cross_entropy.py --out-dir "$RESULTS"

printf '\n== done in %ss, status %s; results in %s\n' "$SECONDS" "$status" "$RESULTS"
exit "$status"
