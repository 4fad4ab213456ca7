"""The configured dataset: data.json / YAML mapping, start-up validation, and bad samples skipped
and counted with file and index instead of stopping the run."""

import json
import logging
import sys

import pytest
import torch
import yaml
from PIL import Image

from mmfuse.cli.main import main
from mmfuse.data.check import check_dataset
from mmfuse.data.config import DataConfig, load_data_config
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.tokenizer import build_tiny_tokenizer
from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS
from tests.data.fakes import FakeAV, FakeProcessor

DATA_JSON = {
    "dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {"model_name_or_path": "ckpt", "use_fast_tokenizer": True,
                                  "split_special_tokens": False, "image_max_pixels": 65536, "image_min_pixels": 0,
                                  "video_max_pixels": 16384, "video_min_pixels": 0, "video_fps": 2.0,
                                  "video_maxlen": 64},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": "./data", "dataset": "./a.json,./b.jsonl",
                             "cache_dir": "./data/cache_dir", "train_on_prompt": False, "mask_history": True,
                             "preprocessing_batch_size": 1000, "preprocessing_num_workers": 16,
                             "max_samples": 8, "tool_format": None},
        "attr": {"system": None, "images": "images", "videos": None, "messages": "messages", "role_tag": "role",
                 "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "observation_tag": None, "function_tag": None, "system_tag": None},
    },
    "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "num_workers": 2},
}


def test_data_json_fields_map_into_the_typed_config():
    cfg = DataConfig.from_data_json(DATA_JSON)
    assert cfg.dataset == ["./a.json", "./b.jsonl"] and cfg.dataset_dir == "./data"
    assert (cfg.model_name_or_path, cfg.template, cfg.max_samples, cfg.mask_history) == ("ckpt", "qwen2vl", 8, True)
    assert (cfg.image_max_pixels, cfg.video_max_pixels, cfg.cache_dir) == (65536, 16384, "./data/cache_dir")
    assert cfg.attr.videos is None and cfg.attr.system_tag is None
    assert "dataset_param.basic_parameters.preprocessing_num_workers" in cfg.ignored
    assert cfg.num_workers == 2   # from dataloader_param: per-rank loader workers, as here


def test_data_json_unknown_or_unsupported_keys_are_named():
    bad = json.loads(json.dumps(DATA_JSON))
    bad["dataset_param"]["basic_parameters"]["max_sample"] = 3
    with pytest.raises(ValueError, match="basic_parameters.max_sample"):
        DataConfig.from_data_json(bad)
    bad = json.loads(json.dumps(DATA_JSON))
    bad["dataset_param"]["preprocess_parameters"]["split_special_tokens"] = True
    with pytest.raises(ValueError, match="split_special_tokens"):
        DataConfig.from_data_json(bad)


def test_validation_lists_every_problem_at_once(tmp_path):
    cfg = DataConfig(dataset=["nope.json"], template="llava", image_min_pixels=10, image_max_pixels=5,
                     model_name_or_path=str(tmp_path))
    with pytest.raises(ValueError) as info:
        cfg.validate()
    msg = str(info.value)
    for fragment in ("template 'llava'", "nope.json not found", "image_min_pixels", "no tokenizer.json"):
        assert fragment in msg


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=["What colour is it? Red."])


def _write_dataset(root):
    Image.new("RGB", (56, 84), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (112, 56), (0, 0, 120)).save(root / "blue.png")
    (root / "broken.png").write_bytes(b"not a png")
    frames = root / "clip"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (56, 56), (0, 255, 0)).save(frames / f"{i}.png")

    def conv(tag, answer="Red."):
        return [{"role": "user", "content": f"{tag}What colour is it?"}, {"role": "assistant", "content": answer}]
    records = [
        {"images": ["red.png"], "messages": conv("<image>")},                         # 0 ok
        {"images": ["missing.png"], "messages": conv("<image>")},                     # 1 missing_file (at load)
        {"images": ["broken.png"], "messages": conv("<image>")},                      # 2 unreadable_image
        {"images": ["blue.png", "red.png"], "messages": conv("<image><image>")},      # 3 ok, two images
        {"videos": ["clip"], "messages": conv("<video>", "Green.")},                  # 4 ok, video
        {"images": ["red.png"], "messages": conv("<image>", "Red. " * 200)},          # 5 ok, answer truncated
    ]
    (root / "d.json").write_text(json.dumps(records))


def test_dataset_yields_processed_samples_and_counts_bad_ones(tmp_path, tok):
    _write_dataset(tmp_path)
    cfg = DataConfig(dataset=["d.json"], dataset_dir=str(tmp_path), cutoff_len=256)
    ds = MLLMDataset(cfg, tokenizer=tok, processor=FakeProcessor())
    assert len(ds) == 5 and dict(ds.report.counts) == {"missing_file": 1}
    out = [ds.load(i) for i in range(len(ds))]
    assert [o is None for o in out] == [False, True, False, False, False]
    assert dict(ds.report.counts) == {"missing_file": 1, "unreadable_image": 1}
    assert ds.report.examples["unreadable_image"][0].where.endswith("d.json[2]")
    first, two, video, long = out[0], out[2], out[3], out[4]
    assert first.image_grid_thw.tolist() == [[1, 6, 4]] and first.pixel_values.shape == (24, 1176)
    assert int((first.input_ids == tok.token_id("<|image_pad|>")).sum()) == 6
    assert two.image_grid_thw.tolist() == [[1, 4, 8], [1, 6, 4]]
    assert two.pixel_values[:, 0].unique_consecutive().tolist() == [40.0, 85.0]   # blue rows, then red
    assert video.video_grid_thw.tolist() == [[2, 4, 4]] and video.second_per_grid_ts.tolist() == [1.0]
    assert len(long) == 256 and long.labels.shape == long.input_ids.shape
    assert list(ds) and dict(ds.report.counts) == {"missing_file": 1, "unreadable_image": 1}  # counted once


def test_media_cut_by_cutoff_len_is_skipped_with_its_reason(tmp_path, tok):
    _write_dataset(tmp_path)
    cfg = DataConfig(dataset=[str(tmp_path / "d.json")], dataset_dir=str(tmp_path), cutoff_len=20, max_samples=1)
    ds = MLLMDataset(cfg, tokenizer=tok, processor=FakeProcessor())
    assert ds.load(0) is None and dict(ds.report.counts) == {"media_truncated": 1}


def test_yaml_data_section_resolves_paths_against_its_folder(tmp_path, tok):
    _write_dataset(tmp_path)
    tok.save(tmp_path / "model")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(
        {"data": {"dataset": ["d.json"], "dataset_dir": ".", "model_name_or_path": "model", "cutoff_len": 256}}))
    cfg = load_data_config(tmp_path / "train.yaml")
    assert cfg.dataset == [str(tmp_path / "d.json")]
    ds = MLLMDataset(cfg, processor=FakeProcessor())
    assert ds.tokenizer.vocab_size == 512 and ds.load(0) is not None


def test_check_prints_a_summary_and_fails_when_nothing_is_usable(tmp_path, tok, capsys):
    _write_dataset(tmp_path)
    tok.save(tmp_path / "model")
    cfg = {"data": {"dataset": ["d.json"], "dataset_dir": ".", "model_name_or_path": "model", "cutoff_len": 256}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    assert check_dataset(tmp_path / "ok.yaml", processor=FakeProcessor()) == 0
    out = capsys.readouterr().out
    assert "usable: 4" in out and "missing_file: 1" in out and "unreadable_image: 1" in out
    cfg["data"]["cutoff_len"] = 8
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    assert check_dataset(tmp_path / "short.yaml", processor=FakeProcessor(), as_json=True) == 1
    assert json.loads(capsys.readouterr().out)["usable"] == 0


def test_check_cli_reports_config_errors_with_exit_status_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"data": {"dataset": ["nope.json"]}}))
    assert main(["data", "check", str(tmp_path / "bad.yaml")]) == 2
    assert "nope.json not found" in capsys.readouterr().err


def test_yaml_keys_are_type_checked_and_typos_named():
    with pytest.raises(ValueError, match="did you mean 'cutoff_len'"):
        DataConfig.from_dict({"cutof_len": 5})
    with pytest.raises(ValueError, match="max_samples: expected an integer"):
        DataConfig.from_dict({"max_samples": "ten"})


def test_tokenizer_dir_overrides_model_name_or_path(tmp_path, tok):
    _write_dataset(tmp_path)
    tok.save(tmp_path / "tok")
    cfg = DataConfig.from_dict({"dataset": "d.json", "dataset_dir": ".", "model_name_or_path": "nowhere",
                                "tokenizer_dir": "tok", "cutoff_len": 256}, base_dir=tmp_path)
    assert cfg.model_dir == str(tmp_path / "tok")
    assert MLLMDataset(cfg, processor=FakeProcessor()).tokenizer.vocab_size == 512


class _BrokenProcessor(FakeProcessor):
    """Answers one image with two grids (mismatch) or raises (an odd image the processor chokes on)."""

    def __call__(self, images=None, videos=None):
        out = super().__call__(images=images, videos=videos)
        if images and images[0].size == (112, 56):
            raise RuntimeError("processor failed on this image")
        if images and images[0].size == (84, 84):
            out["image_grid_thw"] = torch.cat([out["image_grid_thw"]] * 2)
        return out


def test_every_media_and_processor_failure_is_skipped_and_counted_by_reason(tmp_path, tok, monkeypatch, caplog):
    _write_dataset(tmp_path)
    Image.new("RGB", (84, 84), (9, 9, 9)).save(tmp_path / "odd.png")
    (tmp_path / "empty_clip").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"video")
    conv = [{"role": "user", "content": "<video>What colour is it?"}, {"role": "assistant", "content": "Red."}]
    image = [{"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "Red."}]
    records = [{"images": ["odd.png"], "messages": image},                   # 0 processor_mismatch
               {"images": ["blue.png"], "messages": image},                  # 1 processing_error
               {"videos": ["empty_clip"], "messages": conv},                 # 2 unreadable_video
               {"videos": ["clip.mp4"], "messages": conv},                   # 3 video_decoder_missing
               {"videos": ["clip"], "messages": conv}]                       # 4 ok: a folder of frames
    (tmp_path / "e.json").write_text(json.dumps(records))
    monkeypatch.setitem(sys.modules, "av", None)          # PyAV not installed
    cfg = DataConfig(dataset=["e.json"], dataset_dir=str(tmp_path), cutoff_len=256, cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="mmfuse.data.dataset"):
        ds = MLLMDataset(cfg, tokenizer=tok, processor=_BrokenProcessor())
    assert "1 video files in the dataset need PyAV" in caplog.text     # said at start-up
    assert [ds.load(i) is None for i in range(5)] == [True, True, True, True, False]
    assert dict(ds.report.counts) == {"processor_mismatch": 1, "processing_error": 1, "unreadable_video": 1,
                                      "video_decoder_missing": 1}
    assert ds.report.examples["video_decoder_missing"][0].where.endswith("e.json[3]")
    assert "pip install av" in ds.report.format()

    # The missing decoder is this installation's, not the sample's: it is not cached as a skip.
    monkeypatch.setitem(sys.modules, "av", FakeAV(frames=4, seconds=2.0))
    again = MLLMDataset(cfg, tokenizer=tok, processor=_BrokenProcessor())
    video = again.load(3)
    assert video is not None and video.video_grid_thw.tolist() == [[2, 4, 4]]
    assert again.cache_stats["miss"] == 1
    assert again.load(0) is None and again.cache_stats["hit"] == 1     # a data problem stays cached


def test_real_video_file_becomes_a_video_sample(tmp_path, tok):
    from tests.data.test_media import _encode_mp4
    _encode_mp4(tmp_path / "clip.mp4", frames=20, fps=4)            # 5 s: 10 frames at 2 fps
    conv = [{"role": "user", "content": "<video>What colour is it?"}, {"role": "assistant", "content": "Grey."}]
    (tmp_path / "v.json").write_text(json.dumps([{"videos": ["clip.mp4"], "messages": conv}]))
    cfg = DataConfig(dataset=["v.json"], dataset_dir=str(tmp_path), cutoff_len=512)
    sample = MLLMDataset(cfg, tokenizer=tok, processor=FakeProcessor()).load(0)
    assert sample is not None
    assert sample.video_grid_thw[0, 0].item() == 5 and sample.second_per_grid_ts.tolist() == [1.0]
