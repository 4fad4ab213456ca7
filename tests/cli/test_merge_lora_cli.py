"""`mmfuse merge-lora`: adapters folded into their base give a plain Hugging Face directory whose
model computes what the base + adapters computed, keeps the base's other files, and loads in
transformers; bad directories fail with a message instead of a traceback."""

from __future__ import annotations

import json

import torch

from mmfuse.cli.main import main
from mmfuse.models.common.lora import LoRAConfig, apply_lora, fold_lora, lora_modules, save_adapters
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from tests.models.test_qwen2_5_vl_training_features import _batch
from tests.models.qwen_fixtures import tiny_config


def _base_and_adapters(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Qwen2_5_VL(cfg)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    lcfg = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "qkv", "gate_proj"])
    apply_lora(model, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_adapters(model, tmp_path / "adapters", lcfg)
    return cfg, model


def test_merged_directory_computes_base_plus_adapters(tmp_path, capsys):
    cfg, adapted = _base_and_adapters(tmp_path)
    args = ["merge-lora", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
            "--out", str(tmp_path / "merged")]
    assert main(args) == 0
    assert "merged" in capsys.readouterr().out
    merged = Qwen2_5_VL.from_pretrained(tmp_path / "merged")
    assert not lora_modules(merged)
    batch = _batch(cfg)
    with torch.no_grad():
        want = adapted(**batch, return_logits=True).logits
        got = merged(**batch, return_logits=True).logits
        base = Qwen2_5_VL.from_pretrained(tmp_path / "base")(**batch, return_logits=True).logits
    assert not torch.allclose(want, base)            # the adapters do change the model
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert (tmp_path / "merged" / "tokenizer_config.json").read_text() == \
        (tmp_path / "base" / "tokenizer_config.json").read_text()

    import transformers
    _, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_fold_lora_leaves_plain_linears_sharing_the_merged_weight():
    torch.manual_seed(1)
    model = Qwen2_5_VL(tiny_config())
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    weight = model.model.layers[0].self_attn.q_proj.weight
    names = fold_lora(model)
    layer_q = model.model.layers[0].self_attn.q_proj
    assert names and type(layer_q) is torch.nn.Linear and layer_q.weight is weight
    assert not any(".lora_" in k for k in model.state_dict())


def test_bad_directories_are_reported(tmp_path, capsys):
    _base_and_adapters(tmp_path)
    assert main(["merge-lora", "--base", str(tmp_path / "nowhere"), "--adapters", str(tmp_path / "adapters"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["merge-lora", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "base"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["merge-lora", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                 "--out", str(tmp_path / "base")]) == 2
    assert "must differ" in capsys.readouterr().err
