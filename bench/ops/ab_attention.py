"""A/B timing of attention kernels: several builds of `mmfuse._C` loaded into one process and timed
interleaved (rep i of every build back to back), next to PyTorch SDPA, so that a shared machine's
load drifts over all of them alike. Kernel calls only (the outputs are allocated per call through
`mmfuse.ops._alloc`, as the op does; no autograd bookkeeping). fwd+bwd = one fwd, then one bwd.

  PYTHONPATH=python:. python -m bench.ops.ab_attention --so /tmp/base/_C.so --so python/mmfuse \\
      --cases windows,dense,dense_causal,varlen --reps 21

A --so argument is a `_C*.so` file or a directory holding one. Cases (fp32 unless --dtype):
  windows       T=4096 in 64 windows of 64, H 16, D 80 (Qwen2.5-VL vision); SDPA on [64, 16, 64, 80]
  dense         S=2048, H 16, D 128;          dense_causal: the same, causal (one-sequence cases also
                time sdpa_bhsd: SDPA on contiguous [1, H, S, D] copies, bench_attention's layout)
  varlen        8 seqs packed in 8192 tokens (bench_attention's lengths), causal, GQA 16/2, D 128
  tiny_vision_full, tiny_vision_windows, tiny_text   the tiny Qwen2.5-VL's calls (head dim 16): two
                224 px images' full attention (2 x 256 patches, 2 heads), their 64-patch windows (8 of
                them), the text of two packed samples (144 + 112 tokens, causal, GQA 4/2); at tens of
                microseconds per call these time per-call overhead (buffers, thread team) as much as math
Prints p50 ms (p20-p80) per build and mode and each build's ratio to the first build and to SDPA.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.ops.bench_attention import cu_seqlens, packed_lengths
from mmfuse.ops import _alloc
from mmfuse.ops._checks import dtype_code


def load_build(path: str, index: int):
    p = Path(path)
    if p.is_dir():
        p = next(p.glob("_C*.so"))
    # The module's init symbol is PyInit__C, so the last name component must be `_C`.
    name = f"_ab_build{index}._C"
    loader = importlib.machinery.ExtensionFileLoader(name, str(p))
    spec = importlib.util.spec_from_file_location(name, str(p), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def make_case(name: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    if name == "windows":
        T, W, Hq, Hk, D, causal = 4096, 64, 16, 16, 80, False
        lengths = [W] * (T // W)
    elif name in ("dense", "dense_causal"):
        T, Hq, Hk, D, causal = 2048, 16, 16, 128, name == "dense_causal"
        lengths = [T]
    elif name == "varlen":
        T, Hq, Hk, D, causal = 8192, 16, 2, 128, True
        lengths = packed_lengths(T, 8, 200)
    elif name == "tiny_vision_full":
        lengths, Hq, Hk, D, causal = [256, 256], 2, 2, 16, False
    elif name == "tiny_vision_windows":
        lengths, Hq, Hk, D, causal = [64] * 8, 2, 2, 16, False
    elif name == "tiny_text":
        lengths, Hq, Hk, D, causal = [144, 112], 4, 2, 16, True
    else:
        raise ValueError(name)
    T = sum(lengths)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(T, Hk, D, generator=g).to(dtype)
    v = torch.randn(T, Hk, D, generator=g).to(dtype)
    dout = torch.randn(T, Hq, D, generator=g).to(dtype)
    cu = cu_seqlens(lengths)
    return dict(T=T, Hq=Hq, Hk=Hk, D=D, causal=causal, lengths=lengths, q=q, k=k, v=v, dout=dout, cu=cu)


def kernel_fns(C, c):
    q, k, v, dout, cu = c["q"], c["k"], c["v"], c["dout"], c["cu"]
    T, Hq, Hk, D = c["T"], c["Hq"], c["Hk"], c["D"]
    shape = (cu.data_ptr(), cu.data_ptr(), cu.shape[0] - 1, T, T, Hq, Hk, D, 1.0 / math.sqrt(D), c["causal"], -1,
             -1, dtype_code(q), torch.get_num_threads())

    def fwd():
        out = _alloc.empty(q.shape, q.dtype)
        lse = torch.empty(Hq, T, dtype=torch.float32)
        C.attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *shape)
        return out, lse

    def fwd_bwd():
        out, lse = fwd()
        dq, dk, dv = (_alloc.empty(t.shape, t.dtype) for t in (q, k, v))
        C.attention_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
                        0, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), *shape)
        return dq, dk, dv

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def sdpa_fns(c):
    """Windows: one batched SDPA on [T/W, H, W, D]; else one SDPA per sequence (GQA via enable_gqa)."""
    lengths, T = c["lengths"], c["T"]
    leaves = [t.detach().clone().requires_grad_(True) for t in (c["q"], c["k"], c["v"])]
    gqa = c["Hq"] != c["Hk"]

    def run():
        q, k, v = leaves
        if len(set(lengths)) == 1:
            n, W = len(lengths), lengths[0]
            q4, k4, v4 = (t.view(n, W, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=c["causal"], enable_gqa=gqa)
            return o.transpose(1, 2).reshape(T, c["Hq"], c["D"])
        bounds = c["cu"].tolist()
        return torch.cat([F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
            is_causal=c["causal"], enable_gqa=gqa)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:])])

    def fwd():
        with torch.no_grad():
            return run()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        run().backward(c["dout"])

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def sdpa_contiguous_fns(c):
    """One sequence: SDPA on contiguous [1, H, S, D] copies (its preferred layout; bench_attention's)."""
    leaves = [t.detach().transpose(0, 1)[None].contiguous().requires_grad_(True) for t in (c["q"], c["k"], c["v"])]
    dout = c["dout"].transpose(0, 1)[None].contiguous()

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*leaves, is_causal=c["causal"])

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        F.scaled_dot_product_attention(*leaves, is_causal=c["causal"]).backward(dout)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--so", action="append", required=True, help="a _C*.so (or its directory); repeatable")
    p.add_argument("--cases", default="windows,dense,dense_causal,varlen")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-sdpa", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    builds = [load_build(s, i) for i, s in enumerate(args.so)]
    dtype = getattr(torch, args.dtype)
    print(f"threads={args.threads} torch={torch.__version__} dtype={args.dtype} "
          f"loadavg={' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.cases.split(","):
        c = make_case(name, dtype)
        pairs = sum(n * (n + 1) // 2 if c["causal"] else n * n for n in c["lengths"])
        fwd_flops = 4 * pairs * c["Hq"] * c["D"]
        provs = {f"build{i}": kernel_fns(C, c) for i, C in enumerate(builds)}
        if not args.no_sdpa:
            provs["sdpa"] = sdpa_fns(c)
            if len(c["lengths"]) == 1:
                provs["sdpa_bhsd"] = sdpa_contiguous_fns(c)
        for mode in args.modes.split(","):
            flops = fwd_flops * (1 if mode == "fwd" else 3.5)
            times = {n: [] for n in provs}
            for n, f in provs.items():  # warm-up
                f[mode]()
            for _ in range(args.reps):
                for n, f in provs.items():
                    t0 = time.perf_counter()
                    r = f[mode]()
                    times[n].append((time.perf_counter() - t0) * 1e3)
                    del r
            med = {n: statistics.median(t) for n, t in times.items()}
            for n, t in times.items():
                s = sorted(t)
                q20, q80 = s[int(0.2 * (len(s) - 1))], s[int(0.8 * (len(s) - 1))]
                extra = f" vs build0 {med['build0'] / med[n]:5.2f}x" if n != "build0" else ""
                extra += f" vs sdpa {med['sdpa'] / med[n]:5.2f}x" if "sdpa" in med and n != "sdpa" else ""
                if "sdpa_bhsd" in med and not n.startswith("sdpa"):
                    extra += f" vs sdpa_bhsd {med['sdpa_bhsd'] / med[n]:5.2f}x"
                print(f"{name:>13} {mode:>8} {n:>7} {med[n]:9.2f} ms ({q20:8.2f}-{q80:8.2f}) "
                      f"{flops / med[n] / 1e6:6.1f} GF/s{extra}", flush=True)
    print(f"loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
