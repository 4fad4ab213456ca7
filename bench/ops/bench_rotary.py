"""Rotary embeddings on q and k (Qwen2.5-VL text attention: 4096 tokens, 16 heads, head dim 128).

  rotary       1-D RoPE, rotate-half pairing; mmfuse gets cos/sin [T, D/2] fp32
  apply_mrope  M-RoPE, mrope_section [16, 24, 24], position ids [3, T] of a multimodal sequence
               (text, an image, text, a video, text: see `multimodal_position_ids`); mmfuse
               computes the angles from position ids and inv_freq inside the kernel

Byte model (s = element size, E = T·(Hq + Hk)·D elements of q and k, R = D/2):
  rotary       fwd      read q, k, cos, sin; write q', k'                2·E·s + 2·T·R·4
               fwd+bwd  + read dq', dk', cos, sin; write dq, dk          4·E·s + 4·T·R·4
  apply_mrope  fwd      read q, k, position ids, inv_freq; write q', k'  2·E·s + 3·T·8 + R·4
               fwd+bwd  + the same again for the gradients               4·E·s + 2·(3·T·8 + R·4)
Baselines: the Hugging Face eager code (rotate_half + cat, with cos/sin [T, D] = cat(freqs, freqs)
cast to the activation dtype; for M-RoPE the per-layer section split of transformers 4.x
`apply_multimodal_rotary_pos_emb` on cos/sin [3, T, D], which its rotary module computes once per
forward, so that part is not timed) and torch.compile of it. PyTorch has no fused RoPE.

`python -m bench.ops.bench_rotary --quick` runs this family alone (same flags as run_all).
"""

from __future__ import annotations

import torch

from bench.harness import Case, Provider, compiled, mmfuse_op

OPS = ("rotary", "apply_mrope")
ROPE_THETA = 1e6          # Qwen2.5-VL text rope_theta
TOKENS_PER_SECOND = 2     # Qwen2.5-VL vision_config.tokens_per_second
SECOND_PER_GRID_T = 1.0   # temporal_patch_size 2 at the processor's default 2 fps


# ---- Hugging Face eager formulations -----------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb; q, k [T, H, D], cos, sin [T, D] (unsqueezed over heads)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def hf_apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1):
    """transformers 4.x apply_multimodal_rotary_pos_emb; cos, sin [3, T, D], chunk i from stream i % 3."""
    mrope_section = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))], dim=-1)
    return hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


# ---- inputs ------------------------------------------------------------------------------------

def inv_freq(head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def multimodal_layout(T: int) -> list[tuple]:
    """A T-token sequence: text, one image (merged grid a x a, a 896x896 image at T = 4096), text,
    a 4-frame video (merged grid 4 x a/2 x 3a/4), then text to the end."""
    a = max(2, round((T / 4) ** 0.5))
    spans = [("text", T // 32), ("vision", 1, a, a), ("text", T // 32), ("vision", 4, a // 2, 3 * a // 4)]
    used = sum(s[1] if s[0] == "text" else s[1] * s[2] * s[3] for s in spans)
    if used > T:
        raise ValueError(f"sequence of {T} tokens too short for the multimodal layout")
    return spans + [("text", T - used)]


def multimodal_position_ids(T: int) -> torch.Tensor:
    """[3, T] int64 (t, h, w) positions as transformers' get_rope_index builds them: text tokens
    share one running index; a vision span of merged grid (t, h, w) starts at the next index, with
    t = frame · second_per_grid_t · tokens_per_second (0 for an image), h = row, w = column; text
    after it restarts at the span's largest index + 1."""
    chunks, start = [], 0
    for span in multimodal_layout(T):
        if span[0] == "text":
            idx = torch.arange(span[1]).expand(3, -1) + start
        else:
            t, h, w = span[1:]
            ti = (torch.arange(t) * (SECOND_PER_GRID_T * TOKENS_PER_SECOND)).long().view(t, 1, 1).expand(t, h, w)
            hi = torch.arange(h).view(1, h, 1).expand(t, h, w)
            wi = torch.arange(w).view(1, 1, w).expand(t, h, w)
            idx = torch.stack((ti, hi, wi)).reshape(3, -1) + start
        chunks.append(idx)
        if idx.numel():
            start = int(idx.max()) + 1
    return torch.cat(chunks, dim=1).contiguous()


def default_shape(quick: bool) -> tuple[int, int, int, int]:
    """(T, Hq, Hk, D)."""
    return (512, 16, 16, 128) if quick else (4096, 16, 16, 128)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] at head dim 128, the same proportions for other (test) head dims."""
    t, h = head_dim // 8, 3 * head_dim // 16
    return [t, h, head_dim // 2 - t - h]


def cases(op: str, quick: bool, dtypes, shape: tuple[int, int, int, int] | None = None) -> list[Case]:
    T, Hq, Hk, D = shape or default_shape(quick)
    R = D // 2
    section = mrope_section(D)
    E = T * (Hq + Hk) * D
    out = []
    for dtype in dtypes:
        s = torch.finfo(dtype).bits // 8
        if op == "rotary":
            def make(dtype=dtype):
                freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq(D)  # [T, R]
                full = torch.cat((freqs, freqs), dim=-1)
                return {"q": torch.randn(T, Hq, D, dtype=dtype, requires_grad=True),
                        "k": torch.randn(T, Hk, D, dtype=dtype, requires_grad=True),
                        "cos": freqs.cos(), "sin": freqs.sin(),
                        "cos_hf": full.cos().to(dtype), "sin_hf": full.sin().to(dtype)}
            cs = 2 * T * R * 4
            nbytes = {"fwd": 2 * E * s + cs, "fwd+bwd": 4 * E * s + 2 * cs}
            model = {"fwd": "2·E·s + 2·T·R·4", "fwd+bwd": "4·E·s + 4·T·R·4"}
            hf_c = compiled(hf_apply_rotary_pos_emb)
            providers = [
                mmfuse_op("rotary", lambda f, i: (f(i["q"], i["cos"], i["sin"]), f(i["k"], i["cos"], i["sin"]))),
                Provider("hf_eager", lambda i: hf_apply_rotary_pos_emb(i["q"], i["k"], i["cos_hf"], i["sin_hf"])),
                Provider("torch_compile", lambda i, f=hf_c: f(i["q"], i["k"], i["cos_hf"], i["sin_hf"])),
            ]
            note = ""
        elif op == "apply_mrope":
            def make(dtype=dtype):
                pos = multimodal_position_ids(T)
                freqs = pos[..., None].float() * inv_freq(D)  # [3, T, R], as HF's rotary module
                full = torch.cat((freqs, freqs), dim=-1)
                return {"q": torch.randn(T, Hq, D, dtype=dtype, requires_grad=True),
                        "k": torch.randn(T, Hk, D, dtype=dtype, requires_grad=True),
                        "position_ids": pos, "inv_freq": inv_freq(D),
                        "cos_hf": full.cos().to(dtype), "sin_hf": full.sin().to(dtype)}
            ps = 3 * T * 8 + R * 4
            nbytes = {"fwd": 2 * E * s + ps, "fwd+bwd": 4 * E * s + 2 * ps}
            model = {"fwd": "2·E·s + 3·T·8 + R·4", "fwd+bwd": "4·E·s + 2·(3·T·8 + R·4)"}
            hf_c = compiled(hf_apply_multimodal_rotary_pos_emb)
            providers = [
                mmfuse_op("apply_mrope", lambda f, i: f(i["q"], i["k"], i["position_ids"], i["inv_freq"], section)),
                Provider("hf_eager", lambda i: hf_apply_multimodal_rotary_pos_emb(
                    i["q"], i["k"], i["cos_hf"], i["sin_hf"], section)),
                Provider("torch_compile", lambda i, f=hf_c: f(i["q"], i["k"], i["cos_hf"], i["sin_hf"], section)),
            ]
            note = (f"mrope_section {section}; hf_eager/torch_compile get cos/sin [3, T, D] precomputed "
                    "(once per forward in HF)")
        else:
            raise ValueError(f"unknown op {op!r}; this module benchmarks {', '.join(OPS)}")
        out.append(Case(op=op, shape=f"{T}x{Hq}+{Hk}x{D}", dims={"T": T, "Hq": Hq, "Hk": Hk, "D": D},
                        dtype=dtype, make_inputs=make, grad_inputs=("q", "k"), bytes=nbytes, bytes_model=model,
                        copy_nbytes=T * Hq * D * s, providers=providers, note=note))
    return out


if __name__ == "__main__":
    import sys

    from bench.run_all import main
    raise SystemExit(main(["--ops", ",".join(OPS), *sys.argv[1:]]))
