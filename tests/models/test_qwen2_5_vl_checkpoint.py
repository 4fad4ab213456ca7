"""Hugging Face directories in and out: from_pretrained reads both key layouts and sharded files,
save_pretrained writes what transformers loads, and mismatches are errors that list names."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from mmfuse.models.qwen2_5_vl import hf_adapter
from tests.models.qwen_fixtures import hf_twin, mm_token_types, pixels_for, sample, tiny_config


def _inputs(cfg):
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor(sample(cfg, [4, ("image", (1, 4, 6)), 5], gen))
    return ids, pixels_for(cfg, [(1, 4, 6)], gen), torch.tensor([[1, 4, 6]])


def _hf_logits(hf, cfg, ids, pix, grid):
    with torch.no_grad():
        return hf(input_ids=ids[None], mm_token_type_ids=mm_token_types(cfg, ids)[None], pixel_values=pix,
                  image_grid_thw=grid).logits[0]


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, tied):
    import transformers

    cfg = tiny_config(tie_word_embeddings=tied)
    hf = hf_twin(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = Qwen2_5_VL.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, pix, grid = _inputs(cfg)
    ref = _hf_logits(hf, cfg, ids, pix, grid)
    assert torch.equal(_hf_logits(back, cfg, ids, pix, grid), ref)
    with torch.no_grad():
        got = ours(ids, pixel_values=pix, image_grid_thw=grid).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert ("lm_head.weight" in load_file(tmp_path / "ours" / "model.safetensors")) == (not tied)


def test_released_and_nested_key_layouts_load_the_same_weights(tmp_path):
    cfg = tiny_config()
    ref = Qwen2_5_VL(cfg)
    ref.save_pretrained(tmp_path / "released")
    (tmp_path / "nested").mkdir()
    sd = load_file(tmp_path / "released" / "model.safetensors")
    nested = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v for k, v in sd.items()}
    save_file(nested, tmp_path / "nested" / "model.safetensors")
    (tmp_path / "nested" / "config.json").write_text((tmp_path / "released" / "config.json").read_text())
    a = Qwen2_5_VL.from_pretrained(tmp_path / "released").state_dict()
    b = Qwen2_5_VL.from_pretrained(tmp_path / "nested").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_round_trips(tmp_path):
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    hf_adapter.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = Qwen2_5_VL.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_from_pretrained_casts_to_the_requested_dtype(tmp_path):
    Qwen2_5_VL(tiny_config()).save_pretrained(tmp_path)
    model = Qwen2_5_VL.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    cfg = tiny_config()
    Qwen2_5_VL(cfg).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        Qwen2_5_VL.from_pretrained(tmp_path)
    msg = str(err.value)
    for needle in ("1 missing", "model.layers.0.mlp.up_proj.weight", "1 unexpected", "model.layers.0.extra.weight",
                   "wrong shape", "model.norm.weight"):
        assert needle in msg


def test_pickle_weights_are_refused_with_a_hint(tmp_path):
    Qwen2_5_VL(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        Qwen2_5_VL.from_pretrained(tmp_path)


def test_config_json_of_other_models_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        Qwen2_5_VL.from_pretrained(tmp_path)
