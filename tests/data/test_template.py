"""The qwen2vl chat template: layout, placeholder expansion, label masking and truncation."""

import pytest

from mmfuse.data.mllm import Message
from mmfuse.data.report import SampleError
from mmfuse.data.template import IGNORE_INDEX as X
from mmfuse.data.template import get_template, infer_seqlen
from mmfuse.data.tokenizer import build_tiny_tokenizer
from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS

# Qwen2-VL-Instruct's published chat template (tokenizer_config.json), the layout oracle.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=["What colour is the shape? Red. Blue circle."],
                         out_dir=out)
    return out


@pytest.fixture(scope="module")
def tpl(tok_dir):
    from mmfuse.data.tokenizer import Tokenizer
    return get_template("qwen2vl", Tokenizer.from_dir(tok_dir))


def _conv(*texts):
    return [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def test_single_turn_matches_the_hand_written_sequence(tpl):
    enc = tpl.tokenizer.encode
    START, END, VS, VE, PAD = 506, 507, 508, 509, 510
    out = tpl.encode(_conv("<image>What colour?", "Red."), image_grid_thw=[[1, 4, 6]])
    prompt = ([START] + enc("system\nYou are a helpful assistant.") + [END] + enc("\n")
              + [START] + enc("user\n") + [VS] + [PAD] * 6 + [VE] + enc("What colour?") + [END] + enc("\n")
              + [START] + enc("assistant\n"))
    answer = enc("Red.") + [END] + enc("\n")
    assert out.input_ids == prompt + answer
    assert out.labels == [X] * len(prompt) + answer
    assert (out.n_image_tokens, out.n_video_tokens) == (6, 0)


def test_layout_matches_the_qwen2vl_chat_template_through_transformers(tok_dir, tpl):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    grids_img, grids_vid = [[1, 2, 4], [1, 4, 4]], [[2, 2, 2]]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                         {"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Same colour."},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "A blue circle."}]
    text = hf.apply_chat_template(msgs, chat_template=QWEN2VL_CHAT_TEMPLATE, tokenize=False)
    # Qwen2VLProcessor's expansion: each pad becomes t*h*w / merge^2 pads, in order.
    for g in grids_img:
        text = text.replace("<|vision_start|><|image_pad|><|vision_end|>",
                            "<|vision_start|>" + "<|IMG|>" * (g[0] * g[1] * g[2] // 4) + "<|vision_end|>", 1)
    for g in grids_vid:
        text = text.replace("<|video_pad|>", "<|VID|>" * (g[0] * g[1] * g[2] // 4), 1)
    text = text.replace("<|IMG|>", "<|image_pad|>").replace("<|VID|>", "<|video_pad|>")
    ours = tpl.encode(_conv("<image>Compare with<image>?", "Same colour.", "<video>And this?", "A blue circle."),
                      system="Be brief.", image_grid_thw=grids_img, video_grid_thw=grids_vid)
    assert ours.input_ids == hf.encode(text, add_special_tokens=False)
    assert (ours.n_image_tokens, ours.n_video_tokens) == (2 + 4, 2)


def test_train_on_prompt_labels_every_token(tpl):
    out = tpl.encode(_conv("Hi", "Red."), train_on_prompt=True)
    assert out.labels == out.input_ids


def test_mask_history_trains_only_the_last_answer(tpl):
    full = tpl.encode(_conv("a", "Red.", "b", "Blue circle."))
    last = tpl.encode(_conv("a", "Red.", "b", "Blue circle."), mask_history=True)
    assert last.input_ids == full.input_ids
    trained = [t for t in last.labels if t != X]
    assert tpl.tokenizer.decode(trained) == "Blue circle.<|im_end|>\n"
    assert tpl.tokenizer.decode([t for t in full.labels if t != X]) == "Red.<|im_end|>\nBlue circle.<|im_end|>\n"


def test_infer_seqlen_matches_llamafactory_cases():
    assert infer_seqlen(100, 10, 50) == (40, 10)     # short answer kept whole
    assert infer_seqlen(10, 100, 50) == (10, 40)     # short prompt kept whole
    assert infer_seqlen(60, 40, 50) == (30, 20)      # both cut in proportion


def test_truncation_of_text_keeps_cutoff_len_and_drops_later_turns(tpl):
    conv = _conv("What colour is the shape? " * 4, "Red. " * 30, "b", "c")
    out = tpl.encode(conv, cutoff_len=40)
    assert len(out.input_ids) == len(out.labels) == 40
    full = tpl.encode(conv)
    assert len(full.input_ids) > 40


def test_truncation_through_an_image_run_rejects_the_sample(tpl):
    with pytest.raises(SampleError) as info:
        tpl.encode(_conv("<image>What colour?", "Red."), image_grid_thw=[[1, 8, 8]], cutoff_len=20)
    assert info.value.reason == "media_truncated"
    # Dropping a later text-only turn is fine: the image survives whole.
    conv = _conv("<image>x", "Red.", "What colour is the shape? " * 8, "Blue circle.")
    (src0, tgt0), _ = tpl.encode_pairs(conv, image_grid_thw=[[1, 2, 2]])
    cutoff = len(src0) + len(tgt0) + 5
    out = tpl.encode(conv, image_grid_thw=[[1, 2, 2]], cutoff_len=cutoff)
    assert out.n_image_tokens == 1 and len(out.input_ids) == cutoff


def test_tag_and_grid_counts_must_agree(tpl):
    with pytest.raises(SampleError) as info:
        tpl.encode(_conv("<image><image>x", "y"), image_grid_thw=[[1, 2, 2]])
    assert info.value.reason == "image_tag_mismatch"


def test_generation_prompt_ends_with_the_assistant_header(tpl):
    ids = tpl.encode_prompt(_conv("<image>What colour?"), image_grid_thw=[[1, 2, 2]])
    full = tpl.encode(_conv("<image>What colour?", "Red."), image_grid_thw=[[1, 2, 2]])
    assert full.input_ids[:len(ids)] == ids
    assert tpl.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_unknown_template_is_rejected(tpl):
    with pytest.raises(ValueError, match="qwen2vl"):
        get_template("llava", tpl.tokenizer)


def test_sample_left_without_an_answer_token_is_rejected(tpl):
    # a long prompt takes the whole budget: LLaMA-Factory's split leaves the answer 0 tokens
    with pytest.raises(SampleError) as err:
        tpl.encode(_conv("What colour is the shape? " * 20, "Red."), cutoff_len=8)
    assert err.value.reason == "no_trainable_tokens"


def test_grid_not_divisible_by_the_merge_size_is_rejected(tpl):
    with pytest.raises(SampleError) as err:
        tpl.encode(_conv("<image>What colour?", "Red."), image_grid_thw=[[1, 3, 4]])
    assert err.value.reason == "bad_image_grid"
