"""The tokenizer layer: tiny byte-level BPE tokenizers with Qwen2's special tokens at the end of
the vocabulary, loaded back from tokenizer.json without transformers."""

import json

import pytest

from mmfuse.data.tokenizer import Tokenizer, build_tiny_tokenizer
from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS, Qwen2_5_VLConfig

CORPUS = ["What colour is the shape?", "The shape is a red circle.", "You are a helpful assistant."]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=CORPUS, out_dir=out)
    return out


def test_round_trip_of_text_including_unseen_characters(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    for text in ["What colour is the shape?", "héllo wörld 123 的\n\n  tabs\tand  spaces", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_take_exactly_the_last_ids_like_the_tiny_config(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    cfg = Qwen2_5_VLConfig.preset("tiny")
    assert tok.vocab_size == cfg.text.vocab_size == 512
    ids = tok.special_ids(SMALL_VOCAB_SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(505, 512))
    assert ids["<|image_pad|>"] == cfg.image_token_id and ids["<|video_pad|>"] == cfg.video_token_id
    assert ids["<|vision_start|>"] == cfg.vision_start_token_id and ids["<|im_end|>"] == cfg.eos_token_id


def test_special_token_strings_in_text_encode_to_one_id_each(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    pad = tok.token_id("<|image_pad|>")
    assert tok.encode("<|image_pad|>") == [pad]
    assert tok.encode("a<|image_pad|><|image_pad|>b").count(pad) == 2
    assert tok.encode("<|im_start|>user\n")[0] == tok.token_id("<|im_start|>")


def test_build_is_deterministic(tmp_path):
    a = build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=CORPUS)
    b = build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=CORPUS)
    assert a.backend.to_str() == b.backend.to_str()


def test_transformers_reads_the_saved_files_to_the_same_ids(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tok = Tokenizer.from_dir(tok_dir)
    text = "<|im_start|>user\nWhat colour is the shape?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.token_id("<|im_end|>") and hf.pad_token_id == tok.token_id("<|endoftext|>")
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_missing_tokenizer_file_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_token_error_names_the_token(tmp_path):
    build_tiny_tokenizer(300, ["<|im_end|>"], corpus=CORPUS, out_dir=tmp_path)
    with pytest.raises(KeyError, match=r"<\|image_pad\|>.*tokenizer.json|tokenizer.json.*<\|image_pad\|>"):
        Tokenizer.from_dir(tmp_path).token_id("<|image_pad|>")


def test_vocab_too_small_for_the_byte_alphabet_is_rejected():
    with pytest.raises(ValueError, match="at least 256"):
        build_tiny_tokenizer(260, SMALL_VOCAB_SPECIAL_TOKENS, corpus=CORPUS)
