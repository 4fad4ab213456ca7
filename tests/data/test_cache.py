"""The preprocessing cache: a cached run reads the same bits and reports the same skips as an
uncached one; damaged entries are recomputed, and any change to the inputs misses the cache."""

import os

import pytest

from mmfuse.data.config import DataConfig
from mmfuse.data.dataset import MLLMDataset
from mmfuse.data.tokenizer import build_tiny_tokenizer
from mmfuse.models.qwen2_5_vl.config import SMALL_VOCAB_SPECIAL_TOKENS
from mmfuse.train.batches import TrainBatches
from tests.data.batch_equal import assert_same_batches, take
from tests.data.fakes import FakeProcessor
from tests.data.test_dataset import _write_dataset


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(512, SMALL_VOCAB_SPECIAL_TOKENS, corpus=["What colour is it? Red."])


def _run(tmp_path, tok, cache_dir, n=6, **kw):
    cfg = DataConfig(dataset=["d.json"], dataset_dir=str(tmp_path), cutoff_len=256, cache_dir=cache_dir, **kw)
    ds = MLLMDataset(cfg, tokenizer=tok, processor=FakeProcessor())
    return take(TrainBatches(ds, seq_length=300, seed=1), n), ds


def _entries(cache_dir):
    return sorted(p for p in cache_dir.rglob("*.safetensors"))


def test_cached_run_gives_bit_identical_batches_and_the_same_skip_report(tmp_path, tok):
    _write_dataset(tmp_path)
    plain, plain_ds = _run(tmp_path, tok, None)
    first, first_ds = _run(tmp_path, tok, str(tmp_path / "cache"))
    second, second_ds = _run(tmp_path, tok, str(tmp_path / "cache"))
    assert_same_batches(first, plain)
    assert_same_batches(second, plain)
    # 4 usable samples + the unreadable image (its skip is stored too); the missing file never gets that far
    assert len(_entries(tmp_path / "cache")) == 5
    # later epochs re-read samples, so hits are counted per read; misses once per entry
    assert first_ds.cache_stats["miss"] == 5 and set(second_ds.cache_stats) == {"hit"}
    assert second_ds.report.to_dict() == plain_ds.report.to_dict() == first_ds.report.to_dict()


def test_damaged_entries_are_recomputed_and_counted(tmp_path, tok):
    _write_dataset(tmp_path)
    cache = tmp_path / "cache"
    want, _ = _run(tmp_path, tok, str(cache))
    truncated, garbage = _entries(cache)[:2]
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage.write_bytes(b"\x00" * 100)
    got, ds = _run(tmp_path, tok, str(cache))
    assert_same_batches(got, want)
    assert ds.cache_stats["corrupt"] == 2 and set(ds.cache_stats) == {"hit", "corrupt"}
    _, again = _run(tmp_path, tok, str(cache))
    assert set(again.cache_stats) == {"hit"}   # rewritten whole


def test_changed_settings_or_media_miss_the_cache(tmp_path, tok):
    _write_dataset(tmp_path)
    cache = tmp_path / "cache"
    _run(tmp_path, tok, str(cache))
    _, other = _run(tmp_path, tok, str(cache), image_max_pixels=100_000)
    assert other.cache_stats["miss"] == 5 and len(list(cache.iterdir())) == 2   # one folder per settings
    st = os.stat(tmp_path / "red.png")
    os.utime(tmp_path / "red.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, touched = _run(tmp_path, tok, str(cache))
    assert touched.cache_stats["miss"] == 3   # the three samples showing red.png
