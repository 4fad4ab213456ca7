"""End to end on the demo data with the real image processor: data.json -> dataset -> sampler ->
packed micro-batches whose tokens, labels and pixels agree."""

import json

import pytest
import torch

from mmfuse.cli.main import main
from mmfuse.data.config import load_data_config
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.demo_data import make_demo_dataset
from mmfuse.data.packing import packed_stream
from mmfuse.data.sampler import ShardedSampler
from mmfuse.data.template import IGNORE_INDEX


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    info = make_demo_dataset(root, n_samples=10, seed=3)
    cfg = {"dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {"model_name_or_path": info.model_dir, "image_max_pixels": 262144},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": info.root, "dataset": info.data_file,
                             "cutoff_len": 128, "max_samples": 9},
        "attr": {"images": "images", "messages": "messages", "system_tag": None, "videos": None}}}
    path = root / "data.json"
    path.write_text(json.dumps(cfg))
    return path


def test_packed_batches_agree_on_tokens_labels_and_pixels(data_json):
    ds = MLLMDataset(load_data_config(data_json))
    assert len(ds) == 9
    tok, tpl = ds.tokenizer, ds.template
    batches = list(packed_stream(ShardedSampler(len(ds), seed=0, num_epochs=1), ds.load, seq_length=128))
    assert sum(b.num_samples for b in batches) == 9 and ds.report.total == 0
    for b in batches:
        assert b.num_tokens <= 128 and int(b.cu_seqlens[-1]) == b.num_tokens
        grid = b.image_grid_thw
        assert b.pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
        assert int((b.input_ids == tpl.image_pad).sum()) == int(grid.prod(-1).sum()) // 4
        for k in range(b.num_samples):
            seg = slice(int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1]))
            trained = b.labels[seg][b.labels[seg] != IGNORE_INDEX]
            answer = tok.decode(trained.tolist())
            assert answer.endswith("<|im_end|>\n") and answer.count("<|im_end|>") == 1
            assert torch.equal(b.labels[seg][b.labels[seg] != IGNORE_INDEX],
                               b.input_ids[seg][b.labels[seg] != IGNORE_INDEX])


def test_check_cli_accepts_a_mindspeed_data_json(data_json, capsys):
    assert main(["data", "check", str(data_json)]) == 0
    out = capsys.readouterr().out
    assert "usable: 9" in out and "skipped: 0" in out
    assert main(["data", "check", str(data_json), "--cutoff-len", "12", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["counts"] == {"media_truncated": 9}
