"""Text tokenizer: a Hugging Face `tokenizer.json` read with the `tokenizers` library (no
transformers), and a builder for small byte-level BPE tokenizers whose special tokens sit at the
end of the vocabulary, as the tiny and 100m Qwen2.5-VL configs expect."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from mmfuse.data.atomic import write_text_atomic

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, newlines,
# spaces), so that a tiny tokenizer segments text the way the released Qwen2.5-VL tokenizer does.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Used when build_tiny_tokenizer gets no corpus: the chat-template words plus common English, so that
# the merges are not all spent on one domain.
_DEFAULT_CORPUS = (
    "system\nuser\nassistant\nYou are a helpful assistant.\n",
    "What is in the image? Describe the picture. What colour is the shape? What shape is this?",
    "The image shows a red circle, a green square and a blue triangle on a white background.",
    "Answer the question with a short word or phrase. Yes. No. There are 2 objects in the photo.",
    "the of and to in is it that for on with as was at by this be from are or an have not",
)


class Tokenizer:
    """A loaded `tokenizer.json`: encode/decode text and look up special tokens by name.
    Text is encoded without extra BOS/EOS (Qwen2 adds none); special-token strings in the text,
    such as "<|im_start|>", become their single ids."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>", config: dict | None = None):
        self.backend = backend
        self.source = source                      # file the tokenizer came from, named in errors
        self.config = dict(config or {})          # tokenizer_config.json contents, if any

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load `<model_dir>/tokenizer.json` (and `tokenizer_config.json` when present)."""
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            what = "is not a directory" if not Path(model_dir).is_dir() else f"has no {TOKENIZER_FILE}"
            raise FileNotFoundError(
                f"{model_dir} {what}: mmfuse reads the Hugging Face fast-tokenizer file {TOKENIZER_FILE} "
                f"(Qwen2.5-VL releases ship it; set model_name_or_path to the checkpoint directory)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable tokenizers JSON file: {exc}") from exc
        config = {}
        config_path = Path(model_dir) / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_path}: invalid JSON: {exc}") from exc
        return cls(backend, source=str(path), config=config)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of a token string (e.g. "<|image_pad|>"); KeyError naming the file if absent."""
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"{self.source}: token {token!r} is not in the vocabulary; a Qwen2-VL tokenizer "
                           f"needs it (rebuild the tokenizer with it as a special token)")
        return tid

    def special_ids(self, names: Sequence[str]) -> dict[str, int]:
        """{token: id} for each name, raising KeyError for the first one missing."""
        return {name: self.token_id(name) for name in names}

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json (+ tokenizer_config.json when one was loaded or built), atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        if self.config:
            write_text_atomic(out / TOKENIZER_CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False))


def build_tiny_tokenizer(vocab_size: int, special_tokens: Sequence[str], corpus: Iterable[str] | None = None,
                         out_dir: str | os.PathLike | None = None, eos_token: str | None = "<|im_end|>",
                         pad_token: str | None = "<|endoftext|>") -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, trained on `corpus` (a few lines
    are enough) with Qwen2's pre-tokenizer; `special_tokens` get the last ids in the given order.
    Deterministic for a given corpus. Written to `out_dir` (tokenizer.json + tokenizer_config.json)
    when given."""
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    n_regular = vocab_size - len(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_regular < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves {n_regular} regular ids; byte-level BPE needs at least "
                         f"{len(alphabet)} (one per byte) plus the {len(special_tokens)} special tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # sorted(alphabet): the trainer's initial-alphabet order would otherwise follow set iteration.
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=1, show_progress=False,
                                  initial_alphabet=sorted(alphabet), special_tokens=[])
    lines = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    backend.train_from_iterator(lines, trainer=trainer)

    # A small corpus runs out of merges before n_regular; unused filler entries keep the special
    # ids at the end of the vocabulary. BPE never produces them (no merge leads there).
    spec = json.loads(backend.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i in range(len(vocab), n_regular):
        vocab[f"<|unused_{i}|>"] = i
    spec["added_tokens"] = [
        {"id": n_regular + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, tok in enumerate(special_tokens)]
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size

    config = {
        # PreTrainedTokenizerFast loads tokenizer.json as it is, so transformers sees the same ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": {str(n_regular + i): {"content": tok, "special": True, "normalized": False,
                                                       "lstrip": False, "rstrip": False, "single_word": False}
                                 for i, tok in enumerate(special_tokens)},
    }
    tok = Tokenizer(backend, config=config)
    if out_dir is not None:
        tok.save(out_dir)
        tok.source = str(Path(out_dir) / TOKENIZER_FILE)
    return tok
