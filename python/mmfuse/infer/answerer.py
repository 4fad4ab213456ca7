"""A model directory ready to answer: weights (optionally with LoRA adapters folded in), tokenizer,
image processor, chat template and the tokens that end an answer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import default_processor
from mmfuse.data.mllm import MLLMSample
from mmfuse.data.template import get_template
from mmfuse.data.tokenizer import Tokenizer
from mmfuse.infer.generate import GenerationConfig, generate
from mmfuse.infer.prompts import Prompt, build_prompt

# Tokens that end an assistant turn in the qwen2vl template, used when generation_config.json names none.
DEFAULT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def eos_token_ids(model_dir: str | os.PathLike, tokenizer: Tokenizer) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list), else the template's end tokens."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not readable JSON ({exc}); fix or remove it") from exc
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and eos and all(isinstance(t, int) for t in eos):
            return tuple(eos)
    ids = []
    for name in DEFAULT_EOS_TOKENS:
        try:
            ids.append(tokenizer.token_id(name))
        except KeyError:
            pass
    if not ids:
        raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json and the tokenizer has none of "
                         f"{list(DEFAULT_EOS_TOKENS)}; answers would only stop at max_new_tokens")
    return tuple(ids)


class Answerer:
    """Loads `model_dir` (a Hugging Face Qwen2.5-VL directory with tokenizer.json) and answers prompts."""

    def __init__(self, model_dir: str | os.PathLike, adapters: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 data: DataConfig | None = None):
        from mmfuse.models.qwen2_5_vl import Qwen2_5_VL

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}/config.json not found: give a Hugging Face Qwen2.5-VL directory "
                                    f"(e.g. a run's final/ folder)")
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.processor = default_processor(str(self.model_dir))
        self.template = get_template("qwen2vl", self.tokenizer, merge_size=getattr(self.processor, "merge_size", 2))
        self.data = data or DataConfig()
        self.eos = eos_token_ids(self.model_dir, self.tokenizer)
        # Adapters are folded in fp32 before any lower-precision cast (as `mmfuse merge-lora` does).
        model = Qwen2_5_VL.from_pretrained(self.model_dir, dtype=torch.float32 if adapters else dtype, device=device)
        if adapters:
            from mmfuse.models.common.lora import fold_lora, load_adapters

            load_adapters(model, adapters)
            fold_lora(model)
            model.to(dtype)
        self.model = model.eval()

    def prompt(self, sample: MLLMSample) -> Prompt:
        return build_prompt(sample, self.data, self.template, self.processor)

    def _with_eos(self, cfg: GenerationConfig) -> GenerationConfig:
        return GenerationConfig(**{**cfg.__dict__, "eos_token_ids": tuple(cfg.eos_token_ids) or self.eos})

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def stream(self, prompt: Prompt, cfg: GenerationConfig, write: Callable[[str], None]) -> str:
        """The answer to one prompt, with write(piece) called as its text grows (pieces that end in
        half a multi-byte character wait for the rest). Returns the whole answer, as answer() would."""
        tokens: list[int] = []
        shown = ""

        def on_tokens(_rows: list[int], step: list[int]) -> None:
            nonlocal shown
            tokens.extend(t for t in step if t not in self.eos)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd") or not text.startswith(shown):
                return
            write(text[len(shown):])
            shown = text

        out = generate(self.model, [prompt.sample], self._with_eos(cfg), on_tokens=on_tokens)[0]
        answer = self._text(out.tokens[:-1] if out.finished else out.tokens)
        if answer.startswith(shown.strip()) and len(answer) > len(shown.strip()):
            write(answer[len(shown.strip()):])
        return answer

    def answer(self, prompts: Sequence[Prompt], cfg: GenerationConfig, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> list[str]:
        """The decoded answers (end token and special tokens left out), `batch_size` prompts decoded
        together; progress(n) after each batch of n."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        cfg = self._with_eos(cfg)
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            for out in generate(self.model, [p.sample for p in chunk], cfg):
                tokens = out.tokens[:-1] if out.finished else out.tokens
                answers.append(self._text(tokens))
            if progress is not None:
                progress(len(chunk))
        return answers
