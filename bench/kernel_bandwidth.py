"""Kernel-only bandwidth: each mmfuse C++ kernel writing into preallocated outputs, against a
copy of the same size measured in the same run.

The op-level benchmarks (run_all.py) time what a user calls: every output there is a fresh
tensor, and on Linux a fresh multi-MiB CPU tensor is page-faulted and zeroed by the kernel on first
write, a cost that grows with the bytes and is paid equally by every provider. This script
separates the kernels' own efficiency from that cost. Bytes follow the same model as the op
benchmarks (each input read once, each output written once); the copy counts read + write.

    PYTHONPATH=python:. python bench/kernel_bandwidth.py [--out bench/results/kernels-<date>.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    _root = Path(__file__).resolve().parents[1]
    sys.path[0] = str(_root)
    try:
        import mmfuse  # noqa: F401
    except ImportError:
        sys.path.insert(1, str(_root / "python"))

import torch  # noqa: E402

import mmfuse._C as C  # noqa: E402
from bench import common  # noqa: E402
from mmfuse.ops._checks import DTYPE_CODES, ptr  # noqa: E402


def kernels(dtype: torch.dtype, nt: int):
    """(name, shape, bytes, fn) for each kernel direction on the issue's shapes."""
    code = DTYPE_CODES[dtype]
    s = torch.finfo(dtype).bits // 8
    out = []

    N, D = 8192, 2048
    x, w, dy = torch.randn(N, D, dtype=dtype), torch.randn(D, dtype=dtype), torch.randn(N, D, dtype=dtype)
    r = torch.randn(N, D, dtype=dtype)
    y, sm, dx, dw = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), torch.empty_like(w)
    out += [
        ("rms_norm fwd", f"{N}x{D}", 2 * N * D * s,
         lambda: C.rms_norm_fwd(ptr(x), 0, ptr(w), ptr(y), 0, 0, N, D, code, code, code, 1e-6, nt)),
        ("rms_norm bwd", f"{N}x{D}", 3 * N * D * s,
         lambda: C.rms_norm_bwd(ptr(dy), ptr(x), ptr(w), 0, 0, ptr(dx), ptr(dw), N, D, code, code, code, 1e-6, nt)),
        ("add_rms_norm fwd", f"{N}x{D}", 4 * N * D * s,
         lambda: C.rms_norm_fwd(ptr(x), ptr(r), ptr(w), ptr(y), ptr(sm), 0, N, D, code, code, code, 1e-6, nt)),
        ("add_rms_norm bwd", f"{N}x{D}", 4 * N * D * s,
         lambda: C.rms_norm_bwd(ptr(dy), ptr(x), ptr(w), 0, ptr(r), ptr(dx), ptr(dw), N, D, code, code, code,
                                1e-6, nt)),
    ]

    T, H, Dh = 4096, 16, 128
    q, k = torch.randn(T, H, Dh, dtype=dtype), torch.randn(T, H, Dh, dtype=dtype)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    cos, sin = torch.rand(T, Dh // 2), torch.rand(T, Dh // 2)
    pos = torch.randint(0, 30000, (3, T))
    inv = 1.0 / (1e6 ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))
    qk = 2 * T * H * Dh * s

    def rotary_qk():
        C.rotary(ptr(q), ptr(qo), ptr(cos), ptr(sin), T, H, Dh, Dh // 2, T, code, 0, False, False, nt)
        C.rotary(ptr(k), ptr(ko), ptr(cos), ptr(sin), T, H, Dh, Dh // 2, T, code, 0, False, False, nt)

    out += [
        ("rotary q+k", f"{T}x{H}x{Dh} x2", 2 * qk, rotary_qk),
        ("apply_mrope q+k", f"{T}x{H}x{Dh} x2", 2 * qk,
         lambda: C.mrope(ptr(q), ptr(qo), H, ptr(k), ptr(ko), H, ptr(pos), ptr(inv), T, Dh, 16, 24, 24, code,
                         False, nt)),
    ]

    R, F = 8192, 5632
    g, u, do = (torch.randn(R, F, dtype=dtype) for _ in range(3))
    o, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
    out += [
        ("swiglu fwd", f"{R}x{F}", 3 * R * F * s,
         lambda: C.swiglu_fwd(ptr(g), F, ptr(u), F, ptr(o), F, R, F, code, nt)),
        ("swiglu bwd", f"{R}x{F}", 5 * R * F * s,
         lambda: C.swiglu_bwd(ptr(do), F, ptr(g), F, ptr(u), F, ptr(dg), F, ptr(du), F, R, F, code, nt)),
    ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/kernels-<date>-<commit>.json)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per kernel (default: 20)")
    args = p.parse_args(argv)
    nt = torch.get_num_threads()
    env = common.environment()
    records = []
    print(f"kernel-only bandwidth, {nt} threads, ISA {C.active_isa()}, commit {env.get('git_commit')}")
    print(f"{'kernel':<18} {'dtype':<6} {'shape':<18} {'ms p50':>8} {'GB/s':>7} {'copy GB/s':>10} {'% copy':>7}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, nbytes, fn in kernels(dtype, nt):
            t = common.time_ms(fn, warmup=3, reps=args.reps)
            # Copy of the kernel's largest tensor size, same run: the bandwidth a kernel can reach.
            copy = common.copy_bandwidth_gbps(min(nbytes // 2, 256 << 20))
            gbps = nbytes / t["p50_ms"] / 1e6
            rec = {"kernel": name, "dtype": str(dtype).replace("torch.", ""), "shape": shape, "bytes": nbytes,
                   "threads": nt, **t, "gbps": gbps, "copy_gbps": copy, "fraction_of_copy": gbps / copy}
            records.append(rec)
            print(f"{name:<18} {rec['dtype'][:6]:<6} {shape:<18} {t['p50_ms']:8.2f} {gbps:7.1f} {copy:10.1f} "
                  f"{100 * gbps / copy:6.0f}%")
    out = args.out or common.REPO_ROOT / "bench" / "results" / f"kernels-{env['date_utc'][:10]}-{env.get('git_commit')}.json"
    common.write_json(out, {"schema": "mmfuse-kernel-bandwidth/1", "environment": env,
                            "command": "python bench/kernel_bandwidth.py", "records": records})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
