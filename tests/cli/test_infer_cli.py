"""`mmfuse infer`: answers a question or every conversation of an MLLM file through the training
image processor and chat template; unusable samples are counted and listed; LoRA adapters are folded
in; bad arguments fail with a message instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfuse.cli.main import main
from mmfuse.data.demo_data import make_demo_dataset
from mmfuse.data.mllm import load_samples
from mmfuse.infer import GenerationConfig, generate
from mmfuse.infer.answerer import Answerer, eos_token_ids
from mmfuse.infer.prompts import build_prompt, question_sample
from mmfuse.train.demo import make_demo_run
from tests.cli.test_merge_lora_cli import _base_and_adapters
from tests.models.test_qwen2_5_vl_training_features import _batch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("demo"), n_train=8, n_eval=6, steps=1)


def _eval_file(demo):
    return f"{demo.eval_dir}/mllm_data.json"


def test_data_file_answers_every_usable_conversation_and_reports_the_rest(demo, tmp_path, capsys):
    records = json.loads(open(_eval_file(demo)).read())
    records[1]["images"] = ["images/not-there.png"]                               # unusable: counted
    records[2]["messages"] = records[2]["messages"][:1]                           # ends with the question
    data = tmp_path / "q.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "answers.jsonl"
    rc = main(["infer", demo.model_dir, "--data", str(data), "--dataset-dir", demo.eval_dir, "--output", str(out),
               "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{data}[{i}]" for i in (0, 2, 3, 4, 5)]
    assert rows[1]["reference"] is None and rows[1]["exact_match"] is None
    assert rows[0]["reference"] == records[0]["messages"][1]["content"]
    assert all(isinstance(r["answer"], str) for r in rows)
    err = capsys.readouterr().err
    assert "answered 5 prompts; exact match with the reference answer:" in err and "/4 (" in err
    assert "missing_file: 1" in err and f"{data}[1]" in err


def test_cli_answers_are_greedy_generation_decoded(demo, tmp_path, capsys):
    """The answers are the model's greedy tokens up to the end token, decoded: checked here against
    generate() on the same prompts."""
    answerer = Answerer(demo.model_dir)
    samples = load_samples(_eval_file(demo), dataset_dir=demo.eval_dir)[:3]
    prompts = [answerer.prompt(s) for s in samples]
    got = answerer.answer(prompts, GenerationConfig(max_new_tokens=6), batch_size=2)
    outs = generate(answerer.model, [p.sample for p in prompts],
                    GenerationConfig(max_new_tokens=6, eos_token_ids=answerer.eos))
    for text, out in zip(got, outs):
        tokens = out.tokens[:-1] if out.finished else out.tokens
        assert text == answerer.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_question_with_an_image_prints_one_answer(demo, capsys):
    image = load_samples(_eval_file(demo), dataset_dir=demo.eval_dir)[0].images[0]
    rc = main(["infer", demo.model_dir, "--question", "What colour is the shape?", "--image", image,
               "--max-new-tokens", "4"])
    assert rc == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_streamed_answer_equals_the_complete_one(demo, capsys):
    image = load_samples(_eval_file(demo), dataset_dir=demo.eval_dir)[1].images[0]
    args = ["infer", demo.model_dir, "--question", "What shape is this?", "--image", image, "--max-new-tokens", "12"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--no-stream"]) == 0
    assert streamed.strip() == capsys.readouterr().out.strip()
    answerer = Answerer(demo.model_dir)
    with torch.no_grad():   # a random model that says something: the untrained one mostly emits special tokens
        for p in answerer.model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    prompt = answerer.prompt(question_sample("What shape is this?", images=[image]))
    pieces: list[str] = []
    answer = answerer.stream(prompt, GenerationConfig(max_new_tokens=12), pieces.append)
    assert len(pieces) > 2 and len(answer) > 5
    assert "".join(pieces).strip() == answer == answerer.answer([prompt], GenerationConfig(max_new_tokens=12))[0]


def test_question_tags_and_files_must_agree(demo, capsys):
    image = load_samples(_eval_file(demo), dataset_dir=demo.eval_dir)[0].images[0]
    rc = main(["infer", demo.model_dir, "--question", "<image><image>Same?", "--image", image])
    assert rc == 2
    assert "2 <image> and 0 <video> tags for 1 image and 0 video files" in capsys.readouterr().err


def test_question_without_tags_puts_the_media_first(demo):
    answerer = Answerer(demo.model_dir)
    image = load_samples(_eval_file(demo), dataset_dir=demo.eval_dir)[0].images[0]
    sample = question_sample("What is it?", images=[image])
    assert sample.messages[0].content == "<image>What is it?"
    prompt = build_prompt(sample, answerer.data, answerer.template, answerer.processor)
    ids = prompt.sample.input_ids.tolist()
    start = answerer.template.vision_start
    assert ids.index(start) < ids.index(answerer.tokenizer.encode("What")[0])
    assert prompt.reference is None
    assert ids[-3:] == answerer.tokenizer.encode("<|im_start|>assistant\n")


def test_missing_model_directory_and_bad_flags_fail_with_a_message(tmp_path, demo, capsys):
    assert main(["infer", str(tmp_path / "nope"), "--question", "hi"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["infer", demo.model_dir, "--question", "hi", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "--output goes with --data" in capsys.readouterr().err
    assert main(["infer", demo.model_dir, "--question", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["infer", demo.model_dir, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_adapters_are_folded_into_the_loaded_model(tmp_path):
    cfg, adapted = _base_and_adapters(tmp_path)        # base/ and adapters/ under tmp_path
    tokenizer_dir = Path(make_demo_dataset(tmp_path / "d", n_samples=1).model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / "base" / name).write_bytes((tokenizer_dir / name).read_bytes())
    loaded = Answerer(tmp_path / "base", adapters=tmp_path / "adapters").model
    batch = _batch(cfg)
    with torch.no_grad():
        want = adapted(**batch, return_logits=True).logits
        got = loaded(**batch, return_logits=True).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_end_tokens_come_from_generation_config_or_the_template(demo, tmp_path):
    answerer = Answerer(demo.model_dir)
    im_end = answerer.tokenizer.token_id("<|im_end|>")
    assert im_end in eos_token_ids(demo.model_dir, answerer.tokenizer)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert eos_token_ids(tmp_path, answerer.tokenizer) == (7, 9)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not readable JSON"):
        eos_token_ids(tmp_path, answerer.tokenizer)
