"""The demo dataset: deterministic, loads whole through the dataset, and its words are single tokens."""

import pytest

from mmfuse.cli.main import main
from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.demo_data import COLOURS, SHAPES, make_demo_dataset
from mmfuse.data.tokenizer import Tokenizer
from tests.data.fakes import FakeProcessor


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_samples=12, seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_files_and_another_seed_does_not(demo, tmp_path):
    from pathlib import Path
    again = make_demo_dataset(tmp_path / "a", n_samples=12, seed=0)
    assert _files(Path(demo.root)) == _files(Path(again.root))
    other = make_demo_dataset(tmp_path / "b", n_samples=12, seed=1)
    assert _files(Path(other.root))["mllm_data.json"] != _files(Path(demo.root))["mllm_data.json"]


def test_every_sample_loads_and_is_trainable(demo):
    cfg = DataConfig(dataset=[demo.data_file], dataset_dir=demo.root, model_name_or_path=demo.model_dir,
                     cutoff_len=256)
    ds = MLLMDataset(cfg, processor=FakeProcessor())
    samples = list(ds)
    assert len(samples) == demo.n_samples and ds.report.total == 0
    for s in samples:
        assert 2 * 2 <= s.image_grid_thw.prod() <= 8 * 6 and (s.labels != -100).any()


def test_demo_words_are_whole_tokens_and_special_ids_match_the_tiny_preset(demo):
    from mmfuse.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    tok = Tokenizer.from_dir(demo.model_dir)
    for word in [*COLOURS, *SHAPES, "colour", "shape"]:
        assert len(tok.encode(" " + word)) == 1, word
    cfg = Qwen2_5_VLConfig.preset("tiny")
    assert tok.vocab_size == demo.vocab_size == cfg.text.vocab_size
    assert tok.token_id("<|image_pad|>") == cfg.image_token_id


def test_cli_make_demo_writes_a_ready_run_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["data", "make-demo", str(tmp_path), "--samples", "3"]) == 0
    assert "wrote 3 training samples" in capsys.readouterr().out
    model = tmp_path / "data" / "model"
    assert (model / "tokenizer.json").is_file() and (model / "config.json").is_file()
    assert (model / "model.safetensors").is_file() and (tmp_path / "train.yaml").is_file()
    assert len(list((tmp_path / "data" / "images").iterdir())) == 3
    assert main(["data", "make-demo", str(tmp_path), "--samples", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["data", "make-demo", str(tmp_path), "--samples", "2", "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "data" / "images").iterdir()) == ["00000.png", "00001.png"]
