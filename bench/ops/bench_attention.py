"""Attention against PyTorch CPU SDPA (ATen's flash kernel), fwd and fwd+bwd: dense single
sequences (standalone), packed variable-length sequences and vision windows (run_all cases).

FLOPs follow FlashAttention's benchmark convention: fwd = 4 · (query-key pairs attended) · H · D,
bwd = 2.5 x fwd, fwd+bwd = 3.5 x fwd. Attention is compute-bound, so it is reported as GFLOP/s,
the fraction of the fp32 GEMM rate and the ratio to SDPA measured in the same run, not against a
bandwidth roofline.

Dense (`python -m bench.ops.bench_attention [--quick] [--threads N]`, not part of run_all): one
sequence S=2048, H=16, D=128, causal and not, the pair count S² (halved when causal).

run_all cases (`python bench/run_all.py --ops attention_varlen,attention_windows --dtypes fp32`):
  attention_varlen   8 sequences packed into T=8192 tokens (lengths evenly spaced from 200 to ~1850,
                     in a seeded order), causal, GQA 16 query / 2 kv heads, D=128; pairs Σ L(L+1)/2.
                     mmfuse: one call with cu_seqlens. Baselines, GQA through enable_gqa=True
                     (on this CPU build faster than repeat_interleave, which transformers uses when
                     it passes a mask: 2x512 tokens fwd+bwd 63 vs 78 ms):
                     sdpa_padded  one SDPA call on the right-padded batch [B, H, Smax, D] with a
                                  boolean mask (key j visible to query i iff j <= i and j < L); the
                                  inputs are padded before timing, as a padded pipeline holds them
                     sdpa_loop    a Python loop of SDPA calls, one per sequence, is_causal=True
  attention_windows  Qwen2.5-VL vision windows: T=4096 patches in windows of W=64 (64 windows),
                     H=16, D=80, not causal; pairs T · W.
                     hf_window_loop  transformers' Qwen2_5_VLVisionAttention with SDPA: q/k/v
                                     [1, H, T, D] split by the window lengths, SDPA per window, cat
                     sdpa_batched    one SDPA call on the windows as a batch [T/W, H, W, D] (a view
                                     of the packed tensors: equal windows need no copy)
Kernel A/B (two builds of the C++ core in one process, interleaved, next to SDPA): bench/ops/ab_attention.py.
Byte model (minimal, for the records' GB/s only; s = element size, Eq = T·Hq·D, Ekv = T·Hk·D):
fwd reads q, k, v and writes out (2·Eq + 2·Ekv)·s; fwd+bwd also reads q, k, v, out, dout and writes
dq, dk, dv: (6·Eq + 6·Ekv)·s. Every provider is credited with the same (useful) FLOPs and bytes, so
the padded baseline's extra work shows as a lower rate.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import sgemm_gflops, time_ms
from bench.harness import Case, Provider, mmfuse_op
from mmfuse.ops import attention

OPS = ("attention_varlen", "attention_windows")


def measure(S: int, H: int, D: int, causal: bool, dtype: torch.dtype, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q_THD, k_THD, v_THD = (torch.randn(S, H, D, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    q_BHSD, k_BHSD, v_BHSD = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_(True)
                              for t in (q_THD, k_THD, v_THD))
    dout_THD = torch.randn(S, H, D, generator=g).to(dtype)
    dout_BHSD = dout_THD.transpose(0, 1)[None].contiguous()
    fwd_flops = 4 * S * S * H * D / (2 if causal else 1)
    providers = {
        "mmfuse": (lambda: attention(q_THD, k_THD, v_THD, causal=causal), dout_THD, (q_THD, k_THD, v_THD)),
        "sdpa": (lambda: F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=causal), dout_BHSD,
                 (q_BHSD, k_BHSD, v_BHSD)),
    }
    rows = []
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        ms = {}
        for name, (fwd, dout, leaves) in providers.items():
            if mode == "fwd":
                def fn(fwd=fwd):
                    with torch.no_grad():
                        return fwd()
            else:
                def fn(fwd=fwd, dout=dout):
                    fwd().backward(dout)
            ms[name] = time_ms(fn, warmup=1, reps=reps, grad_to_none=leaves)["p50_ms"]
        for name, t in ms.items():
            rows.append({"S": S, "H": H, "D": D, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
                         "mode": mode, "provider": name, "p50_ms": t, "gflops": flops / t / 1e6,
                         "speedup_vs_sdpa": ms["sdpa"] / t})
    return rows


# ---- run_all cases: packed sequences and vision windows -----------------------------------------

def default_shape(op: str, quick: bool) -> dict[str, int]:
    if op == "attention_varlen":  # B sequences, the shortest Lmin tokens
        return ({"T": 1024, "B": 4, "Lmin": 64, "Hq": 16, "Hk": 2, "D": 128} if quick else
                {"T": 8192, "B": 8, "Lmin": 200, "Hq": 16, "Hk": 2, "D": 128})
    return {"T": 512, "W": 64, "H": 16, "D": 80} if quick else {"T": 4096, "W": 64, "H": 16, "D": 80}


def packed_lengths(total: int, n: int, shortest: int, seed: int = 0) -> list[int]:
    """`n` lengths evenly spaced from `shortest` up, summing to `total`, in a seeded order (the
    rounding remainder goes to the longest)."""
    step = (total - n * shortest) / (n * (n - 1) / 2) if n > 1 else 0
    lengths = [shortest + round(i * step) for i in range(n)]
    lengths[-1] += total - sum(lengths)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[i] for i in order]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _randn(shape, dtype, g) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)


def _attention_models(T: int, Hq: int, Hk: int, D: int, s: int, pairs: int):
    fwd = 4 * pairs * Hq * D
    flops = {"fwd": fwd, "fwd+bwd": 3.5 * fwd}
    flops_model = {"fwd": "4·pairs·Hq·D", "fwd+bwd": "3.5·4·pairs·Hq·D"}
    eq, ekv = T * Hq * D, T * Hk * D
    nbytes = {"fwd": (2 * eq + 2 * ekv) * s, "fwd+bwd": (6 * eq + 6 * ekv) * s}
    bytes_model = {"fwd": "(2·Eq + 2·Ekv)·s", "fwd+bwd": "(6·Eq + 6·Ekv)·s"}
    return flops, flops_model, nbytes, bytes_model


def sdpa_padded(q_pad, k_pad, v_pad, mask):
    """One SDPA call on the right-padded batch [B, H, Smax, D]."""
    return F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=mask, enable_gqa=True)


def sdpa_loop(q_THD, k_THD, v_THD, cu):
    """One causal SDPA call per packed sequence; out [T, Hq, D]."""
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(q_THD[a:b].transpose(0, 1)[None], k_THD[a:b].transpose(0, 1)[None],
                                           v_THD[a:b].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            .transpose(1, 2).contiguous()[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def hf_window_loop(q_THD, k_THD, v_THD, cu):
    """transformers' Qwen2_5_VLVisionAttention (SDPA interface) between the qkv and output
    projections: split by window lengths, SDPA per window, cat; out [T, H, D]."""
    T, H, D = q_THD.shape
    q_1HTD, k_1HTD, v_1HTD = (t.transpose(0, 1).unsqueeze(0) for t in (q_THD, k_THD, v_THD))
    lengths = (cu[1:] - cu[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (q_1HTD, k_1HTD, v_1HTD)]
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=False).transpose(1, 2).contiguous()
            for q, k, v in zip(*splits)]
    return torch.cat(outs, dim=1).reshape(T, H, D)


def sdpa_batched(q_THD, k_THD, v_THD, W: int):
    """Equal windows as a batch: one SDPA call on [T/W, H, W, D] views; out [T, H, D]."""
    T, H, D = q_THD.shape
    q, k, v = (t.view(T // W, W, H, D).transpose(1, 2) for t in (q_THD, k_THD, v_THD))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, H, D)


def unpad(out_BHSD: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The padded baseline's output back in the packed layout [T, H, D] (for checks, not timed)."""
    return torch.cat([out_BHSD[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def _varlen_case(dims: dict[str, int], dtype: torch.dtype) -> Case:
    T, B, Hq, Hk, D = dims["T"], dims["B"], dims["Hq"], dims["Hk"], dims["D"]
    lengths = packed_lengths(T, B, dims["Lmin"])
    Smax = max(lengths)
    cu = cu_seqlens(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)

    def make():
        g = torch.Generator().manual_seed(0)
        q, k, v = _randn((T, Hq, D), dtype, g), _randn((T, Hk, D), dtype, g), _randn((T, Hk, D), dtype, g)
        starts = cu.tolist()[:-1]
        padded = []
        for t in (q, k, v):
            p = t.new_zeros(B, t.shape[1], Smax, D)
            for b, (a, n) in enumerate(zip(starts, lengths)):
                p[b, :, :n] = t.detach()[a:a + n].transpose(0, 1)
            padded.append(p.requires_grad_(True))
        i, j = torch.arange(Smax)[:, None], torch.arange(Smax)[None, :]
        # Right padding as a causal LM sees it: padded query rows still see the valid keys (no
        # all-masked row, whose softmax would be NaN); their outputs are ignored downstream.
        mask = (j <= i) & (j < torch.tensor(lengths)[:, None, None])
        return {"q": q, "k": k, "v": v, "cu": cu, "q_pad": padded[0], "k_pad": padded[1], "v_pad": padded[2],
                "mask": mask[:, None]}

    providers = [
        mmfuse_op("attention", lambda f, i: f(i["q"], i["k"], i["v"], i["cu"], i["cu"], Smax, Smax, causal=True)),
        Provider("sdpa_padded", lambda i: sdpa_padded(i["q_pad"], i["k_pad"], i["v_pad"], i["mask"])),
        Provider("sdpa_loop", lambda i: sdpa_loop(i["q"], i["k"], i["v"], i["cu"])),
    ]
    flops, flops_model, nbytes, bytes_model = _attention_models(T, Hq, Hk, D, torch.finfo(dtype).bits // 8, pairs)
    return Case(op="attention_varlen", shape=f"{T} tokens in {B} seqs, H {Hq}/{Hk}, D {D}, causal",
                dims={**dims, "Smax": Smax, "pairs": pairs}, dtype=dtype, make_inputs=make,
                grad_inputs=("q", "k", "v", "q_pad", "k_pad", "v_pad"), bytes=nbytes, bytes_model=bytes_model,
                copy_nbytes=T * Hq * D * torch.finfo(dtype).bits // 8, providers=providers, flops=flops,
                flops_model=flops_model,
                note=f"sequence lengths {lengths} (Smax {Smax}); sdpa_padded computes B·Smax² = "
                     f"{B * Smax * Smax / pairs:.1f}x the {pairs} attended pairs; GQA via enable_gqa=True")


def _windows_case(dims: dict[str, int], dtype: torch.dtype) -> Case:
    T, W, H, D = dims["T"], dims["W"], dims["H"], dims["D"]
    if T % W:
        raise ValueError(f"attention_windows: T ({T}) must be a multiple of the window W ({W})")
    cu = cu_seqlens([W] * (T // W))

    def make():
        g = torch.Generator().manual_seed(0)
        q, k, v = (_randn((T, H, D), dtype, g) for _ in range(3))
        return {"q": q, "k": k, "v": v, "cu": cu}

    providers = [
        mmfuse_op("attention", lambda f, i: f(i["q"], i["k"], i["v"], i["cu"], i["cu"], W, W)),
        Provider("hf_window_loop", lambda i: hf_window_loop(i["q"], i["k"], i["v"], i["cu"])),
        Provider("sdpa_batched", lambda i: sdpa_batched(i["q"], i["k"], i["v"], W)),
    ]
    flops, flops_model, nbytes, bytes_model = _attention_models(T, H, H, D, torch.finfo(dtype).bits // 8, T * W)
    return Case(op="attention_windows", shape=f"{T} patches in {T // W} windows of {W}, H {H}, D {D}",
                dims={**dims, "windows": T // W, "pairs": T * W}, dtype=dtype, make_inputs=make,
                grad_inputs=("q", "k", "v"), bytes=nbytes, bytes_model=bytes_model,
                copy_nbytes=T * H * D * torch.finfo(dtype).bits // 8, providers=providers, flops=flops,
                flops_model=flops_model, note="not causal; the Qwen2.5-VL vision tower's windowed layers")


def cases(op: str, quick: bool, dtypes, shape: dict[str, int] | None = None) -> list[Case]:
    dims = dict(shape or default_shape(op, quick))
    if op == "attention_varlen":
        return [_varlen_case(dims, dtype) for dtype in dtypes]
    if op == "attention_windows":
        return [_windows_case(dims, dtype) for dtype in dtypes]
    raise ValueError(f"unknown op {op!r}; this module benchmarks {', '.join(OPS)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="S=512 instead of 2048")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    S = 512 if args.quick else 2048
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"loadavg={' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    gemm = sgemm_gflops(512 if args.quick else 2048)  # the roofline, measured in this run
    print(f"fp32 GEMM (torch.mm 2048^2, same run): {gemm:.1f} GFLOP/s")
    print(f"{'shape':>22} {'mode':>8} {'provider':>8} {'p50 ms':>9} {'GFLOP/s':>8} {'% GEMM':>6} {'vs sdpa':>7}")
    for causal in (False, True):
        for r in measure(S, 16, 128, causal, torch.float32, args.reps):
            shape = f"S{r['S']} H{r['H']} D{r['D']}{' causal' if r['causal'] else ''}"
            print(f"{shape:>22} {r['mode']:>8} {r['provider']:>8} {r['p50_ms']:9.1f} {r['gflops']:8.1f} "
                  f"{100 * r['gflops'] / gemm:5.0f}% {r['speedup_vs_sdpa']:6.2f}x")
    print(f"loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
