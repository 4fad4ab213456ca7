"""Token generation for Qwen2.5-VL with a key/value cache.

The prompts of a batch are one packed stream: the vision tower runs once over all their images and
videos, and one prefill pass through the decoder (varlen attention, no padding) fills the cache and
gives each prompt's first new token. Each later step feeds one token per unfinished sequence. Its
M-RoPE position is the same on the t/h/w streams: one more than the previous token's, which for the
first new token means one more than the largest position of its prompt (transformers' rope_deltas).
A sequence stops at an end-of-sequence token (kept in its output) or after max_new_tokens, and
leaves the batch (and the cache) at once.

Greedy decoding (temperature 0) returns what transformers' `generate(do_sample=False)` returns for
the same weights and prompt (tests/infer). Sampling draws from softmax(logits / temperature) after
top-k and top-p filtering, from a torch.Generator seeded per call, so a seed gives the same answers
on every run of the same build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mmfuse.data.packing import ProcessedSample, collate
from mmfuse.models.common.kv_cache import KVCache
from mmfuse.models.qwen2_5_vl.model import DecoderInputs, Qwen2_5_VL


@dataclass
class GenerationConfig:
    """How `generate` picks and stops."""
    max_new_tokens: int = 128
    temperature: float = 0.0            # 0: greedy (argmax); else sample from softmax(logits / temperature)
    top_k: int = 0                      # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0                  # sampling: keep the smallest set whose probability reaches top_p
    eos_token_ids: tuple[int, ...] = ()  # a sequence ends after producing one of these
    seed: int = 0                       # sampling seed

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generated:
    """New tokens of one prompt."""
    tokens: list[int] = field(default_factory=list)
    finished: bool = False              # ended with an end-of-sequence token (else: max_new_tokens reached)


def next_tokens(logits_BV: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V] -> [B] int64."""
    if cfg.temperature == 0:
        return logits_BV.argmax(-1)
    scores = logits_BV.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p (the most likely one always stays).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= cfg.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# on_tokens(prompt indices, tokens): called after every step with the token each unfinished prompt got.
TokenCallback = Callable[[list[int], list[int]], None]


@torch.no_grad()
def generate(model: Qwen2_5_VL, prompts: Sequence[ProcessedSample], cfg: GenerationConfig | None = None,
             on_tokens: TokenCallback | None = None) -> list[Generated]:
    """New tokens for each prompt (its input_ids, pixel values and grids; labels are not used),
    all prompts decoded together. on_tokens, when given, sees each step's tokens as they come
    (for streaming output)."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    if not prompts:
        return []
    for p in prompts:
        if len(p) == 0:
            raise ValueError(f"prompt {p.where or '?'} has no tokens")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, list(prompts), cfg, on_tokens)
    finally:
        model.train(was_training)


def _generate(model: Qwen2_5_VL, prompts: list[ProcessedSample], cfg: GenerationConfig,
              on_tokens: TokenCallback | None) -> list[Generated]:
    device = next(model.parameters()).device
    batch = collate(prompts)
    to = (lambda t: None if t is None else t.to(device))
    inp = model.inputs(to(batch.input_ids), to(batch.cu_seqlens), to(batch.image_grid_thw), to(batch.video_grid_thw),
                       to(batch.second_per_grid_ts))
    image_embeds = model.visual(to(batch.pixel_values), to(batch.image_grid_thw)) \
        if batch.pixel_values is not None else None
    video_embeds = model.visual(to(batch.pixel_values_videos), to(batch.video_grid_thw)) \
        if batch.pixel_values_videos is not None else None
    hidden_TD = model.embed(inp, image_embeds, video_embeds, has_images=batch.image_grid_thw is not None,
                            has_videos=batch.video_grid_thw is not None)
    cache = KVCache(len(model.model.layers), len(prompts))
    hidden_TD = model.decode(hidden_TD, inp, model.model.layers, kv_cache=cache)
    last = inp.cu_seqlens[1:].long() - 1
    logits_BV = model.logits(hidden_TD[last])
    # The next position of each prompt: one past its largest (t/h/w) position.
    next_pos = torch.stack([inp.position_ids[:, s:e].max() + 1 for s, e in
                            zip(inp.cu_seqlens[:-1].tolist(), inp.cu_seqlens[1:].tolist())])

    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    eos = torch.tensor(sorted(set(cfg.eos_token_ids)) or [-1], device=device)
    out = [Generated() for _ in prompts]
    active = list(range(len(prompts)))      # prompt index of each row still decoding
    for step in range(cfg.max_new_tokens):
        tok_B = next_tokens(logits_BV, cfg, generator)
        done = torch.isin(tok_B, eos).tolist()
        step_tokens = tok_B.tolist()
        for row, (p, t) in enumerate(zip(active, step_tokens)):
            out[p].tokens.append(t)
            out[p].finished = done[row]
        if on_tokens is not None:
            on_tokens(list(active), step_tokens)
        if step == cfg.max_new_tokens - 1:
            break
        keep = [row for row in range(len(active)) if not done[row]]
        if not keep:
            break
        if len(keep) < len(active):
            cache.keep(keep)
            rows = torch.tensor(keep, device=device)
            tok_B, next_pos = tok_B[rows], next_pos[rows]
            active = [active[row] for row in keep]
        b = len(active)
        step_inp = DecoderInputs(ids=tok_B, position_ids=next_pos.expand(3, b).contiguous(), inv_freq=inp.inv_freq,
                                 cu_seqlens=torch.arange(b + 1, dtype=torch.int32, device=device), max_seqlen=1,
                                 target=None)
        hidden_BD = model.decode(model.embed(step_inp), step_inp, model.model.layers, kv_cache=cache)
        logits_BV = model.logits(hidden_BD)
        next_pos = next_pos + 1
    return out
