"""A MindSpeed-MM launch (model.json + data.json + Megatron flags) becomes the RunConfig the script
means: freeze, recompute and the pipeline split from model.json, optimizer, steps and the parallel
layout from the flags (the global batch divided over the data-parallel ranks of WORLD_SIZE), the
data section from data.json; shapes are checked against the checkpoint, unsupported flags are
named, flags without effect are reported, and `mmfuse train --mm-model ... --mm-data ...` trains."""

import json
from pathlib import Path

import pytest
import yaml

from mmfuse.cli.main import main
from mmfuse.models.qwen2_5_vl import Qwen2_5_VLConfig
from mmfuse.train.config import apply_overrides, load_run_config
from mmfuse.train.demo import make_demo_run
from mmfuse.train.mindspeed import run_config_from_mindspeed


def model_json(cfg: Qwen2_5_VLConfig) -> dict:
    """examples/qwen2.5vl/model_7b.json's layout with the tiny checkpoint's numbers."""
    v, t = cfg.vision, cfg.text
    return {
        "model_id": "qwen2_5vl", "img_context_token_id": cfg.image_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "image_encoder": {
            "vision_encoder": {
                "model_id": "qwen2vit", "num_layers": v.depth, "hidden_size": v.hidden_size,
                "ffn_hidden_size": v.intermediate_size, "intermediate_size": v.intermediate_size,
                "num_attention_heads": v.num_heads, "gated_linear_unit": True, "activation_func": "silu",
                "normalization": "RMSNorm", "layernorm_epsilon": 1e-6, "in_channels": 3, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
                "window_attn_size": v.window_size, "fullatt_block_indexes": v.fullatt_block_indexes,
                "use_fused_rotary_pos_emb": True, "post_layer_norm": False, "attention_mask_type": "general",
                "freeze": True, "pipeline_num_layers": [v.depth, 0], "bf16": True, "params_dtype": "bf16",
                "recompute_granularity": "selective"},
            "vision_projector": {
                "model_id": "lnmlp", "num_layers": 1, "input_size": v.hidden_size,
                "hidden_size": t.hidden_size, "ffn_hidden_size": v.hidden_size * 4, "activation_func": "gelu",
                "add_bias_linear": True, "normalization": "RMSNorm", "freeze": False}},
        "text_decoder": {
            "model_id": "qwen2_5_lm", "num_layers": t.num_hidden_layers, "pipeline_num_layers": [1, 1],
            "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
            "num_attention_heads": t.num_attention_heads, "group_query_attention": True,
            "num_query_groups": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
            "vocab_size": t.vocab_size, "rope_theta": t.rope_theta, "position_embedding_type": "mrope",
            "mrope_section": t.mrope_section, "add_qkv_bias": True, "disable_bias_linear": True,
            "untie_embeddings_and_output_weights": not t.tie_word_embeddings, "activation_func": "silu",
            "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        "text_encoder": None, "video_encoder": None, "patch": {"bridge_patch": False},
    }


def data_json(demo_root: Path, model_dir: str) -> dict:
    """examples/qwen2.5vl/data_7b.json's layout pointing at the demo data."""
    return {"dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {"model_name_or_path": model_dir, "use_fast_tokenizer": True,
                                  "split_special_tokens": False, "image_max_pixels": 262144,
                                  "image_min_pixels": 0},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(demo_root / "data"),
                             "dataset": "mllm_data.json", "cache_dir": str(demo_root / "cache"),
                             "train_on_prompt": False, "mask_history": False,
                             "preprocessing_num_workers": 16, "max_samples": None, "tool_format": None},
        "attr": {"system": None, "images": "images", "videos": None, "messages": "messages",
                 "role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant"}},
        "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "shuffle": True}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms")
    demo = make_demo_run(root, n_train=16, n_eval=4, steps=2)
    files = {"model": root / "model.json", "data": root / "data.json", "demo": demo, "root": root}
    files["model"].write_text(json.dumps(model_json(Qwen2_5_VLConfig.preset("tiny"))))
    files["data"].write_text(json.dumps(data_json(root, demo.model_dir)))
    return files


FLAGS = ["--lr", "1.0e-5", "--min-lr", "1.0e-6", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1",
         "--weight-decay", "0", "--clip-grad", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
         "--train-iters", "50", "--seed", "42", "--seq-length", "160", "--micro-batch-size", "1",
         "--global-batch-size", "4", "--bf16", "--no-save-optim", "--log-interval", "5"]


def test_model_json_flags_and_data_json_map_to_the_run_config(pair, tmp_path):
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", str(tmp_path)], log=print)
    m, t, o, c = cfg.model, cfg.training, cfg.optimizer, cfg.checkpoint
    assert m.freeze == ["vision_encoder"]                    # projector freeze false, decoder never
    assert m.recompute_vision.granularity == "selective"
    text = m.recompute_text
    assert (text.granularity, text.method, text.num_layers) == ("full", "uniform", 1)
    assert m.pretrained == str(Path(pair["demo"].model_dir).resolve()) and m.dtype == "float32"
    assert (t.max_steps, t.grad_accum, t.seq_length, t.seed, t.bf16) == (50, 4, 160, 42, True)
    assert (o.lr, o.min_lr, o.lr_schedule, o.warmup_steps) == (1e-5, 1e-6, "cosine", 5)
    assert (o.weight_decay, o.grad_clip, o.adam_beta2) == (0.0, 0.0, 0.95)
    assert (c.save_dir, c.save_optimizer, c.save_rng, c.keep_last) == (str(tmp_path.resolve()), False, True, 0)
    assert cfg.logging.log_interval == 5
    assert cfg.data["cutoff_len"] == 160 and cfg.data["attr"]["videos"] is None
    assert cfg.data["dataset"] == [str((pair["root"] / "data" / "mllm_data.json").resolve())]


def test_megatron_defaults_apply_when_flags_are_absent(pair, tmp_path):
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], ["--lr", "1e-4", "--train-iters", "3",
                                    "--seq-length", "160", "--save", str(tmp_path), "--lr-warmup-iters", "2"])
    o = cfg.optimizer
    assert (o.lr_schedule, o.weight_decay, o.grad_clip, o.min_lr, o.warmup_steps) == ("linear", 0.01, 1.0, 0.0, 2)
    assert (cfg.training.grad_accum, cfg.training.seed, cfg.training.bf16) == (1, 1234, False)
    par = cfg.parallel           # Megatron's switches are off without their flags; timeout 10 minutes
    assert (par.tp, par.pp, par.vpp, par.cp, par.cp_kind) == (1, 1, 1, 1, "ring")
    assert not (par.sequence_parallel or par.zero1 or par.overlap_grad_reduce or par.overlap_p2p_comm)
    assert par.timeout_s == 600


def test_load_takes_a_hf_directory_and_explains_mm_checkpoints(pair, tmp_path):
    base = [*FLAGS, "--save", str(tmp_path)]
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--load", pair["demo"].model_dir])
    assert cfg.model.pretrained == str(Path(pair["demo"].model_dir).resolve())
    mm_ckpt = tmp_path / "mm_path"
    (mm_ckpt / "release").mkdir(parents=True)
    with pytest.raises(ValueError, match="--load .*no config.json.*Hugging Face"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--load", str(mm_ckpt)])


def test_model_json_that_disagrees_with_the_checkpoint_lists_each_field(pair, tmp_path):
    wrong = model_json(Qwen2_5_VLConfig.preset("tiny"))
    wrong["image_encoder"]["vision_encoder"]["num_layers"] = 32
    wrong["text_decoder"]["num_query_groups"] = 4
    wrong["text_decoder"]["untie_embeddings_and_output_weights"] = True
    path = tmp_path / "model_7b.json"
    path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError) as err:
        run_config_from_mindspeed(path, pair["data"], [*FLAGS, "--save", str(tmp_path)])
    text = str(err.value)
    assert "image_encoder.vision_encoder.num_layers: model.json 32, checkpoint 2" in text
    assert "text_decoder.num_query_groups: model.json 4, checkpoint 2" in text
    assert "text_decoder.untie_embeddings_and_output_weights: model.json True, checkpoint False" in text


@pytest.mark.parametrize("flag,field", [("--tensor-model-parallel-size", "tp"),
                                        ("--pipeline-model-parallel-size", "pp"),
                                        ("--context-parallel-size", "cp")])
def test_parallel_sizes_above_one_map_to_the_layout(pair, tmp_path, monkeypatch, flag, field):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", str(tmp_path), flag, "2"])
    assert getattr(cfg.parallel, field) == 2 and cfg.training.grad_accum == 4     # dp 1: GBS 4 / MBS 1


def test_micro_batch_above_one_is_still_rejected_naming_the_fix(pair, tmp_path):
    with pytest.raises(ValueError, match="--micro-batch-size 2: must be 1.*raise --seq-length"):
        run_config_from_mindspeed(pair["model"], pair["data"],
                                  [*FLAGS, "--save", str(tmp_path), "--micro-batch-size", "2"])


def write_model_json(path: Path, vit_layers, llm_layers) -> Path:
    """The fixture's model.json with other pipeline_num_layers."""
    raw = model_json(Qwen2_5_VLConfig.preset("tiny"))
    raw["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = vit_layers
    raw["text_decoder"]["pipeline_num_layers"] = llm_layers
    path.write_text(json.dumps(raw))
    return path


def test_the_7b_parallel_flags_and_nested_pipeline_num_layers_map_to_the_layout(pair, tmp_path, monkeypatch):
    # the 7B recipe's split ([[32, 0]] ViT, [[12, 16]] decoder, mm-convert's nested form) in the tiny
    # model's numbers, on tp 2 x pp 2 with 8 processes: dp 2
    monkeypatch.setenv("WORLD_SIZE", "8")
    model = write_model_json(tmp_path / "model.json", [[2, 0]], [[1, 1]])
    flags = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--context-parallel-size", "1", "--context-parallel-algo", "ulysses_cp_algo",
             "--use-distributed-optimizer", "--sequence-parallel", "--overlap-grad-reduce", "--overlap-p2p-communication",
             "--distributed-timeout-minutes", "20", "--global-batch-size", "48"]
    lines = []
    cfg = run_config_from_mindspeed(model, pair["data"], [*FLAGS, *flags, "--save", str(tmp_path / "run")],
                                    log=lines.append)
    par = cfg.parallel
    assert (par.tp, par.pp, par.vpp, par.cp, par.cp_kind) == (2, 2, 1, 1, "ulysses")
    assert (par.vit_pp_layers, par.llm_pp_layers) == ([2, 0], [1, 1])
    assert par.sequence_parallel and par.zero1 and par.overlap_grad_reduce and par.overlap_p2p_comm
    assert par.timeout_s == 1200
    assert cfg.training.grad_accum == 24                      # GBS 48 / (MBS 1 x dp 2)
    assert not any("pipeline_num_layers" in line for line in lines)
    assert apply_overrides(cfg, {}).parallel == par           # the written run_config.yaml loads as it is


def test_nested_pipeline_num_layers_give_the_virtual_pipeline_size(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = write_model_json(tmp_path / "model.json", [[2, 0], [0, 0]], [[0, 1], [0, 1]])
    base = [*FLAGS, "--save", str(tmp_path / "run"), "--pipeline-model-parallel-size", "2"]
    for extra in ([], ["--virtual-pipeline-model-parallel-size", "2"]):
        par = run_config_from_mindspeed(model, pair["data"], [*base, *extra]).parallel
        assert (par.pp, par.vpp, par.vit_pp_layers, par.llm_pp_layers) == (2, 2, [2, 0, 0, 0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="nested lists of \\[2\\] chunks, but "
                                         "--virtual-pipeline-model-parallel-size is 3"):
        run_config_from_mindspeed(model, pair["data"], [*base, "--virtual-pipeline-model-parallel-size", "3"])


def test_pipeline_num_layers_that_do_not_add_up_to_the_model_raise_before_training(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = write_model_json(tmp_path / "model.json", [2, 0], [1, 2])
    with pytest.raises(ValueError, match="MindSpeed parallel layout.*llm_pp_layers \\[1, 2\\] sums to 3, but "
                                         "the model has 2"):
        run_config_from_mindspeed(model, pair["data"], [*FLAGS, "--save", str(tmp_path / "run"),
                                                        "--pipeline-model-parallel-size", "2"])


@pytest.mark.parametrize("algo,kind", [("megatron_cp_algo", "ring"), ("ulysses_cp_algo", "ulysses")])
def test_context_parallel_algo_maps_to_cp_kind(pair, tmp_path, monkeypatch, algo, kind):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", str(tmp_path),
                                    "--context-parallel-size", "2", "--context-parallel-algo", algo])
    assert (cfg.parallel.cp, cfg.parallel.cp_kind) == (2, kind)


def test_unsupported_context_parallel_algo_raises_naming_the_choices_and_is_ignored_without_cp(
        pair, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = [*FLAGS, "--save", str(tmp_path), "--context-parallel-algo", "hybrid_cp_algo"]
    with pytest.raises(ValueError, match="--context-parallel-algo hybrid_cp_algo: mmfuse has megatron_cp_algo "
                                         "\\(ring\\), ulysses_cp_algo \\(ulysses\\)"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--context-parallel-size", "2"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    lines = []
    run_config_from_mindspeed(pair["model"], pair["data"], base, log=lines.append)
    assert any("--context-parallel-algo hybrid_cp_algo (no effect with --context-parallel-size 1)" in line
               for line in lines)


def test_global_batch_is_divided_by_the_data_parallel_size_of_world_size(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    base = [*FLAGS, "--save", str(tmp_path)]
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--global-batch-size", "8"])
    assert cfg.training.grad_accum == 2                        # GBS 8 / (MBS 1 x dp 4)
    tp2 = run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--global-batch-size", "8",
                                                                  "--tensor-model-parallel-size", "2"])
    assert tp2.training.grad_accum == 4                        # dp 4 / tp 2 = 2
    without = [a for a in base if a not in ("--global-batch-size", "4")]
    assert run_config_from_mindspeed(pair["model"], pair["data"], without).training.grad_accum == 1
    with pytest.raises(ValueError, match="--global-batch-size 6: must be a positive multiple of "
                                         "--micro-batch-size 1 x data-parallel size 4 = 4 \\(DP = WORLD_SIZE 4"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*base, "--global-batch-size", "6"])


# The 7B finetune script's flags (examples/qwen2.5vl/finetune_qwen2_5_vl_7b.sh) with PP 2 -> 1.
SCRIPT_7B = ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1 "
             "--context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 48 "
             "--use-distributed-optimizer --use-mcore-models --tokenizer-type NullTokenizer --vocab-size 152064 "
             "--seq-length 1024 --make-vocab-size-divisible-by 1 --normalization RMSNorm --use-fused-rmsnorm "
             "--swiglu --use-fused-swiglu --no-masked-softmax-fusion --use-flash-attn --variable-seq-lengths "
             "--bf16 --lr 1.0e-5 --lr-decay-style cosine --lr-warmup-fraction 0.1 --weight-decay 0 "
             "--clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --train-iters 10000 --seed 42 "
             "--no-load-optim --no-load-rng --no-save-optim --no-save-rng --save-interval 10000 "
             "--ckpt-format torch --log-interval 1 --log-tps --num-workers 8 --distributed-timeout-minutes 20 "
             "--distributed-backend nccl").split()


def test_the_7b_script_flags_map_and_the_no_effect_ones_are_reported_in_one_line(pair, tmp_path):
    lines = []
    cfg = run_config_from_mindspeed(pair["model"], pair["data"], [*SCRIPT_7B, "--save", str(tmp_path)],
                                    log=lines.append)
    assert (cfg.training.grad_accum, cfg.training.max_steps, cfg.optimizer.warmup_steps) == (48, 10000, 1000)
    assert not cfg.checkpoint.load_optimizer and not cfg.checkpoint.save_rng
    par = cfg.parallel
    assert (par.cp_kind, par.zero1, par.timeout_s) == ("ulysses", True, 1200)
    flag_lines = [line for line in lines if line.startswith("MindSpeed flags ignored")]
    assert len(flag_lines) == 1
    assert all(f in flag_lines[0] for f in ("--use-flash-attn", "--num-workers", "--ckpt-format", "--log-tps"))
    assert not any(f in flag_lines[0] for f in ("--context-parallel-algo", "--use-distributed-optimizer",
                                                "--distributed-timeout-minutes"))
    assert any("pipeline_num_layers" in line for line in lines)


def test_unknown_and_unsupported_flags_raise_naming_them(pair):
    with pytest.raises(ValueError, match=r"unknown flags \['--lr-warmpu-iters'\]"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", "x", "--lr-warmpu-iters", "3"])
    with pytest.raises(ValueError, match="--fp16: fp16 needs loss scaling"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", "x", "--fp16"])
    with pytest.raises(ValueError, match="--lr-decay-style WSD"):
        run_config_from_mindspeed(pair["model"], pair["data"], [*FLAGS, "--save", "x", "--lr-decay-style", "WSD"])


def test_cli_trains_from_the_mindspeed_pair_writes_a_yaml_run_config_and_resumes(pair, tmp_path, capsys):
    save = tmp_path / "run"
    args = ["train", "--mm-model", str(pair["model"]), "--mm-data", str(pair["data"]), "--lr", "1e-3",
            "--seq-length", "160", "--global-batch-size", "1", "--save", str(save), "--use-flash-attn",
            "--num-workers", "2", "--no-progress", "--set", "training.device=cpu"]
    code = main([*args, "--train-iters", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "MindSpeed flags ignored (no effect on results in mmfuse): --use-flash-attn, --num-workers" in out
    written = yaml.safe_load((save / "run_config.yaml").read_text())
    assert written["model"]["freeze"] == ["vision_encoder"] and written["training"]["max_steps"] == 2
    assert load_run_config(save / "run_config.yaml").optimizer.lr == 1e-3   # usable as mmfuse YAML as is
    # Megatron's resume: --load names the --save folder
    assert main([*args, "--train-iters", "3", "--load", str(save)]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_cli_needs_a_config_or_the_pair_and_names_unknown_flags(pair, tmp_path, capsys):
    assert main(["train", "--save-dir", str(tmp_path)]) == 2
    assert "--mm-model model.json --mm-data data.json" in capsys.readouterr().err
    assert main(["train", "--mm-model", str(pair["model"])]) == 2
    assert "give both" in capsys.readouterr().err
    assert main(["train", pair["demo"].train_yaml, "--lr", "1e-5"]) == 2
    assert "--set optimizer.lr" in capsys.readouterr().err
    assert main(["train", "--mm-model", str(pair["model"]), "--mm-data", str(pair["data"]), "--bogus", "3"]) == 2
    assert "unknown flags ['--bogus']" in capsys.readouterr().err
